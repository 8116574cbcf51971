"""What every entry point does around the training loop, written once: joining the run
(processes, device, precision, the output folder), resuming, and the closing lines. The shared
flags are util/flags.py's, torch.compile is util/compiling.py's."""
import json
import os
import shlex

from util import checkpoint, dist, signals
from util.compiling import resolve_compile
from util.determinism import alignment_summary, watch_nondeterministic_kernels
from util.device import resolve_device
from util.engine import Progress
from util.errors import UsageError, say_on_this_rank
from util.flags import check_run_args
from util.logger import counted
from util.output_dir import lock_output_dir, make_log_dir


def start_run(args, deterministic=False, unused_flags=(), writes=True):
    """Join the run: this process's rank, its device, the process group, the precision.
    `deterministic` asks the device for run-to-run identical arithmetic (--align); the flags named
    in `unused_flags` (those of training, in an evaluation) are left out of the printed arguments;
    a run that `writes` nothing (an evaluation) neither locks --output_dir nor makes --log_dir, so
    that a read-only folder of checkpoints can be evaluated.

    returns: (world, device, precision)
    """
    check_run_args(args)
    world = dist.read_world_from_env()
    device = resolve_device(args.device, world.local_rank)
    if deterministic:
        device.use_deterministic_algorithms()
        watch_nondeterministic_kernels()
    else:
        device.use_fast_fp32()
    dist.init_process_group(world, device)
    signals.join_agreement_group()
    if writes:
        lock_for_every_rank(args.output_dir)
    precision = device.resolve_precision(args.precision)
    resolve_compile(args, device.type, deterministic)
    args.log_dir = args.log_dir or args.output_dir
    if writes and args.log_dir and args.log_dir != args.output_dir and dist.is_main_process():
        make_log_dir(args.log_dir)
    processes = counted(world.world_size, 'process', 'processes')
    print(f'device: {device.torch_device} x {processes}, precision: {precision}')
    if device.type == 'cpu' and precision == 'fp16':  # mae_vit_tiny at 64 px, 1 core: 6.5 images/s, fp32 61.9
        print('warning: fp16 on the CPU has few fast kernels and trains several times slower than fp32; it is '
              'there to check a GPU recipe\'s loss scaling, not for speed')
    print(json.dumps({key: value for key, value in vars(args).items() if key not in unused_flags}, indent=1))
    return world, device, precision


def lock_for_every_rank(output_dir):
    """Rank 0 locks --output_dir (util.output_dir); where it cannot (another run holds it, the folder
    cannot be written), every rank stops with its line before any of them reads the folder: the
    others went on to resume the other run's checkpoint-last.pth, and failed on its flags."""
    if not output_dir:
        return
    problem = None
    if dist.is_main_process():
        try:
            lock_output_dir(output_dir)
        except UsageError as e:
            problem = str(e)
    problem = signals.main_process_value(problem)
    if problem:
        raise UsageError(problem)


def resume_training(args, model, optimizer, scaler, train_images, ema=None):
    """Continue from --resume, or from <output_dir>/checkpoint-last.pth when a run left one.
    `train_images` (the data set's size) goes into args, so that every checkpoint records it and a
    resumption over another number of images says so.

    returns: (start_epoch, start_iter, progress)
    """
    args.train_images = train_images
    if not args.output_dir:  # the official code's way to keep nothing, and what an unset shell variable gives
        kept = 'checkpoint, log.txt or log.jsonl (only --log_dir\'s TensorBoard files)' if args.log_dir else \
            'checkpoint, log or TensorBoard file'
        print(f'warning: --output_dir is empty: this run writes no {kept}; give a folder to keep them', flush=True)
    start_epoch, start_iter, progress = args.start_epoch, 0, Progress()
    resume = checkpoint.training_resume_path(args)
    if resume and args.resume and resume != args.resume:
        print(f'{resume} continues {args.resume} (this command\'s run, launched before): resuming it, not '
              f'{args.resume} again')
    if resume:
        start_epoch, epoch_samples, carried = checkpoint.restore_training_state(resume, model, optimizer, scaler,
                                                                                args, ema=ema)
        progress = Progress(**carried)
        start_iter = epoch_samples // dist.micro_batch_images(args)
        if carried:
            check_another_runs_folder(resume, args.output_dir)
            print(f'resumed from {resume}: epoch {start_epoch}, {epoch_samples} of its samples done, '
                  f'step {progress.step}')
        else:
            start_afresh_from_weights(resume, args)
    elif args.output_dir and os.path.isfile(os.path.join(args.output_dir, 'log.jsonl')):
        print(f'warning: {args.output_dir} holds the log.jsonl and log.txt of an earlier run, and no checkpoint to '
              f'resume: this run appends its own lines after them (another --output_dir keeps runs apart)')
    if start_epoch >= args.epochs:
        if not resume:
            raise UsageError(f'--start_epoch {start_epoch} is not below --epochs {args.epochs}: nothing would train')
        print(f'nothing to train: {resume} has finished {start_epoch} epochs, and --epochs is {args.epochs} '
              f'(raise --epochs to train longer)')
    else:
        print(f'training epochs {start_epoch} to {args.epochs - 1}')
    return start_epoch, start_iter, progress


