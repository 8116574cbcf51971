"""What every entry point does around the training loop, written once: the flags they share,
joining the run (processes, device, precision), the learning rate from the base rate,
resumption, and the summary printed at the end."""
import argparse
import hashlib
import json
import math
import os
import socket
import warnings

import torch

from util import checkpoint, dist, signals
from util.device import AUTO_ORDER, PRECISIONS, resolve_device
from util.datasets import default_num_workers
from util.engine import Progress
from util.errors import UsageError, first_line
from util.images import DEFAULT_MAX_BAD_IMAGES
from util.lr_sched import SCHEDULES


def add_schedule_args(parser, recipe_note):
    """Batch, schedule and optimizer flags. Their defaults (None here) are the published recipe,
    filled in by `apply_recipe` once the model (and the mode) is known; `recipe_note(flag)` says
    in --help what the default is."""
    def add(flag, help_text, **kwargs):
        parser.add_argument(f'--{flag}', default=None, help=f'{help_text}; {recipe_note(flag)}', **kwargs)
    add('batch_size', 'images per device per step; effective batch = batch_size * accum_iter * devices', type=int)
    add('epochs', 'epochs to train', type=int)
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='accumulate gradients over this many micro-batches per optimizer step')
    add('weight_decay', 'weight decay', type=float)
    parser.add_argument('--lr', type=float, default=None, help='absolute learning rate (default: blr * batch / 256)')
    add('blr', 'base learning rate: lr = blr * effective batch size / 256', type=float)
    add('min_lr', 'absolute lower bound of the cosine schedule (else min_blr * batch / 256)', type=float)
    add('min_blr', 'lower bound of the cosine schedule per 256 images', type=float)
    add('warmup_epochs', 'epochs of linear warm-up', type=int)
    add('warmup_lr', 'absolute lr the warm-up starts from (else warmup_blr * batch / 256)', type=float)
    add('warmup_blr', 'lr the warm-up starts from, per 256 images', type=float)
    add('lr_schedule', 'after the warm-up: cosine (from the end of the warm-up), cosine_whole_run (SimMIM: '
                       'over all epochs, the warm-up replacing its start) or step (x lr_gamma at each of '
                       'lr_milestones)', choices=SCHEDULES)
    add('lr_milestones', 'epochs at which the step schedule multiplies the lr by lr_gamma', type=int, nargs='+')
    add('lr_gamma', 'factor of the step schedule', type=float)
    add('opt_betas', 'AdamW betas', type=float, nargs=2, metavar=('BETA1', 'BETA2'))
    add('clip_grad', 'clip the gradient norm to this value (0: off)', type=float)


BOUND_FORMS = (('min_lr', 'min_blr'), ('warmup_lr', 'warmup_blr'))  # absolute, per 256 images


def merge_recipes(base, override):
    """`base` updated by `override`, where a bound that `override` gives in one form (absolute or
    per 256 images) replaces both forms of it in `base`."""
    merged = dict(base)
    for forms in BOUND_FORMS:
        if any(f in override for f in forms):
            for f in forms:
                merged.pop(f, None)
    merged.update(override)
    return merged


# What a recipe that does not say otherwise means: MAE's schedule and no clipping.
SCHEDULE_DEFAULTS = dict(lr_schedule='cosine', lr_milestones=None, lr_gamma=0.1, warmup_blr=0.0, clip_grad=None)


def apply_recipe(args, recipe):
    """Set every flag the command line left at None to the recipe's value (or to
    SCHEDULE_DEFAULTS). The absolute and per-256 forms of a bound (min_lr/min_blr,
    warmup_lr/warmup_blr) go together: a command line that gives either keeps the recipe's out
    of both."""
    recipe = merge_recipes(SCHEDULE_DEFAULTS, recipe)
    given = {k for k, v in vars(args).items() if v is not None}
    for absolute, per_256 in BOUND_FORMS:
        if given & {absolute, per_256}:
            given |= {absolute, per_256}
    for key, value in recipe.items():
        if key in vars(args) and key not in given:
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
    if args.clip_grad == 0:
        args.clip_grad = None
    check_warmup_fits(args, given_warmup='warmup_epochs' in given)


def check_warmup_fits(args, given_warmup):
    """A warm-up longer than the run never reaches the peak lr: refused when --warmup_epochs says
    so, said in a warning line when the recipe's warm-up meets a shorter --epochs (short trials of
    a recipe, --max_steps runs)."""
    warmup, epochs = getattr(args, 'warmup_epochs', None), getattr(args, 'epochs', None)
    if warmup is None or epochs is None or warmup <= epochs:
        return
    if given_warmup:
        raise UsageError(f'--warmup_epochs {warmup} does not fit a run of --epochs {epochs}: the lr would never '
                         f'reach its peak; give --warmup_epochs between 0 and {epochs}')
    print(f'warning: the recipe\'s {warmup} warm-up epochs are more than --epochs {epochs}: the lr rises for the '
          f'whole run and never reaches --lr (give --warmup_epochs to choose)', flush=True)


