"""The ModelZoo scripts (test/*_performance_*.sh, test/*_full_8p.sh) as accelerator teams run
them: on the CPU here, with tiny models, the demo data and a few steps (the 8-device scripts with
--nproc=2). Their reported figures are checked against what the test knows by itself: the
arguments, the run's own logs and the clock."""
import glob
import os
import re
import signal
import sys
import time
from collections import namedtuple

import pytest

from helpers import REPO, read_jsonl, run_script

sys.path.insert(0, os.path.join(REPO, 'test'))
import modelzoo  # noqa: E402

TINY = ['--num_workers', '1', '--device=cpu', '--data_path=demo']
PRETRAIN = ['--model=mae_vit_tiny', '--batch_size=16', '--input_size', '64', *TINY]
FINETUNE = ['--model=vit_tiny_patch8', '--batch_size=16', '--input_size', '32', *TINY]  # 32 px: a quarter of the tokens
SUMMARY_KEYS = ['Network', 'RankSize', 'BatchSize', 'DeviceType', 'CaseName', 'ActualFPS', 'TrainingTime',
                'TrainAccuracy', 'ActualLoss', 'E2ETrainingTime', 'MFU']


Launch = namedtuple('Launch', 'stdout seconds')


def run_case(script, *args, cwd=None):
    """A ModelZoo script as a user runs it. returns: Launch(its stdout, the seconds it took by
    this process's clock)"""
    start = time.time()
    result = run_script('bash', os.path.join('test', script), *args) if cwd is None else \
        run_script('bash', script, *args, cwd=cwd)
    seconds = time.time() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return Launch(result.stdout, seconds)


def read_summary(path):
    with open(path) as f:
        return dict(line.rstrip('\n').split(' = ', 1) for line in f)


def final_figure(stdout, label):
    return float(re.search(rf'^{re.escape(label)} : (\S+)$', stdout, re.MULTILINE).group(1))


def images_per_second_by_the_clock(records, images_per_step):
    """Images trained between the first and the last logged step over the wall-clock time between
    them (the `time` of log.jsonl), with the images counted here from the case's batch size,
    accumulation and number of processes."""
    images = (records[-1]['step'] - records[0]['step']) * images_per_step
    return images / (records[-1]['time'] - records[0]['time'])


def check_case(launch, output_dir, case_name, batch_size, accum_iter, nproc, finetune):
    """The summary file and the console's final figures of a case, each against what the test
    knows by itself: the arguments it gave, the run's log.jsonl and log.txt, the clock's time
    between logged steps and the time the script took."""
    stdout, seconds = launch
    summary = read_summary(os.path.join(output_dir, f'{case_name}.log'))
    assert list(summary) == SUMMARY_KEYS
    assert summary['CaseName'] == case_name
    assert (summary['BatchSize'], summary['RankSize']) == (str(batch_size), str(nproc))
    records = read_jsonl(os.path.join(output_dir, case_name, 'log.jsonl'))
    epochs = read_jsonl(os.path.join(output_dir, case_name, 'log.txt'))
    images_per_step = batch_size * accum_iter * nproc
    by_the_clock = images_per_second_by_the_clock(records, images_per_step)
    for fps in (float(summary['ActualFPS']), final_figure(stdout, 'Final Performance images/sec')):
        assert fps == pytest.approx(epochs[-1]['train_ips'], abs=0.005)  # the loop's steady-state figure
        # the clock's time between log steps also holds the logging itself: a few percent
        assert fps == pytest.approx(by_the_clock, rel=0.15)
    # one optimizer step in ms, from the logged images/s
    assert float(summary['TrainingTime']) == pytest.approx(images_per_step * 1000 / epochs[-1]['train_ips'],
                                                           rel=1e-3, abs=0.005)
    assert float(summary['ActualLoss']) == pytest.approx(records[-1]['loss'], abs=1e-6)
    with open(os.path.join(output_dir, f'train_{case_name}_loss.txt')) as f:
        assert [float(v) for v in f.read().split()] == pytest.approx([r['loss'] for r in records], abs=1e-6)
    # the launch took at least the logged steps' span and at most the script's time (whole seconds)
    for e2e in (float(summary['E2ETrainingTime']), final_figure(stdout, 'E2E Training Duration sec')):
        assert records[-1]['time'] - records[0]['time'] - 0.5 <= e2e <= seconds + 0.5
    with open(os.path.join(output_dir, f'train_{case_name}.log')) as f:
        assert 'train.loss : ' in f.read()  # the console, copied
    if finetune:
        accuracy = epochs[-1]['test_acc1']
        assert float(summary['TrainAccuracy']) == pytest.approx(accuracy, abs=1e-3)
        assert final_figure(stdout, 'Final Train Accuracy') == pytest.approx(accuracy, abs=1e-3)
    else:
        assert summary['TrainAccuracy'] == 'None' and 'Final Train Accuracy' not in stdout
    return summary


