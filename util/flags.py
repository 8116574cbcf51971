"""The flags every entry point shares, checked and filled in: batch, schedule and optimizer
flags whose defaults are the published recipe of --model (`apply_recipe`), the data, device and
loop flags, and the learning rate from the base rate."""
import argparse
import math
import os

from util import dist
from util.compiling import COMPILE_MODES
from util.datasets import default_num_workers
from util.device import AUTO_ORDER, PRECISIONS
from util.errors import UsageError
from util.images import DEFAULT_MAX_BAD_IMAGES
from util.logger import counted
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
                        help='accumulate gradients over this many micro-batches per optimizer step (default: 1)')
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


def apply_recipe(args, recipe, trains=True):
    """Set every flag the command line left at None to the recipe's value (or to
    SCHEDULE_DEFAULTS). The absolute and per-256 forms of a bound (min_lr/min_blr,
    warmup_lr/warmup_blr) go together: a command line that gives either keeps the recipe's out
    of both. trains: False for a run that trains nothing (--eval, --knn), whose schedule is not
    checked."""
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
    if trains:
        check_warmup_fits(args, given_warmup='warmup_epochs' in given)
        step_flags = sorted({'lr_milestones', 'lr_gamma'} & given)
        if step_flags and args.lr_schedule != 'step':  # given, not a recipe's: it would do nothing
            raise UsageError(f'{" and ".join("--" + f for f in step_flags)} shape{"s" if len(step_flags) == 1 else ""} '
                             f'the step schedule, and --lr_schedule is {args.lr_schedule}: add --lr_schedule step, or '
                             f'leave {"it" if len(step_flags) == 1 else "them"} out')


def check_warmup_fits(args, given_warmup):
    """A warm-up longer than the run never reaches the peak lr: refused when --warmup_epochs says
    so, said in a warning line when the recipe's warm-up meets a shorter --epochs (short trials of
    a recipe, --max_steps runs)."""
    warmup, epochs = getattr(args, 'warmup_epochs', None), getattr(args, 'epochs', None)
    if warmup is None or epochs is None or warmup <= epochs or epochs < 1:  # check_run_args refuses --epochs 0
        return
    if given_warmup:
        raise UsageError(f'--warmup_epochs {warmup} does not fit a run of --epochs {epochs}: the lr would never '
                         f'reach its peak; give --warmup_epochs between 0 and {epochs}')
    print(f'warning: the recipe\'s {warmup} warm-up epochs are more than --epochs {epochs}: the lr rises for the '
          f'whole run and never reaches --lr (give --warmup_epochs to choose)', flush=True)


def add_step_args(parser):
    """How the training step runs: device, precision, compiling, activation checkpointing, and the
    peak the MFU counts against. The entry points and benchmark.py share them, so a benchmark
    times the step a run with the same flags trains with."""
    parser.add_argument('--device', default='auto', choices=('auto',) + AUTO_ORDER,
                        help='auto picks the first present of ' + ', '.join(AUTO_ORDER))
    parser.add_argument('--precision', default='auto', choices=PRECISIONS,
                        help='autocast dtype; auto: bf16 where supported, else fp16 (with loss scaling), '
                             'fp32 on the CPU')
    parser.add_argument('--compile', default=None, action=argparse.BooleanOptionalAction,
                        help='torch.compile the model (default: on with CUDA, where it trains MAE ViT-B 1.4x faster '
                             '(docs/PERFORMANCE.md); off on other devices and with --align). Where compiling fails, '
                             'the run says so in one line and trains without it')
    parser.add_argument('--compile_mode', default=None, choices=COMPILE_MODES,
                        help='torch.compile\'s mode (implies --compile): reduce-overhead replays each step as CUDA '
                             'graphs, max-autotune also tunes the matmuls (longer start-up); default: torch\'s default mode')
    parser.add_argument('--grad_ckpt', action='store_true',
                        help='activation checkpointing: recompute each block\'s activations in the backward pass, '
                             'about a third more compute for much less memory (ViT-H, HiViT-L on one device)')
    parser.add_argument('--peak_tflops', default=None, type=float,
                        help='dense peak TFLOP/s of one device at --precision, for the mfu of the logs (default: '
                             'util/flops.py\'s table: H100, H200, A100, Ascend 910B; none for the CPU)')