def add_run_args(parser):
    """Data, output, device and loop-control flags."""
    parser.add_argument('--data_path', required=True, type=str,
                        help='ImageFolder root with train/ (and val/), e.g. ImageNet, "demo" for the built-in set, or '
                             '"synthetic" (ImageNet-1k\'s size; "synthetic:N": N training images) for images made '
                             'per sample, to measure a device without a disk')
    parser.add_argument('--output_dir', default='./output_dir', help='checkpoints, log.jsonl, log.txt')
    parser.add_argument('--log_dir', default=None, help='TensorBoard directory (default: output_dir)')
    parser.add_argument('--device', default='auto', choices=('auto',) + AUTO_ORDER,
                        help='auto picks the first present of ' + ', '.join(AUTO_ORDER))
    parser.add_argument('--precision', default='auto', choices=PRECISIONS,
                        help='autocast dtype; auto: bf16 where supported, else fp16 (with loss scaling), '
                             'fp32 on the CPU')
    parser.add_argument('--compile', default=None, action=argparse.BooleanOptionalAction,
                        help='torch.compile the model (default: on with CUDA, where it trains MAE ViT-B 1.4x faster '
                             '(docs/PERFORMANCE.md); off on other devices and with --align). Where compiling fails, '
                             'the run says so in one line and trains without it')
    parser.add_argument('--grad_ckpt', action='store_true',
                        help='activation checkpointing: recompute each block\'s activations in the backward pass, '
                             'about a third more compute for much less memory (ViT-H, HiViT-L on one device)')
    parser.add_argument('--peak_tflops', default=None, type=float,
                        help='dense peak TFLOP/s of one device at --precision, for the mfu of the logs (default: '
                             'util/flops.py\'s table: H100, H200, A100, Ascend 910B; none for the CPU)')
    parser.add_argument('--seed', default=0, type=int,
                        help='seeds the initial weights, the data order, every crop, flip and mask: the same seed '
                             'gives the same run on any number of processes and workers (default: %(default)s)')
    parser.add_argument('--resume', default='',
                        help='checkpoint to resume from (default: <output_dir>/checkpoint-last.pth if present)')
    parser.add_argument('--start_epoch', default=0, type=int, help='first epoch when not resuming')
    parser.add_argument('--max_steps', default=None, type=int,
                        help='stop after this many optimizer steps (smoke and performance runs)')
    parser.add_argument('--save_freq', default=20, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    parser.add_argument('--log_freq', default=None, type=int, help='log every N optimizer steps (default: 20)')
    parser.add_argument('--num_workers', default=default_num_workers(), type=int,
                        help='data-loading processes per training process (default: the cores this process may use, '
                             'shared among the processes of this node (LOCAL_WORLD_SIZE), or 10 (fewer cores: all of '
                             'them) where that is more; here: %(default)s)')
    parser.add_argument('--pin_mem', default=True, action=argparse.BooleanOptionalAction,
                        help='pin host memory in the data loader for faster copies to the device')
    parser.add_argument('--save_every_steps', default=0, type=int,
                        help='also write checkpoint-last.pth every N optimizer steps within an epoch, bounding the work '
                             'a SIGKILL loses in long epochs (default: 0, at the end of each epoch only)')
    parser.add_argument('--sync_checkpoints', action='store_true',
                        help='write checkpoints in the training thread: training waits for the whole write (for '
                             'debugging). By default training waits only for a copy of the state into host memory, '
                             'and a background thread writes the files (atomically, one save at a time)')
    parser.add_argument('--max_bad_images', default=DEFAULT_MAX_BAD_IMAGES, type=int,
                        help='training replaces an unreadable image by another sample and reports it; past this many '
                             'replacements (all processes together) the run stops (default: %(default)s)')


def check_run_args(args):
    """Refuse loop flags that cannot work; fill in --log_freq, whose default (20) an entry point
    may have changed first (--align logs every step)."""
    if args.log_freq is None:
        args.log_freq = 20
    for name in ('batch_size', 'epochs', 'accum_iter', 'log_freq', 'save_freq'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f'--max_steps must be at least 1, got {args.max_steps}')
    if args.num_workers < 0:
        raise UsageError(f'--num_workers must be 0 or more, got {args.num_workers}')
    check_schedule_values(args)
    size = getattr(args, 'input_size', None)
    if size is not None and size < 1:
        raise UsageError(f'--input_size must be a positive number of pixels, got {size}')
    ratio = getattr(args, 'mask_ratio', None)
    if ratio is not None and not 0 < ratio < 1:
        raise UsageError(f'--mask_ratio must lie between 0 and 1 (both excluded: with nothing masked there is no '
                         f'loss, with everything masked nothing to see), got {ratio}')


# Rates and bounds that must be finite numbers, and the ones that must be above 0 as well.
NON_NEGATIVE = ('lr', 'blr', 'min_lr', 'min_blr', 'warmup_lr', 'warmup_blr', 'weight_decay', 'clip_grad', 'lr_gamma')
POSITIVE = ('lr', 'blr', 'clip_grad', 'lr_gamma')


def check_schedule_values(args):
    """Refuse a learning rate, bound or factor that is negative, NaN or infinite (a run would
    train nowhere, or diverge at its first step), and a negative warm-up (`check_warmup_fits`
    judges one longer than the run)."""
    for name in NON_NEGATIVE:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value) or value < 0 or (value == 0 and name in POSITIVE):
            least = 'above 0' if name in POSITIVE else '0 or more'
            raise UsageError(f'--{name} must be a finite number {least}, got {value}')
    warmup = getattr(args, 'warmup_epochs', None)
    if warmup is not None and warmup < 0:
        raise UsageError(f'--warmup_epochs must be 0 or more, got {warmup}')