def test_pretrain_performance_1p_then_a_diverging_launch_starts_afresh_and_exits_3(demo_root, tmp_path, capsys):
    # 8 steps: a log every 2 steps, so that the first interval (start-up) can be left out
    launch = run_case('pretrain_performance_1p.sh', *PRETRAIN, '--max_steps=8', '--peak_tflops=0.5',
                      f'--output_dir={tmp_path}')
    case = 'mae_vit_tiny_pretrain_bs16_1p_perf'
    summary = check_case(launch, tmp_path, case, 16, 1, 1, finetune=False)
    assert summary['Network'] == 'mae_vit_tiny_pretrain'
    assert [r['step'] for r in read_jsonl(tmp_path / case / 'log.jsonl')] == [2, 4, 6, 8]
    assert 'note: this launch logged one interval' not in launch.stdout
    # MFU: the last epoch's, against the peak given (no CPU has one in util.flops)
    assert summary['MFU'] == f"{read_jsonl(tmp_path / case / 'log.txt')[-1]['train_mfu']:.4f}"
    assert re.search(r'^Final MFU : [0-9.]+$', launch.stdout, re.MULTILINE)
    # the console the script wrote is a loss log that compare_loss.py lines up with log.jsonl
    import compare_loss
    assert compare_loss.main([str(tmp_path / f'train_{case}.log'), str(tmp_path / case / 'log.jsonl')]) == 0
    compared = capsys.readouterr().out
    assert 'steps: 4 compared' in compared
    mean_relative_error = re.search(r'^MeanRelativeError: (\S+)$', compared, re.MULTILINE).group(1)
    assert float(mean_relative_error) == pytest.approx(0, abs=1e-6)

    # a performance run starts afresh in the same folder, run by $PYTHON (else the active venv's
    # python, else python3); the script exits with the run's own status: 3 for a loss that diverged
    wrapper = tmp_path / 'bin' / 'python'
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$0" > {tmp_path / "used"}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    result = run_script('bash', os.path.join('test', 'pretrain_performance_1p.sh'), *PRETRAIN, '--max_steps=4',
                        '--log_freq=1', '--num_workers', '0', '--blr', '1e30', f'--output_dir={tmp_path}',
                        env={'PYTHON': '', 'VIRTUAL_ENV': str(tmp_path)})
    assert (tmp_path / 'used').read_text().strip() == str(wrapper)
    assert result.returncode == 3, result.stderr[-2000:]
    # the first launch's figures are gone with it: a harvester finds no summary of the failed one
    assert not (tmp_path / f'{case}.log').exists() and not (tmp_path / f'train_{case}_loss.txt').exists()
    assert result.stderr.strip().splitlines()[-1].startswith('error: training failed (exit status 3): the loss is nan')
    assert 'no checkpoint had been written' in result.stderr  # the run started afresh and stopped before one
    steps = [r['step'] for r in read_jsonl(tmp_path / case / 'log.jsonl')]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 4  # none of the first launch's
    with open(tmp_path / f'train_{case}.log') as f:
        assert f.read().count('train.loss : ') == len(steps)


