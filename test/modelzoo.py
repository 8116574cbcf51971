"""The ModelZoo cases behind test/*_performance_*.sh and test/*_full_8p.sh, written once.

    python test/modelzoo.py pretrain|finetune performance|full NPROC --data_path=... [--key=value ...]

A case runs the entry point (more than one process through torchrun), writes its console to
<output_dir>/train_<CaseName>.log (afresh for a performance case, appended for a full one, as
its log.jsonl is), and then reports what accelerator teams hand in:

    Final Performance images/sec : X     images/s of all ranks together, steady state (the loop's own
                                         figure from log.txt: its first logging interval, holding
                                         start-up and compilation, is left out whenever a later
                                         one exists)
    Final Train Accuracy : Y             top-1 on val/ after the last epoch (fine-tuning)
    E2E Training Duration sec : Z        wall time of the whole launch

and writes <CaseName>.log (Network, RankSize, BatchSize, DeviceType, CaseName, ActualFPS,
TrainingTime, TrainAccuracy, ActualLoss, E2ETrainingTime, MFU; TrainingTime is the time of one
optimizer step in ms, MFU the model FLOP utilisation of the steady state, 'n/a' where the device's
peak is unknown: see util/flops.py and --peak_tflops) and train_<CaseName>_loss.txt (the logged losses
of the whole run, every launch of a resumed full run included, one a line in step order), where
<output_dir> is test/output/<device id> unless --output_dir= says otherwise. The run itself
(checkpoints, log.jsonl, log.txt, TensorBoard) goes to <output_dir>/<CaseName>/. Both files of an
earlier launch are removed first: a launch that fails leaves none to be read as its figures (a
full run that had finished trains nothing when launched again, and keeps those of the launch that
finished it).

SIGTERM and SIGUSR1 sent to the case alone (`timeout`, `kill <pid>`, a container's first process)
are passed on to the run, which saves and stops (exit 4) as it does when it receives them itself,
and as it does on Ctrl-C (which torchrun, stopped by it too, reports as its own failure).

Performance cases run a short, fixed number of steps and start afresh each time (their run
folder is emptied first). Full cases run the published recipe: the entry point's defaults, with
gradient accumulation reaching the recipe's effective batch on the devices given; they resume an
interrupted run from its folder.
"""
import contextlib
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from compare_loss import parse_jsonl  # noqa: E402 - the one log.jsonl reader; imports no torch
from util.errors import (EXIT_PREEMPTED, RESUME_ADVICE, skip_the_last_collection,  # noqa: E402 - the repository's util/
                         stdout_to_devnull)
from util.logger import read_json_lines  # noqa: E402

# What each kind of case runs by default; every value is overridden by the same --key=value.
ENTRY_POINTS = {'pretrain': 'main_pretrain.py', 'finetune': 'main_finetune.py'}
DEFAULT_MODELS = {'pretrain': 'mae_vit_base', 'finetune': 'vit_base_patch16'}
# MAE fine-tuning's per-device and effective batch (ViT-B/L/H alike), and DeiT's from scratch; the
# pre-training recipes, the fine-tuning recipes published with a pre-training (SimMIM's) and the
# supervised recipes of a classifier (HiViT's) say their own.
MAE_FINETUNE_BATCHES = (32, 1024)
DEIT_SCRATCH_BATCHES = (64, 1024)
# an entry point's one-line error, its own ('error: ...') or argparse's ('main_pretrain.py: error: ...')
ERROR_LINE = re.compile(r'(?:\S+\.py: )?error: (.*)')
PERFORMANCE_STEPS = 200  # enough for a steady state; the first --log_freq steps are not counted
PERFORMANCE_LOG_FREQ = 10  # at most; shorter runs log 4 times or more, so that 3 intervals are timed
# Keys the case reads; any other --key=value goes to the entry point as it is.
CASE_KEYS = ('data_path', 'model', 'device', 'batch_size', 'nproc', 'epochs', 'max_steps', 'finetune_pth',
             'output_dir', 'precision', 'accum_iter', 'log_freq')