def add_run_args(parser):
    """Data, output, device and loop-control flags."""
    parser.add_argument('--data_path', type=os.path.expanduser, required=True,
                        help='ImageFolder root with train/ (and val/), e.g. ImageNet, "demo" for the built-in set, or '
                             '"synthetic" (ImageNet-1k\'s size; "synthetic:N": N training images) for images made '
                             'per sample, to measure a device without a disk')
    parser.add_argument('--output_dir', type=os.path.expanduser, default='./output_dir',
                        help='checkpoints, log.jsonl, log.txt (default: ./output_dir)')
    parser.add_argument('--log_dir', type=os.path.expanduser, default=None,
                        help='TensorBoard directory (default: output_dir)')
    add_step_args(parser)
    parser.add_argument('--seed', default=0, type=int,
                        help='seeds the initial weights, the data order, every crop, flip and mask: the same seed '
                             'gives the same run on any number of processes and workers (default: %(default)s)')
    parser.add_argument('--resume', type=os.path.expanduser, default='',
                        help='checkpoint to resume from (default: <output_dir>/checkpoint-last.pth if present)')
    parser.add_argument('--start_epoch', default=0, type=int, help='first epoch when not resuming')
    parser.add_argument('--max_steps', default=None, type=int,
                        help='stop after this many optimizer steps of this launch (smoke and performance runs; a '
                             'run resumed from its folder trains as many more)')
    parser.add_argument('--save_freq', default=20, type=int,
                        help='keep checkpoint-<epoch>.pth every N epochs (default: 20)')
    parser.add_argument('--log_freq', default=None, type=int, help='log every N optimizer steps (default: 20)')
    parser.add_argument('--num_workers', default=default_num_workers(), type=int,
                        help='data-loading processes per training process (default: the usable cores divided among '
                             'the node\'s LOCAL_WORLD_SIZE training processes, but at least 10, or all the cores where '
                             'there are fewer; here: %(default)s)')
    parser.add_argument('--pin_mem', default=True, action=argparse.BooleanOptionalAction,
                        help='pin host memory in the data loader for faster copies to the device (default: on)')
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
    check_output_outside_the_data(getattr(args, 'output_dir', None), getattr(args, 'data_path', None))
    for flag in ('output_dir', 'log_dir'):
        check_utf8_name(flag, getattr(args, flag, None))
    for name in ('batch_size', 'epochs', 'accum_iter', 'log_freq', 'save_freq'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f'--max_steps must be at least 1, got {args.max_steps}')
    for name in ('num_workers', 'save_every_steps', 'max_bad_images', 'start_epoch', 'vis_freq'):
        if (getattr(args, name, 0) or 0) < 0:  # vis_freq: None is --save_freq's
            raise UsageError(f'--{name} must be 0 or more, got {getattr(args, name)}')
    if not 0 <= args.seed < 2 ** 32:  # numpy's generators take no negative seeds, its legacy one none past 32 bits
        raise UsageError(f'--seed must be a whole number from 0 to {2 ** 32 - 1}, got {args.seed}')
    if getattr(args, 'lr_milestones', None) and min(args.lr_milestones) < 0:
        raise UsageError(f'--lr_milestones are epochs, 0 or more, got {" ".join(map(str, args.lr_milestones))}')
    check_schedule_values(args)
    check_ranges(args)
    check_size_and_mask_ratio(args)


def check_utf8_name(flag, path):
    """A folder name with bytes that are not UTF-8 (Python holds them as surrogates) is refused up
    front: TensorBoard's writer and the JSON logs fail on it after training has started."""
    try:
        (path or '').encode('utf-8')
    except UnicodeEncodeError:
        raise UsageError(f'--{flag} {path!r} has bytes in its name that are not UTF-8, which the logs cannot write: '
                         f'give a folder whose name is UTF-8') from None


def check_size_and_mask_ratio(args):
    """--input_size and --mask_ratio, which the entry points and visualize.py take."""
    size = getattr(args, 'input_size', None)
    if size is not None and size < 1:
        raise UsageError(f'--input_size must be a positive number of pixels, got {size}')
    ratio = getattr(args, 'mask_ratio', None)
    if ratio is not None and not 0 < ratio < 1:
        raise UsageError(f'--mask_ratio must lie between 0 and 1 (both excluded: with nothing masked there is no '
                         f'loss, with everything masked nothing to see), got {ratio}')