def test_a_launch_that_logged_one_interval_says_its_figure_holds_the_start_up(tmp_path, capsys):
    case = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', f'--output_dir={tmp_path}'])
    case.report([{'step': 3, 'loss': 1.5}], [{'train_ips': 10.0}], {3: 1.5}, e2e_seconds=4)
    assert 'note: this launch logged one interval only' in capsys.readouterr().out
    case.report([{'step': 2, 'loss': 1.5}, {'step': 4, 'loss': 1.4}], [{'train_ips': 10.0}], {2: 1.5, 4: 1.4},
                e2e_seconds=4)
    assert 'note: this launch' not in capsys.readouterr().out


def test_pretrain_full_then_finetune_full_and_resume(demo_root, tmp_path):
    # launched from the test folder: a relative --output_dir= is the caller's, not the repository root's
    relative = os.path.relpath(tmp_path, os.path.join(REPO, 'test'))
    launch = run_case('pretrain_full_8p.sh', *PRETRAIN, '--nproc=2', '--accum_iter=2', '--epochs=1',
                      '--max_steps=4', '--log_freq=2', f'--output_dir={relative}', cwd=os.path.join(REPO, 'test'))
    case = 'mae_vit_tiny_pretrain_bs16_2p_acc'
    check_case(launch, tmp_path, case, 16, 2, 2, finetune=False)
    assert 'effective batch size 64' in launch.stdout and 'device: cpu x 2 processes' in launch.stdout

    # a full run resumes its folder; its loss file holds the whole run's losses, in step order
    out, _ = run_case('pretrain_full_8p.sh', *PRETRAIN, '--nproc=2', '--accum_iter=2', '--epochs=1',
                      '--max_steps=2', '--log_freq=1', f'--output_dir={tmp_path}')
    assert 'resumed from' in out
    records = read_jsonl(tmp_path / case / 'log.jsonl')
    assert [r['step'] for r in records] == [2, 4, 5, 6]
    with open(tmp_path / f'train_{case}_loss.txt') as f:
        assert [float(v) for v in f.read().split()] == pytest.approx([r['loss'] for r in records], abs=1e-6)

    checkpoint = tmp_path / case / 'checkpoint-last.pth'
    # one process (two fine-tune in test_finetune's test_two_process_evaluation_is_exact)
    launch = run_case('finetune_full_8p.sh', *FINETUNE, '--nproc=1', '--accum_iter=1', '--epochs=1',
                      '--max_steps=3', '--log_freq=1', f'--finetune_pth={checkpoint}', f'--output_dir={tmp_path}')
    check_case(launch, tmp_path, 'vit_tiny_patch8_finetune_bs16_1p_acc', 16, 1, 1, finetune=True)
    assert 'mode: finetune' in launch.stdout


def test_a_finetune_case_without_a_checkpoint_says_it_trains_from_scratch(tmp_path, capsys):
    """(The fine-tuning performance scripts run the full case's code with a fixed number of steps:
    the launch above and the unit tests below cover them.)"""
    scratch = modelzoo.Case('finetune', 'performance', 1, ['--data_path=demo', f'--output_dir={tmp_path}'])
    assert '--finetune' not in scratch.entry_point_args()
    scratch.prepare_run_dir()
    assert 'no --finetune_pth=: supervised training from scratch' in capsys.readouterr().out
    pretrained = modelzoo.Case('finetune', 'performance', 1, ['--data_path=demo', f'--output_dir={tmp_path}',
                                                              f'--finetune_pth={tmp_path}/ckpt.pth'])
    args = pretrained.entry_point_args()
    assert args[args.index('--finetune') + 1] == f'{tmp_path}/ckpt.pth'
    pretrained.prepare_run_dir()
    assert 'from scratch' not in capsys.readouterr().out