class CaseError(Exception):
    """A problem with the arguments or the run: printed as one line. The exit status is 2 (bad
    input), or the entry point's own when the run failed (3: diverged, 4: stopped by a signal),
    so that the status says what the line says."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


def parse_case_args(argv):
    """ModelZoo-style arguments: --key=value for the case's keys, anything else passed on.
    returns: ({key: value}, [arguments for the entry point])"""
    known, passed_on = {}, []
    for arg in argv:
        key, has_value, value = arg[2:].partition('=') if arg.startswith('--') else ('', False, '')
        if key in CASE_KEYS:
            if not has_value or not value:
                raise CaseError(f'write --{key}=VALUE (got {arg!r})')
            known[key] = value
        else:
            passed_on.append(arg)
    if 'data_path' not in known:
        raise CaseError('--data_path= is required: the ImageFolder root with train/ and val/ (e.g. '
                        '--data_path=/data/imagenet), --data_path=demo for the built-in demo set, or '
                        '--data_path=synthetic for generated images (the device without a disk)')
    for key in ('data_path', 'finetune_pth', 'output_dir'):
        if key in known and not (key == 'data_path' and known[key].partition(':')[0] in ('demo', 'synthetic')):
            known[key] = os.path.join(os.environ.get('CASE_CALLER_DIR', os.getcwd()), os.path.expanduser(known[key]))
    for key in ('batch_size', 'nproc', 'epochs', 'max_steps', 'accum_iter', 'log_freq'):
        if key in known and not (known[key].isdigit() and int(known[key]) > 0):
            raise CaseError(f'--{key}= must be a whole number above 0, got {known[key]!r}')
    return known, passed_on


def device_id():
    """The device id that names the output folder, as the ModelZoo scripts do."""
    return os.environ.get('ASCEND_DEVICE_ID', os.environ.get('DEVICE_ID', '0'))


def recipe_of(kind, model, finetune_pth):
    """The published recipe the case follows: the pre-training model's; for fine-tuning the one
    published with the checkpoint's pre-training (empty when there is none: MAE's then applies);
    without a checkpoint, the model's supervised recipe (empty when there is none: DeiT's)."""
    from util import checkpoint, registry
    from util.errors import UsageError
    try:
        if kind == 'pretrain':
            return registry.pretrain_recipe(model)
        if not finetune_pth:
            return registry.supervised_recipe_of(model)
        if not os.path.isfile(finetune_pth):  # the entry point reports a missing file
            return {}
        return registry.finetune_recipe_of(checkpoint.load(finetune_pth))[1]
    except UsageError as e:
        raise CaseError(str(e)) from None


def accumulation_for_recipe(kind, effective, batch_size, nproc):
    """Micro-batches per optimizer step that reach the recipe's effective batch."""
    if effective % (batch_size * nproc):
        raise CaseError(f'the {kind} recipe has an effective batch of {effective}, which {batch_size} images x '
                        f'{nproc} devices does not divide: choose --batch_size= so that it does, or set '
                        f'--accum_iter= yourself')
    return effective // (batch_size * nproc)