# What --align's warn_only deterministic mode warned about: ops that ran without a deterministic
# kernel (the first line of each warning), for the run's closing lines.
NONDETERMINISTIC_OPS = []


def watch_nondeterministic_kernels():
    """Note every warning of an op without a deterministic implementation (warn_only mode warns
    instead of failing), so that the run's summary says so, not only a warning that scrolls away."""
    show = warnings.showwarning
    NONDETERMINISTIC_OPS.clear()

    def note_and_show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if 'deterministic' in text and text.splitlines()[0] not in NONDETERMINISTIC_OPS:
            NONDETERMINISTIC_OPS.append(text.splitlines()[0])
        show(message, category, filename, lineno, file, line)
    warnings.showwarning = note_and_show


def alignment_summary():
    """The closing line of an --align run about its kernels."""
    if not NONDETERMINISTIC_OPS:
        return 'align: every kernel that ran was deterministic'
    return (f'align: WARNING: {len(NONDETERMINISTIC_OPS)} op(s) ran without a deterministic kernel, so two runs may '
            f'differ beyond rounding: {"; ".join(NONDETERMINISTIC_OPS)}')


_OUTPUT_DIR_LOCKS = {}  # real path -> the open lock file, held until the process ends


def lock_output_dir(output_dir):
    """Hold an flock on <output_dir>/.lock for the life of this process, so that a second run
    started in the same folder refuses instead of interleaving its checkpoints and logs. The
    operating system drops the lock when the process ends, crashed or killed included, so it
    never stays stuck. Taking it again in the same process (runs one after the other) is fine.
    Writing the lock file also proves the folder writable: a path that is a file, lies under a
    file, or is read-only is one line now rather than a traceback at the first checkpoint."""
    key = os.path.realpath(output_dir)
    if key in _OUTPUT_DIR_LOCKS:
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle = open(os.path.join(output_dir, '.lock'), 'a+')
    except OSError as e:
        raise UsageError(f'--output_dir {output_dir}: cannot write there ({e.strerror or first_line(e)}): give a '
                         f'folder you can write to') from None
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the folder is checked, but not protected
        handle.close()
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or 'another process'
        handle.close()
        raise UsageError(f'another run is using --output_dir {output_dir} ({holder}): wait for it to end, stop it, '
                         f'or choose another --output_dir') from None
    handle.truncate(0)
    handle.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    handle.flush()
    _OUTPUT_DIR_LOCKS[key] = handle


def release_output_dir_locks():
    """Drop the output-folder locks this process holds: for programs that run several runs one
    after the other in one process (the tests, a notebook); a run's own process needs none of it."""
    for handle in _OUTPUT_DIR_LOCKS.values():
        handle.close()
    _OUTPUT_DIR_LOCKS.clear()