def test_every_script_runs_the_case_its_name_says():
    """Each ModelZoo script is one line over common.sh's run_case: <kind>_<mode>_<devices>p.sh runs
    that case (the launches above run three of the six, the 8-device ones with --nproc=2; this keeps
    the others from drifting)."""
    scripts = sorted(glob.glob(os.path.join(REPO, 'test', '*_*_*p.sh')))
    assert len(scripts) == 6
    for script in scripts:
        kind, mode, devices = re.fullmatch(r'(\w+?)_(\w+)_(\d+)p\.sh', os.path.basename(script)).groups()
        with open(script) as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
        assert lines == ['. "$(dirname "$(readlink -f "${BASH_SOURCE:-$0}")")/common.sh"  # the real folder of a '
                         'linked script', f'run_case {kind} {mode} {devices} "$@"'], script


def test_help_prints_the_scripts_header():
    """--help (or -h) was an error asking for --data_path=: it prints the script's header comment, what
    it runs and its keys, and runs nothing."""
    for script in sorted(glob.glob(os.path.join(REPO, 'test', '*_*_*p.sh'))):
        with open(script) as f:
            header = [line[2:].rstrip('\n') for line in f.readlines()[1:] if line.startswith('# ')]
        for flag in ('--help', '-h'):
            result = run_script('bash', script, '--device=cpu', flag)
            assert result.returncode == 0 and result.stdout.splitlines() == header, result.stdout + result.stderr
        assert 'Keys: --data_path=' in result.stdout


@pytest.mark.parametrize('script, args, message', [
    ('pretrain_performance_1p.sh', ['--model=mae_vit_tiny'], '--data_path= is required'),
    ('finetune_performance_1p.sh', ['--data_path=demo', '--finetune=x.pth'], 'as --finetune_pth=PATH'),
    ('finetune_full_8p.sh', ['--data_path=demo', '--nproc=two'], '--nproc= must be a whole number'),
])  # the run's own errors: test_pretrain_performance_1p_then_a_diverging_launch_starts_afresh_and_exits_3
def test_bad_input_is_a_clear_error(script, args, message, tmp_path):
    result = run_script('bash', os.path.join('test', script), *args, f'--output_dir={tmp_path}')
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: ') and message in last_line


def test_a_console_reader_that_goes_away_leaves_the_case_going(monkeypatch):
    """`bash test/x.sh ... | head -1`: echoing the run's next line raised BrokenPipeError, which stopped the case
    (its console log cut short, no report)."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, 'w') as stdout:
        monkeypatch.setattr(sys, 'stdout', stdout)
        console = modelzoo.Console()
        console.write('first\n')
        assert os.read(read_end, 100) == b'first\n'
        os.close(read_end)  # as head does after its line
        for line in ('second\n', 'third\n'):
            console.write(line)
        assert not console.open
        monkeypatch.undo()


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path):
    """A file given as --output_dir= (or a read-only one, a run folder that is a link) ended in a traceback."""
    (tmp_path / 'file').write_text('')
    result = run_script('bash', os.path.join('test', 'pretrain_performance_1p.sh'), '--data_path=demo',
                        '--model=mae_vit_tiny', f'--output_dir={tmp_path / "file"}')
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: Not a directory ({tmp_path / 'file' / 'mae_vit_tiny_pretrain_bs64_1p_perf'}): give an --output_dir= "
        f"you can write to"], result.stderr[-2000:]


@pytest.mark.skipif(not os.path.exists('/bin/sh'), reason='needs a POSIX shell at /bin/sh')
def test_sh_is_told_to_use_bash_and_a_linked_script_finds_its_folder(tmp_path):
    """`sh test/x.sh` (dash on Debian, Ubuntu) said `Bad substitution`; a script linked from
    elsewhere looked for common.sh beside the link."""
    script = os.path.join('test', 'pretrain_performance_1p.sh')
    result = run_script('sh', script, '--data_path=demo', f'--output_dir={tmp_path}')
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f'error: the ModelZoo scripts are bash scripts: run them as bash {script} ...']
    os.symlink(os.path.join(REPO, script), tmp_path / 'linked.sh')
    result = run_script('bash', tmp_path / 'linked.sh', '--data_path=demo', '--batch_size=0', cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --batch_size= must be a whole number above 0, got '0'"]


def test_a_python_without_the_requirements_is_one_line(tmp_path):
    """$PYTHON unset and no virtual environment active: the scripts fall back to python3, which may be
    the system's, without torch (here: this Python with torch hidden)."""
    wrapper = tmp_path / 'python3'
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -c "import runpy, sys; sys.modules[\'torch\'] = None; '
                       f'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name=\'__main__\')" "$@"\n')
    wrapper.chmod(0o755)
    result = run_script('bash', os.path.join('test', 'pretrain_performance_1p.sh'), '--data_path=demo',
                        f'--output_dir={tmp_path}', env={'PYTHON': '', 'VIRTUAL_ENV': '',
                                                          'PATH': f'{tmp_path}:{os.environ["PATH"]}'})
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {sys.executable} has no module 'torch': run the script with the Python that has the requirements "
        f"(activate its virtual environment, or PYTHON=/path/to/python bash ...)")