def check_another_runs_folder(path, output_dir):
    """--resume of a checkpoint outside --output_dir into a folder that holds a run's own
    checkpoint-last.pth would overwrite that run's checkpoint (and mix both runs' logs): refused.
    A checkpoint of the folder itself (an earlier epoch's, to go back to it) continues its run."""
    if not checkpoint.resume_path(None, output_dir) or checkpoint.in_folder(path, output_dir):
        return
    raise UsageError(f'{output_dir} holds the checkpoint-last.pth of another run, which continuing {path} there '
                     f'would overwrite: give another --output_dir, or leave --resume out to continue the run of '
                     f'{output_dir}')


def start_afresh_from_weights(path, args):
    """--resume of weights alone (a release, say): training starts at epoch 0 from them, as the
    official code does, in an --output_dir that holds no run whose checkpoint it would overwrite."""
    last = checkpoint.resume_path(None, args.output_dir)  # the folder's run, if one is there
    if last and not os.path.samefile(last, path):
        raise UsageError(f'{args.output_dir} holds the checkpoint-last.pth of a run, which this one, starting afresh '
                         f'from the weights of {path}, would overwrite: give another --output_dir (or --resume {last} '
                         f'to continue that run)')
    print(f'{path} holds weights only (no optimizer state, no epoch): training starts at epoch 0 from them')


def print_outputs(args, stats, seconds, bad_images=None):
    """The closing lines: time, throughput, final loss, replaced images, and where the files are."""
    print(f'training time {seconds:.0f} s')
    if bad_images is not None and bad_images.poll():  # each rank its own
        say_on_this_rank(f'unreadable images replaced by other samples in this process: {bad_images.replacements} '
                         f'({counted(len(bad_images.files), "file")}, listed in {bad_images.path})')
    if stats:
        if stats.get('ips_holds_start_up'):
            throughput = (f"throughput: {stats['ips']:.1f} images/s over the one logged interval, start-up included "
                          f"(log more steps than --log_freq for a steady-state figure)")
        else:
            throughput = f"steady-state throughput: {stats['ips']:.1f} images/s"
        epoch = 'the last epoch' if stats.get('complete', True) else 'the last epoch (unfinished)'
        print(f"{throughput}; mean loss of {epoch} {stats['loss']:.4f}")
    if getattr(args, 'align', False):
        print(alignment_summary())
    if args.output_dir:
        print(f'checkpoint: {os.path.join(args.output_dir, checkpoint.LAST)}\n'
              f'logs: {os.path.join(args.output_dir, "log.jsonl")} (steps), '
              f'{os.path.join(args.output_dir, "log.txt")} (epochs)')
    log_dir = getattr(args, 'log_dir', None)  # start_run's: --log_dir, else --output_dir
    if log_dir:  # a command to paste: quoted, and a folder named -x not taken for an option
        log_dir = os.path.join('.', log_dir) if log_dir.startswith('-') else log_dir
        print(f'TensorBoard: tensorboard --logdir {shlex.quote(log_dir)}')