def start_run(args, deterministic=False):
    """Join the run: this process's rank, its device, the process group, the precision.
    `deterministic` asks the device for run-to-run identical arithmetic (--align).

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
    if args.output_dir and dist.is_main_process():
        lock_output_dir(args.output_dir)
    signals.join_agreement_group()
    precision = device.resolve_precision(args.precision)
    if args.compile is None:
        args.compile = compiles_by_default(device.type, deterministic)
    args.log_dir = args.log_dir or args.output_dir
    print(f'device: {device.torch_device} x {world.world_size} processes, precision: {precision}')
    print(json.dumps(vars(args), indent=1))
    return world, device, precision


def fingerprint(tensors):
    """A short hash of the values of some tensors (in the given order), to check that two runs,
    on two machines or devices, start from the same weights and read the same data."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def set_learning_rate(args):
    """lr = blr * effective batch / 256 unless --lr is given; the lower bound and the start of the
    warm-up scale the same way when the recipe gives them per 256 images."""
    eff_batch_size = dist.effective_batch_size(args)
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    for absolute, per_256 in BOUND_FORMS:
        if getattr(args, absolute) is None:
            setattr(args, absolute, (getattr(args, per_256) or 0.0) * eff_batch_size / 256)
    after = f'x {args.lr_gamma} at epochs {args.lr_milestones}' if args.lr_schedule == 'step' \
        else f'{args.lr_schedule} down to {args.min_lr:.3e}'
    print(f'effective batch size {eff_batch_size}, lr {args.lr:.3e} (blr {args.blr:.3e}); {args.warmup_epochs} '
          f'warm-up epochs from {args.warmup_lr:.3e}, then {after}')


def resume_training(args, model, optimizer, scaler, ema=None):
    """Continue from --resume, or from <output_dir>/checkpoint-last.pth when a run left one.

    returns: (start_epoch, start_iter, progress)
    """
    start_epoch, start_iter, progress = args.start_epoch, 0, Progress()
    resume = checkpoint.resume_path(args.resume, args.output_dir)
    if resume:
        start_epoch, epoch_samples, progress.step = checkpoint.restore_training_state(
            resume, model, optimizer, scaler, args, ema=ema)
        start_iter = epoch_samples // dist.micro_batch_images(args)
        print(f'resumed from {resume}: epoch {start_epoch}, {epoch_samples} of its samples done, step {progress.step}')
    if start_epoch >= args.epochs:
        print(f'nothing to train: the run in {args.output_dir} has finished its {args.epochs} epochs '
              f'(raise --epochs to train longer)')
    else:
        print(f'training epochs {start_epoch} to {args.epochs - 1}')
    return start_epoch, start_iter, progress


def compiles_by_default(device_type, deterministic):
    """--compile's default: on with CUDA, where it was measured faster; off on the other devices
    (their compilers are their vendors' to prove) and for --align (its kernels are not the eager
    ones that another device's run is compared with)."""
    return device_type == 'cuda' and not deterministic


def compile_and_wrap(model, device, args):
    """Activation checkpointing with --grad_ckpt, DDP around the model when distributed, then
    torch.compile with --compile."""
    if args.grad_ckpt:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise UsageError(f'--grad_ckpt: {type(model).__name__} has no activation checkpointing (timm\'s '
                             f'set_grad_checkpointing); run without it')
        model.set_grad_checkpointing(True)
    model_ddp = dist.wrap_ddp(model, device)
    return EagerFallback(model_ddp, torch.compile(model_ddp)) if args.compile else model_ddp


class EagerFallback(torch.nn.Module):
    """The compiled model, or the model itself from the first call whose compilation fails (no
    Triton, no C++ compiler, an op the backend lacks): one line says so, and the step runs eagerly,
    as every later one. Attributes the loop asks for (no_sync under DDP) are the model's."""

    def __init__(self, model, compiled):
        super().__init__()
        self.model = model
        self.__dict__['compiled'] = compiled  # not a submodule: its parameters are the model's

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # compiling failed (Inductor's errors included)
                cause = getattr(e, 'inner_exception', None) or e  # what the backend raised, when it was the backend
                print(f'torch.compile failed ({type(cause).__name__}: {first_line(cause)}): training without it '
                      f'(--no-compile skips it)', flush=True)
                self.__dict__['compiled'] = None
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)


def print_outputs(args, stats, seconds, bad_images=None):
    """The closing lines: time, throughput, final loss, replaced images, and where the files are."""
    print(f'training time {seconds:.0f} s')
    if bad_images is not None and bad_images.poll():
        print(f'unreadable images replaced by other samples in this process: {bad_images.replacements} '
              f'({len(bad_images.files)} files, listed in {bad_images.path})')
    if stats:
        print(f"steady-state throughput: {stats['ips']:.1f} images/s; final loss {stats['loss']:.4f}")
    if getattr(args, 'align', False):
        print(alignment_summary())
    if args.output_dir:
        print(f'checkpoint: {os.path.join(args.output_dir, checkpoint.LAST)}\n'
              f'logs: {os.path.join(args.output_dir, "log.jsonl")} (steps), '
              f'{os.path.join(args.output_dir, "log.txt")} (epochs)\n'
              f'TensorBoard: tensorboard --logdir {args.log_dir}')