def test_a_batch_that_does_not_reach_the_recipes_effective_batch_is_refused():
    # the script prints a CaseError as the one line above, with its exit code
    for kind in ('finetune', 'pretrain'):  # DeiT's 1024, MAE's 4096
        with pytest.raises(modelzoo.CaseError, match='effective batch of .* which 48 images x 8 devices does not '
                                                     'divide') as error:
            modelzoo.Case(kind, 'full', 8, ['--data_path=demo', '--batch_size=48'])
        assert error.value.exit_code == 2


def test_full_cases_accumulate_to_the_published_effective_batch():
    pretrain = modelzoo.Case('pretrain', 'full', 8, ['--data_path=demo'])
    args = pretrain.entry_point_args()
    # MAE: 64 images x 8 devices x 8 micro-batches = 4096; the epochs are the entry point's (800)
    assert args[args.index('--batch_size') + 1] == '64' and args[args.index('--accum_iter') + 1] == '8'
    assert '--epochs' not in args and '--max_steps' not in args
    finetune = modelzoo.Case('finetune', 'full', 8, ['--data_path=demo', '--finetune_pth=x.pth', '--nproc=4'])
    args = finetune.entry_point_args()
    # MAE fine-tuning: 32 x 4 x 8 = 1024
    assert args[args.index('--accum_iter') + 1] == '8' and args[args.index('--finetune') + 1].endswith('x.pth')
    assert finetune.name == 'vit_base_patch16_finetune_bs32_4p_acc'


def test_performance_cases_run_a_fixed_number_of_steps_and_pass_other_flags_on():
    case = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', '--mask_ratio', '0.6', '--compile'])
    args = case.entry_point_args()
    assert args[args.index('--max_steps') + 1] == str(modelzoo.PERFORMANCE_STEPS)
    assert args[args.index('--accum_iter') + 1] == '1'
    assert args[-3:] == ['--mask_ratio', '0.6', '--compile']


def test_align_passed_through_a_script_logs_every_step():
    args = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', '--align']).entry_point_args()
    assert '--log_freq' not in args and '--align' in args


def test_one_process_runs_the_entry_point_itself_and_a_killed_run_exits_as_a_shell_says(tmp_path, monkeypatch):
    one = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', f'--output_dir={tmp_path}'])
    assert one.command()[:2] == [sys.executable, os.path.join(REPO, 'main_pretrain.py')]
    two = modelzoo.Case('pretrain', 'performance', 2, ['--data_path=demo']).command()
    assert two[1:5] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    # a run killed by SIGKILL: exit status 128 + 9, as a shell reports it (not Python's -9)
    monkeypatch.setattr(one, 'command', lambda: [sys.executable, '-c', 'import os; os.kill(os.getpid(), 9)'])
    ctrl_c = signal.getsignal(signal.SIGINT)
    with pytest.raises(modelzoo.CaseError, match=r'training failed \(exit status 137\)') as error:
        one.run()
    assert error.value.exit_code == 137
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # ignored only while the run stops by itself