class Case:
    def __init__(self, kind, length, default_nproc, argv):
        if kind not in ENTRY_POINTS or length not in ('performance', 'full'):
            raise CaseError(f'usage: modelzoo.py pretrain|finetune performance|full NPROC --data_path=... '
                            f'(got {kind} {length})')
        args, self.passed_on = parse_case_args(argv)
        if kind == 'finetune' and any(a == '--finetune' or a.startswith('--finetune=') for a in self.passed_on):
            raise CaseError('the fine-tuning scripts take the pre-trained checkpoint as --finetune_pth=PATH (the case '
                            'reads its recipe and names the run from it), not --finetune')
        self.kind, self.length = kind, length
        recipe = recipe_of(kind, args.get('model', DEFAULT_MODELS[kind]), args.get('finetune_pth'))
        self.model = args.get('model', recipe.get('model', DEFAULT_MODELS[kind]))
        self.device = args.get('device', 'auto')
        self.nproc = int(args.get('nproc', default_nproc))
        batch_size, effective = (recipe['batch_size'], recipe['effective_batch']) if 'effective_batch' in recipe \
            else MAE_FINETUNE_BATCHES if 'finetune_pth' in args else DEIT_SCRATCH_BATCHES
        self.batch_size = int(args.get('batch_size', batch_size))
        self.args = args
        self.network = f'{self.model}_{kind}'
        self.name = f"{self.network}_bs{self.batch_size}_{self.nproc}p_{'perf' if length == 'performance' else 'acc'}"
        self.output_dir = os.path.normpath(args.get('output_dir', os.path.join(REPO, 'test', 'output', device_id())))
        self.run_dir = os.path.join(self.output_dir, self.name)
        self.console_log = os.path.join(self.output_dir, f'train_{self.name}.log')
        self.summary_file = os.path.join(self.output_dir, f'{self.name}.log')
        self.loss_file = os.path.join(self.output_dir, f'train_{self.name}_loss.txt')
        if kind == 'pretrain' and 'finetune_pth' in args:
            raise CaseError('--finetune_pth= is for the fine-tuning scripts; pre-training starts from random weights')
        if 'accum_iter' in args:
            self.accum_iter = int(args['accum_iter'])
        elif length == 'full':
            self.accum_iter = accumulation_for_recipe(kind, effective, self.batch_size, self.nproc)
        else:
            self.accum_iter = 1

    def entry_point_args(self):
        args = ['--model', self.model, '--data_path', self.args['data_path'], '--device', self.device,
                '--batch_size', self.batch_size, '--accum_iter', self.accum_iter, '--output_dir', self.run_dir]
        for key in ('epochs', 'max_steps', 'precision', 'log_freq'):
            if key in self.args:
                args += [f'--{key}', self.args[key]]
        if self.length == 'performance':
            max_steps = int(self.args.get('max_steps', PERFORMANCE_STEPS))
            if 'max_steps' not in self.args:
                args += ['--max_steps', max_steps]
            if 'log_freq' not in self.args and '--align' not in self.passed_on:  # --align logs every step
                args += ['--log_freq', min(PERFORMANCE_LOG_FREQ, max(1, max_steps // 4))]
        if 'finetune_pth' in self.args:
            args += ['--finetune', self.args['finetune_pth']]
        return [str(a) for a in args] + self.passed_on

    def command(self):
        """One process runs the entry point itself (torchrun would add an interpreter and a
        rendezvous for a world of one, which needs no process group); more run under torchrun."""
        launcher = [sys.executable] if self.nproc == 1 else \
            [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={self.nproc}']
        return launcher + [os.path.join(REPO, ENTRY_POINTS[self.kind])] + self.entry_point_args()

    def environment(self):
        """One chosen device for a one-device case when the ModelZoo device id is set; a one-process
        case is a world of one inside a SLURM allocation of several tasks too (SLURM's task number
        made it one rank of the allocation's world, refused for want of MASTER_ADDR)."""
        from util.device import VISIBLE_DEVICES  # imports torch: not before the arguments are checked
        env = dict(os.environ)
        if self.nproc == 1:
            env.pop('SLURM_PROCID', None)  # util.dist reads SLURM's variables only where it is set
        if self.nproc == 1 and ('ASCEND_DEVICE_ID' in env or 'DEVICE_ID' in env):
            names = [VISIBLE_DEVICES[self.device]] if self.device in VISIBLE_DEVICES else VISIBLE_DEVICES.values()
            for name in names:
                env.setdefault(name, device_id())
        return env

    def prepare_run_dir(self):
        """A performance run starts afresh; a full run continues what its folder holds. The summary
        and the loss file of an earlier launch go: this launch writes its own, or none if it fails.
        returns: {path: text} of those files, for a launch that finds nothing left to train"""
        from util.output_dir import in_use_by
        holder = in_use_by(self.run_dir)
        if holder:  # before anything of that run is removed
            raise CaseError(f'another launch is running this case in {self.run_dir} ({holder}): wait for it to end, '
                            f'or stop it')
        if self.length == 'performance' and os.path.isdir(self.run_dir):
            print(f'removing the previous performance run {self.run_dir}')
            shutil.rmtree(self.run_dir)
        earlier = {}
        for path in (self.summary_file, self.loss_file):
            if os.path.isfile(path):
                with open(path) as f:
                    earlier[path] = f.read()
                os.remove(path)
        self.made_run_dir = not os.path.isdir(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        if self.kind == 'finetune' and 'finetune_pth' not in self.args:
            print('no --finetune_pth=: supervised training from scratch, with the model\'s own recipe where one is '
                  'published (HiViT\'s), else DeiT\'s')
        return earlier

    def run(self):
        earlier_figures = self.prepare_run_dir()
        offsets = {name: file_size(os.path.join(self.run_dir, name)) for name in ('log.jsonl', 'log.txt')}
        command = self.command()
        print(shlex.join(command), flush=True)  # a line to paste back into a shell
        start = time.time()
        with open(self.console_log, 'w' if self.length == 'performance' else 'a') as log:
            log.write(shlex.join(command) + '\n')
            process = subprocess.Popen(command, cwd=REPO, env=self.environment(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, bufsize=1)
            errors = []  # the entry point's one-line errors, repeated below torchrun's report
            exit_codes = []  # the ranks' exit codes, from torchrun's failure report (its own is 1)
            had_finished = False  # the run said it had nothing left to train (util.launch)
            console = Console()
            with stop_signals_passed_to(process, torchrun=self.nproc > 1):
                for line in process.stdout:
                    console.write(line)
                    log.write(line)
                    error = ERROR_LINE.match(line)
                    if error:
                        errors.append(error.group(1).strip())
                    exit_codes += [int(code) for code in re.findall(r'exitcode\s*:\s*(-?\d+)', line)]
                    had_finished = had_finished or line.startswith('nothing to train: ')
                returncode = process.wait()
        e2e_seconds = time.time() - start
        if returncode != 0:
            if self.made_run_dir and set(os.listdir(self.run_dir)) <= {'.lock'}:  # made here, nothing of the run's
                shutil.rmtree(self.run_dir)
            cause = f'{errors[0]}; ' if errors else ''
            if self.length == 'performance':  # prepare_run_dir empties its folder: nothing is resumed
                cause = cause.replace(RESUME_ADVICE, 'a performance case starts afresh when launched again')
            code = next((c for c in exit_codes if c > 0), returncode)
            if any(e.startswith('stopped by') for e in errors) and all(c in (0, EXIT_PREEMPTED) for c in exit_codes):
                # the ranks saved and stopped; torchrun, stopped by the signal passed on or by Ctrl-C,
                # exits with 1 of its own
                code = EXIT_PREEMPTED
            if code < 0:  # killed by a signal: the shell's 128 + its number
                code = 128 - code
            raise CaseError(f'training failed (exit status {code}): {cause}the whole output is in '
                            f'{self.console_log}', exit_code=code)
        # what this launch appended (a resumed full run appends)
        steps = read_json_lines(os.path.join(self.run_dir, 'log.jsonl'), offsets['log.jsonl'])
        epochs = read_json_lines(os.path.join(self.run_dir, 'log.txt'), offsets['log.txt'])
        if had_finished and not steps:
            return self.nothing_trained(earlier_figures)
        if not steps or not epochs:
            raise CaseError(f'the run logged no training steps in {self.run_dir}; see {self.console_log}')
        with open(os.path.join(self.run_dir, 'log.jsonl')) as f:
            run_losses = parse_jsonl(f.read())  # the whole run's, every launch of a resumed full run
        return self.report(steps, epochs, run_losses, e2e_seconds)

    def nothing_trained(self, earlier_figures):
        """A launch of a full run that had finished: nothing trained, and the figures of the launch
        that finished it are put back."""
        for path, text in earlier_figures.items():
            with open(path, 'w') as f:
                f.write(text)
        kept = f'the figures of the launch that finished it stay in {self.summary_file}' if earlier_figures \
            else 'no figures of an earlier launch were there to keep'
        print(f'nothing was trained: the run in {self.run_dir} had finished (raise --epochs= to train it longer); '
              f'{kept}')
        return None

    def report(self, steps, epochs, run_losses, e2e_seconds):
        """steps, epochs: this launch's records of log.jsonl and log.txt; run_losses: {step: loss}
        of the whole run."""
        fps = epochs[-1]['train_ips']
        images_per_step = self.batch_size * self.accum_iter * self.nproc
        accuracy = epochs[-1].get('test_acc1')
        summary = {
            'Network': self.network,
            'RankSize': self.nproc,
            'BatchSize': self.batch_size,
            'DeviceType': platform.machine(),
            'CaseName': self.name,
            'ActualFPS': f'{fps:.2f}',
            'TrainingTime': f'{images_per_step * 1000 / fps:.2f}',
            'TrainAccuracy': 'None' if accuracy is None else f'{accuracy:.3f}',
            'ActualLoss': f"{steps[-1]['loss']:.6f}",
            'E2ETrainingTime': f'{e2e_seconds:.0f}',
            'MFU': 'n/a' if epochs[-1].get('train_mfu') is None else f"{epochs[-1]['train_mfu']:.4f}",
        }
        with open(self.loss_file, 'w') as f:
            f.writelines(f'{run_losses[step]:.6f}\n' for step in sorted(run_losses))
        with open(self.summary_file, 'w') as f:
            f.writelines(f'{key} = {value}\n' for key, value in summary.items())
        print('------------------ Final result ------------------')
        if len(steps) < 2:
            print(f'note: this launch logged one interval only, so its images/s includes the start-up: run more '
                  f'steps than --log_freq ({len(steps)} logged)')
        print(f"Final Performance images/sec : {summary['ActualFPS']}")
        print(f"Final MFU : {summary['MFU']}")
        if self.kind == 'finetune':
            print(f"Final Train Accuracy : {summary['TrainAccuracy']}")
        print(f"E2E Training Duration sec : {summary['E2ETrainingTime']}")
        print(f"summary: {self.summary_file}; run: {self.run_dir}")
        return summary


@contextlib.contextmanager
def stop_signals_passed_to(process, torchrun):
    """While the run goes on: Ctrl-C, which the terminal sends to the run too (it saves and stops),
    is ignored by the case, which waits for the run and then reports; SIGTERM and SIGUSR1 sent to
    the case alone are passed on to it."""

    def pass_on(signum, frame):
        # torchrun stops its ranks with SIGTERM when it gets one; SIGUSR1 would kill it outright
        process.send_signal(signal.SIGTERM if torchrun else signum)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    previous.update({signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGUSR1)})
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Console:
    """The case's stdout while it has a reader: one that goes away (`| head -1`) leaves the run, its
    console log and its report going (a BrokenPipeError stopped the case, its log cut short)."""

    def __init__(self):
        self.open = True

    def write(self, line):
        if self.open:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except BrokenPipeError:
                self.open = False
                stdout_to_devnull()


def file_size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def main(argv):
    if len(argv) < 3:
        raise CaseError('usage: modelzoo.py pretrain|finetune performance|full NPROC --data_path=... [--key=value]')
    kind, length, default_nproc = argv[:3]
    Case(kind, length, int(default_nproc), argv[3:]).run()


if __name__ == '__main__':
    skip_the_last_collection()
    try:
        main(sys.argv[1:])
    except CaseError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(e.exit_code)
    except BrokenPipeError:  # stdout's reader went away before the run's lines (Console): no traceback
        stdout_to_devnull()
        sys.exit(1)
    except OSError as e:  # the run folder or a file of the case that cannot be made or written
        where = f' ({e.filename})' if e.filename else ''
        print(f'error: {e.strerror or e}{where}: give an --output_dir= you can write to', file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:  # a python3 without the project's requirements ran the script
        print(f'error: {sys.executable} has no module {e.name!r}: run the script with the Python that has the '
              f'requirements (activate its virtual environment, or PYTHON=/path/to/python bash ...)', file=sys.stderr)
        sys.exit(2)