def check_output_outside_the_data(output_dir, data_path):
    """An --output_dir inside a split of --data_path (the built-in set's folder for `demo`) would be
    read as a class folder of it."""
    from util import demo_data
    root = demo_data.default_cache_dir() if data_path == 'demo' else data_path
    if not output_dir or not root or not os.path.isdir(root):
        return
    for split in ('train', 'val'):
        folder = os.path.realpath(os.path.join(root, split))
        if os.path.join(os.path.realpath(output_dir), '').startswith(os.path.join(folder, '')):
            raise UsageError(f'--output_dir {output_dir!r} is inside --data_path\'s {split}/ folder, where its files '
                             f'would be read as a class of images: choose a folder outside {root}')


# Flags that mean something only within an interval (a pair of values: each within it), with what
# each is: a value outside would stop the run deep inside torch or timm, or train silently wrong
# (an EMA decay above 1 grows without bound, a mixing probability of 3 is 1).
RANGES = {
    'crop_min': ('(0, 1]', 'the smallest crop, as a fraction of the image area'),
    'opt_betas': ('[0, 1)', "AdamW's decay rates of its moment estimates"),
    'layer_decay': ('(0, 1]', 'the lr factor from one layer to the one below'),
    'drop_path': ('[0, 1)', 'the probability of skipping a residual branch'),
    'smoothing': ('[0, 1)', 'the label mass spread over the other classes'),
    'reprob': ('[0, 1]', 'the probability of erasing a box'),
    'color_jitter': ('[0, inf)', 'the strength of colour jitter'),
    'mixup': ('[0, inf)', "the alpha of mixup's Beta distribution (0: off)"),
    'cutmix': ('[0, inf)', "the alpha of cutmix's Beta distribution (0: off)"),
    'cutmix_minmax': ('(0, 1]', "the bounds of cutmix's box side, as fractions of the image side"),
    'mixup_prob': ('[0, 1]', 'a probability'),
    'mixup_switch_prob': ('[0, 1]', 'a probability'),
    'model_ema_decay': ('[0, 1]', 'the weight of the average so far at each step'),
    'head_init_std': ('[0, inf)', 'a standard deviation'),
    'peak_tflops': ('(0, inf)', "the device's peak TFLOP/s, the denominator of MFU"),
}


def in_interval(value, interval):
    """Whether `value` lies in an interval written as '[0, 1)', '(0, inf)', ... (NaN never does)."""
    low, high = (float(bound) for bound in interval[1:-1].split(', '))
    above = low < value if interval[0] == '(' else low <= value
    below = value < high if interval[-1] == ')' else value <= high
    return above and below


def check_ranges(args):
    """Refuse a flag of RANGES outside its interval, and a pair of bounds in the wrong order."""
    for name, (interval, meaning) in RANGES.items():
        value = getattr(args, name, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and not in_interval(v, interval):
                shown = ' '.join(map(str, values))
                raise UsageError(f'--{name} ({meaning}) must lie in {interval}, got {shown}')
    bounds = getattr(args, 'cutmix_minmax', None)
    if bounds is not None and not bounds[0] < bounds[1]:
        raise UsageError(f'--cutmix_minmax takes the smaller bound first, then a larger one, got '
                         f'{bounds[0]} {bounds[1]}')


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
    print(f'effective batch size {eff_batch_size}, lr {args.lr:.3e} (blr {args.blr:.3e}); '
          f'{counted(args.warmup_epochs, "warm-up epoch")} from {args.warmup_lr:.3e}, then {after}')
    if args.lr_schedule == 'step':
        check_milestones(args)
    if args.lr_schedule != 'step' and args.min_lr > args.lr:  # DeiT's fixed 1e-5 at a small batch, say
        print(f'warning: the lr\'s lower bound {args.min_lr:.3e} is above its peak {args.lr:.3e}, so after the '
              f'warm-up the lr rises towards it: give a lower --min_lr (or --min_blr, per 256 images)', flush=True)


def check_milestones(args):
    """A warning line for step-schedule milestones the run never reaches (a short trial of a long
    recipe, say), or for none at all: the lr would stay at its peak without a word."""
    milestones = args.lr_milestones or []
    unreached = [m for m in milestones if m >= args.epochs]
    if not milestones:
        print('warning: --lr_schedule step without --lr_milestones keeps the lr at its peak after the warm-up',
              flush=True)
    elif unreached:
        stays = ', so the lr stays at its peak after the warm-up' if len(unreached) == len(milestones) else ''
        print(f'warning: a run of --epochs {args.epochs} never reaches --lr_milestones '
              f'{" ".join(map(str, unreached))}{stays}', flush=True)