def test_a_finished_full_case_launched_again_keeps_its_figures(tmp_path, monkeypatch, capsys):
    """A full case whose run had finished trains nothing when launched again (the entry point says
    `nothing to train: ...` and exits 0): the figures of the launch that finished it are kept, and
    the case ends well. A launch that logs no step for another reason fails and leaves none."""
    case = modelzoo.Case('pretrain', 'full', 1, ['--data_path=demo', f'--output_dir={tmp_path}'])
    figures = {case.summary_file: 'Network = mae_vit_base_pretrain\nActualFPS = 12.50\n', case.loss_file: '0.5\n0.4\n'}
    for path, text in figures.items():
        with open(path, 'w') as f:
            f.write(text)
    finished = 'print("nothing to train: checkpoint-last.pth has finished 800 epochs, and --epochs is 800")'
    monkeypatch.setattr(case, 'command', lambda: [sys.executable, '-c', finished])
    assert case.run() is None
    assert 'nothing was trained: the run in ' in capsys.readouterr().out
    for path, text in figures.items():
        with open(path) as f:
            assert f.read() == text
    monkeypatch.setattr(case, 'command', lambda: [sys.executable, '-c', 'pass'])
    with pytest.raises(modelzoo.CaseError, match='the run logged no training steps'):
        case.run()
    assert not any(os.path.exists(path) for path in figures)


def test_ctrl_c_of_a_torchrun_case_whose_ranks_saved_exits_4(tmp_path, monkeypatch):
    """Ctrl-C reaches torchrun too, which exits 1 with its own traceback and no `exitcode :` report,
    after its ranks saved and stopped: the case reports the stop (4), not a failure (1). A rank that
    failed otherwise keeps its code."""
    case = modelzoo.Case('pretrain', 'performance', 2, ['--data_path=demo', f'--output_dir={tmp_path}'])
    stopped = ('print("error: stopped by SIGINT after step 8 (epoch 0); checkpoint-last.pth is written: run the '
               'same command again to resume", flush=True); raise SystemExit(1)')
    monkeypatch.setattr(case, 'command', lambda: [sys.executable, '-c', stopped])
    with pytest.raises(modelzoo.CaseError, match=r'^training failed \(exit status 4\): stopped by SIGINT') as error:
        case.run()
    assert error.value.exit_code == 4
    # a performance case is run afresh at each launch (its folder emptied): the run's advice to resume is not its
    assert '(epoch 0); a performance case starts afresh when launched again; the whole output' in str(error.value)
    full = modelzoo.Case('pretrain', 'full', 2, ['--data_path=demo', f'--output_dir={tmp_path}'])
    monkeypatch.setattr(full, 'command', lambda: [sys.executable, '-c', stopped])
    with pytest.raises(modelzoo.CaseError, match='checkpoint-last.pth is written: run the same command again to '
                                                 'resume; the whole output'):
        full.run()
    crashed = stopped.replace('raise SystemExit(1)', 'print("  exitcode  : 3 (pid: 7)"); raise SystemExit(1)')
    monkeypatch.setattr(case, 'command', lambda: [sys.executable, '-c', crashed])
    with pytest.raises(modelzoo.CaseError) as error:
        case.run()
    assert error.value.exit_code == 3


def test_sigterm_to_the_script_alone_stops_the_run_cleanly(demo_root, tmp_path):
    """`timeout`, `kill <pid>` or a container's first process signal the script alone: the case
    passes the signal on, and the run saves and stops with 4 (the case was killed, and the run
    died writing to the pipe of a case that was gone, with no checkpoint)."""
    import subprocess
    process = subprocess.Popen(['bash', os.path.join('test', 'pretrain_performance_1p.sh'), *PRETRAIN,
                                '--max_steps=200', '--log_freq=1', f'--output_dir={tmp_path}'], cwd=REPO,
                               env={**os.environ, 'PYTHON': sys.executable}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = tmp_path / 'mae_vit_tiny_pretrain_bs16_1p_perf' / 'log.jsonl'
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline and not (log.exists() and len(read_jsonl(log)) >= 2):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)  # the script's process (it execs the case), not its group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 4, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith('error: training failed (exit status 4): stopped by SIGTERM')
    assert (log.parent / 'checkpoint-last.pth').exists()


def test_a_case_leaves_alone_the_folder_of_a_launch_still_running(tmp_path, monkeypatch):
    """A second launch of a case whose run is still going (its folder locked) refuses before it
    touches anything: a performance case emptied the live run's folder, and a full one that failed
    removed a folder holding only the lock of the run still starting."""
    import subprocess
    case = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', f'--output_dir={tmp_path}'])
    monkeypatch.setattr(case, 'command', lambda: [sys.executable, '-c', 'pass'])  # no run, whatever happens
    os.makedirs(case.run_dir)
    holds = ('import fcntl, sys, time; f = open(sys.argv[1] + "/.lock", "a+"); fcntl.flock(f, fcntl.LOCK_EX); '
             'f.write("pid 123 on host\\n"); f.flush(); print("held", flush=True); time.sleep(120)')
    holder = subprocess.Popen([sys.executable, '-c', holds, case.run_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(modelzoo.CaseError, match=r'another launch is running this case in .* \(pid 123 on host\)'):
            case.run()
        assert os.listdir(case.run_dir) == ['.lock']  # left as it was
    finally:
        holder.kill()
        holder.wait()


def test_a_flag_the_entry_point_refuses_is_named_in_the_scripts_last_line(tmp_path, monkeypatch):
    case = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', f'--output_dir={tmp_path}'])
    refuses = 'import argparse; argparse.ArgumentParser(prog="main_pretrain.py").parse_args(["--foo=1"])'
    monkeypatch.setattr(case, 'command', lambda: [sys.executable, '-c', refuses])
    with pytest.raises(modelzoo.CaseError) as error:
        case.run()
    assert str(error.value).startswith('training failed (exit status 2): unrecognized arguments: --foo=1; ')


def test_a_one_process_case_in_a_slurm_allocation_of_several_tasks_is_a_world_of_one(monkeypatch):
    from util.dist import read_world_from_env
    for name, value in (('SLURM_PROCID', '0'), ('SLURM_NTASKS', '8'), ('SLURM_LOCALID', '0')):
        monkeypatch.setenv(name, value)
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    env = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo']).environment()
    monkeypatch.setattr(os, 'environ', env)  # the case's process reads its world from it
    assert read_world_from_env().world_size == 1


def test_a_device_id_picks_the_card_of_a_one_device_case(monkeypatch):
    for name in ('ASCEND_DEVICE_ID', 'CUDA_VISIBLE_DEVICES', 'ASCEND_RT_VISIBLE_DEVICES', 'SDAA_VISIBLE_DEVICES'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('DEVICE_ID', '3')
    env = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', '--device=npu']).environment()
    assert env['ASCEND_RT_VISIBLE_DEVICES'] == '3' and 'CUDA_VISIBLE_DEVICES' not in env
    assert modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo']).output_dir == \
        os.path.join(REPO, 'test', 'output', '3')
    # eight processes see all the cards; a visibility the user set is kept
    assert 'ASCEND_RT_VISIBLE_DEVICES' not in modelzoo.Case(
        'pretrain', 'performance', 8, ['--data_path=demo', '--device=npu']).environment()
    monkeypatch.setenv('ASCEND_RT_VISIBLE_DEVICES', '5')
    env = modelzoo.Case('pretrain', 'performance', 1, ['--data_path=demo', '--device=npu']).environment()
    assert env['ASCEND_RT_VISIBLE_DEVICES'] == '5'


def test_relative_paths_are_the_callers(tmp_path, monkeypatch):
    monkeypatch.setenv('CASE_CALLER_DIR', str(tmp_path))
    case = modelzoo.Case('finetune', 'full', 8, ['--data_path=imagenet', '--finetune_pth=ckpt.pth',
                                                 '--output_dir=out'])
    args = case.entry_point_args()
    assert args[args.index('--data_path') + 1] == str(tmp_path / 'imagenet')
    assert args[args.index('--finetune') + 1] == str(tmp_path / 'ckpt.pth')
    assert case.run_dir == str(tmp_path / 'out' / case.name)
