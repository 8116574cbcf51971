"""Throughput of the training step and of the input pipeline, with training FLOPs and MFU.

    # the device: the real training step on synthetic data already there
    python benchmark.py --model mae_vit_base --device cuda --batch_size 64 --precision bf16
    python benchmark.py --all --device cpu            # one model of each family (tiny ones on the CPU)
    # beside the official code (git clone facebookresearch/mae, microsoft/SimMIM, zhangxiaosong18/hivit)
    python benchmark.py --all --device cuda --batch_size 256 --official official/mae official/SimMIM official/hivit
    # the input pipeline alone, as main_pretrain (or main_finetune: --finetune_pipeline) builds it
    python benchmark.py --data_path /data/imagenet --num_workers 8 --compare_official
    # how long saving checkpoint-last.pth holds training up (weights and AdamW state)
    python benchmark.py --checkpoint_stall --model mae_vit_base --device cuda

Model mode prints images/s, ms a step, training GFLOPs per image (counted by util.flops over one
forward and backward, not typed in), achieved TFLOP/s, MFU against util.flops.PEAK_TFLOPS (n/a where
the device's peak is unknown: the CPU, unless --peak_tflops) and peak memory, of the step as
training runs it (compiled with CUDA; the device, precision and step flags are the entry points'
own, and with --grad_ckpt MFU still counts the model's FLOPs, not the recomputation). With
--official, the official model of the same architecture (the same weights for MAE and HiViT) is
timed too, in its own loop's step and in this project's, in rounds taken in turns with this
project's step (and its eager form when compiled). Loader mode prints images/s of one core (per
data-loader worker) and of a DataLoader with --num_workers, and with --compare_official the official
MAE transform (Pillow) on the same files beside it. Checkpoint mode prints the seconds a save holds
training up, synchronous and with the background writer.
"""
import argparse
import os
import tempfile
import time
from functools import partial
from types import SimpleNamespace

import timm
import torch
from torchvision.datasets.folder import pil_loader

import main_finetune
import main_pretrain
from util import checkpoint, official
from util.checkpoint_writer import CheckpointWriter
from util.compiling import compile_with_fallback, resolve_compile
from util.datasets import (INPUT_PIPELINES, JpegBatch, MixupCollate, SeededSamples, build_finetune_train_folder,
                           build_loader, build_pretrain_dataset, is_synthetic, pretrain_transform)
from util.device import resolve_device
from util.engine import to_device
from util.errors import UsageError, run_command
from util.flags import add_step_args, check_ranges
from util.flops import (FlopRate, device_name, device_peak, example_batch, matmul_precision,
                        training_flops_per_image)
from util.images import BadImages
from util.masking import MaskingError
from util.logger import counted
from util.optim import build_adamw, param_groups
from util.registry import _unknown, create_classifier, create_pretrain_model, native_input_size, pretrain_model_names

# One model of each family, (small, published size): --all runs the small ones on the CPU.
FAMILIES = {
    'MAE': ('mae_vit_tiny', 'mae_vit_base'),
    'SimMIM ViT': ('simmim_vit_tiny', 'simmim_vit_base'),
    'SimMIM Swin': ('simmim_swin_tiny', 'simmim_swin_base'),
    'MaskFeat': ('maskfeat_vit_tiny', 'maskfeat_vit_base'),
    'MAE-HiViT': ('mae_hivit_tiny', 'mae_hivit_base'),
    'ViT fine-tuning': ('vit_tiny_patch8', 'vit_base_patch16'),
    'HiViT supervised': ('hivit_tiny_patch8_64', 'hivit_base'),
}


# the counts of one mode, and their defaults there: None until the mode is known, so that one
# given to another mode is refused rather than ignored (check_mode_flags)
MODE_DEFAULTS = {'--steps': 10, '--warmup': 3, '--num_workers': 2, '--images': 200, '--saves': 3}


def get_args_parser():
    parser = argparse.ArgumentParser(description='Benchmark: the training step on the device, or the input pipeline',
                                     allow_abbrev=False)
    parser.add_argument('--model', default=None,
                        help='a pre-training model of util.registry or any timm classifier (default: mae_vit_base; '
                             'vit_base_patch16 with --finetune_pipeline)')
    parser.add_argument('--all', action='store_true',
                        help='one model of each family: the tiny ones (--sizes small), the published ones (published)')
    parser.add_argument('--sizes', choices=('auto', 'small', 'published'), default='auto',
                        help='the models of --all; auto: small on the CPU, published elsewhere')
    parser.add_argument('--batch_size', type=int, default=None,
                        help='images a step (default: 64 in model mode on an accelerator, 16 on the CPU; 64 in loader mode)')
    parser.add_argument('--steps', type=int, default=None,
                        help=f'timed training steps (default: {MODE_DEFAULTS["--steps"]})')
    parser.add_argument('--warmup', type=int, default=None,
                        help=f'untimed steps first (default: {MODE_DEFAULTS["--warmup"]})')
    parser.add_argument('--input_size', type=int, default=None,
                        help='image size (default: the size the model is built for)')
    add_step_args(parser)
    parser.add_argument('--official', type=os.path.expanduser, nargs='+', default=None, metavar='DIR',
                        help='clones of the official repositories (facebookresearch/mae, microsoft/SimMIM, '
                             'zhangxiaosong18/hivit): time the official model of the same architecture in the official '
                             'loop\'s step and in this project\'s step, in turns with this project\'s (util/official.py)')
    parser.add_argument('--rounds', type=int, default=None,
                        help='timed rounds of --steps steps, taken in turns by the steps compared; the best counts '
                             '(default: 3 with --official, else 1)')
    # loader mode
    parser.add_argument('--data_path', type=os.path.expanduser, default=None,
                        help='measure the input pipeline alone on this data set (an ImageFolder root, demo or synthetic)')
    parser.add_argument('--finetune_pipeline', action='store_true',
                        help='the pipeline of main_finetune (RandAugment, random erasing, mixup) instead of '
                             'main_pretrain\'s')
    parser.add_argument('--input_pipeline', default=None, choices=INPUT_PIPELINES,
                        help='main_pretrain\'s --input_pipeline (default: its default, tensor; nvjpeg decodes on '
                             '--device, and its DataLoader figure includes that)')
    parser.add_argument('--num_workers', type=int, default=None,
                        help=f'DataLoader workers (default: {MODE_DEFAULTS["--num_workers"]})')
    parser.add_argument('--images', type=int, default=None,
                        help=f'images timed on one core, and at least this many through the DataLoader (default: '
                             f'{MODE_DEFAULTS["--images"]})')
    parser.add_argument('--checkpoint_stall', action='store_true',
                        help='checkpoint mode: the stall of --saves saves of --model\'s weights and AdamW state')
    parser.add_argument('--saves', type=int, default=None,
                        help=f'checkpoint mode: saves per writer (default: {MODE_DEFAULTS["--saves"]})')
    parser.add_argument('--compare_official', action='store_true',
                        help='also time the official MAE transform (Pillow RandomResizedCrop(0.2-1, bicubic), flip, '
                             'ToTensor, Normalize) on the same files, on one core')
    return parser


def check_mode_flags(args):
    """A flag of another mode would be ignored: refused, naming the mode it belongs to. Then the
    counts of the mode run take their defaults (MODE_DEFAULTS)."""
    model_mode = not (args.checkpoint_stall or args.data_path)
    given = {'--all': args.all, '--sizes': args.sizes != 'auto', '--official': args.official is not None,
             '--rounds': args.rounds is not None, '--compare_official': args.compare_official,
             '--finetune_pipeline': args.finetune_pipeline, '--input_pipeline': args.input_pipeline is not None,
             **{flag: getattr(args, flag[2:]) is not None for flag in MODE_DEFAULTS}}
    for flag in ('--all', '--sizes', '--official', '--rounds', '--steps', '--warmup'):
        if given[flag] and not model_mode:
            raise UsageError(f'{flag} is for timing the training step: leave out '
                             f'{"--checkpoint_stall" if args.checkpoint_stall else "--data_path"}')
    for flag in ('--compare_official', '--finetune_pipeline', '--input_pipeline', '--num_workers', '--images'):
        if given[flag] and not args.data_path:
            raise UsageError(f'{flag} is for timing the input pipeline: give --data_path')
    if given['--saves'] and not args.checkpoint_stall:
        raise UsageError('--saves is for timing checkpoint saves: add --checkpoint_stall')
    for flag, default in MODE_DEFAULTS.items():
        if not given[flag]:
            setattr(args, flag[2:], default)
    if args.checkpoint_stall and args.data_path:
        raise UsageError('--checkpoint_stall times saves of --model\'s weights and AdamW state: leave out --data_path')
    if args.sizes != 'auto' and not args.all:
        raise UsageError('--sizes chooses the models of --all: add --all')
    if args.all and args.model:
        raise UsageError('--all times one model of each family: leave out --model (or --all)')
    if args.compare_official and is_synthetic(args.data_path):
        raise UsageError('--compare_official reads image files: give an ImageFolder root or demo, not synthetic')


def check_args(args):
    check_mode_flags(args)
    if args.rounds is None:
        args.rounds = 3 if args.official else 1
    for name in ('steps', 'images', 'rounds', 'saves'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f'--batch_size must be at least 1, got {args.batch_size}')
    for name in ('warmup', 'num_workers'):
        if getattr(args, name) < 0:
            raise UsageError(f'--{name} must be 0 or more, got {getattr(args, name)}')
    check_ranges(args)
    if args.compare_official and args.finetune_pipeline:
        raise UsageError('--compare_official compares the pre-training pipeline with the official MAE one: '
                         'leave out --finetune_pipeline')
    if args.input_pipeline and args.finetune_pipeline:  # main_finetune decodes with Pillow alone
        raise UsageError(f'--input_pipeline {args.input_pipeline} chooses main_pretrain\'s pipeline: leave it out with '
                         f'--finetune_pipeline')


# ---- model mode ------------------------------------------------------------------------------

def training_args(entry_point, model, data_path, input_size, extra=()):
    """The flags of main_pretrain or main_finetune for this model, with their recipe filled in as
    the entry point fills it: the benchmark runs what training runs."""
    argv = ['--model', model, '--data_path', data_path, *extra]
    if input_size is not None:
        argv += ['--input_size', str(input_size)]
    args = entry_point.get_args_parser().parse_args(argv)
    entry_point.fill_recipe(args)
    return args


def recipe_masks(model, args):
    """The model's mask generator under its recipe's masking flags, which benchmark.py does not
    take: where they cannot mask an image of --input_size, the error keeps what is wrong and asks
    for another size instead of main_pretrain.py's flags."""
    try:
        return model.mask_generator(args)
    except MaskingError as e:
        recipe = training_args(main_pretrain, args.model, 'synthetic', None).input_size
        raise UsageError(f'{args.model} at {args.input_size} px: {e.problem}; benchmark.py times the recipe\'s '
                         f'masking: give another --input_size (the recipe\'s is {recipe})') from None


def build_step(name, batch_size, input_size):
    """The model, the loss of the training step and a batch on the CPU for a model name.
    returns: (model, loss_fn(model, batch), batch, input size, main_pretrain's flags with the
              recipe filled in, or None for a classifier)"""
    if name not in pretrain_model_names() and not timm.is_model(name):  # the closest among both kinds
        raise _unknown('model', name, pretrain_model_names() + timm.list_models())
    if name in pretrain_model_names():
        args = training_args(main_pretrain, name, 'synthetic', input_size)
        model = create_pretrain_model(name, img_size=args.input_size)
        masks = recipe_masks(model, args)
        loss_fn = partial(main_pretrain.mim_loss, forward_kwargs=masks.forward_kwargs)
        return model, loss_fn, example_batch(batch_size, args.input_size, masks), args.input_size, args
    size = input_size or native_input_size(name)
    model = create_classifier(name, img_size=size, num_classes=1000)
    loss_fn = partial(main_finetune.classification_loss, criterion=torch.nn.CrossEntropyLoss())
    images, targets = example_batch(batch_size, size, num_classes=1000)
    return model, loss_fn, (images, torch.randint(1000, targets.shape)), size, None


def training_step(model, loss_fn, batch, device, precision):
    """The real training step (autocast, backward, loss scaling for fp16, the project's AdamW,
    zero_grad) as a function of no arguments."""
    optimizer = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), device)
    scaler = device.grad_scaler(precision)

    def step():
        with device.autocast(precision):
            loss = loss_fn(model, batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def official_step(model, loss_fn, batch, device, precision, clip_grad):
    """The official loops' step (util.official.official_training_step) with their optimizer:
    torch's AdamW in its default (foreach) form."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type)
    return partial(official.official_training_step, model, loss_fn, batch, optimizer, scaler, device, precision, clip_grad)


def seconds_per_step(step, device, steps):
    """Seconds per step of `step()` over `steps` steps."""
    device.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    device.synchronize()  # the host only queues work: wait for the device before reading the clock
    return (time.perf_counter() - start) / steps


def time_steps(steps_by_name, device, warmup, steps, rounds):
    """Seconds per step of each of `steps_by_name` ({name: step()}), each warmed up by `warmup`
    untimed steps, then timed for `steps` steps in each of `rounds` rounds that take the steps in
    turn (so that a change of clock or load on a shared machine falls on all of them alike); the
    best round of each counts.
    returns: {name: seconds per step}"""
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    best = {}
    for _ in range(rounds):
        for name, step in steps_by_name.items():
            seconds = seconds_per_step(step, device, steps)
            best[name] = min(seconds, best.get(name, seconds))
    return best


THIS = 'this project'  # the step of the main table: compiled with --compile, as training runs it


def benchmark_model(name, args, device, precision, clones=None):
    """One model's figures; with `clones` (util.official.find_clones), also those of the official
    model in its own loop's step and in this project's (eager), and of this project's eager step
    where --compile is on. returns: a dict of them (for the tables)"""
    batch_size = args.batch_size or (16 if device.type == 'cpu' else 64)
    with official.recording_constructors() as constructed:
        model, loss_fn, batch, size, recipe = build_step(name, batch_size, args.input_size)
    counterpart = None
    if clones is not None:  # before --grad_ckpt and the move: the official model takes the initial weights
        counterpart = official.official_counterpart(model, constructed, clones, recipe)
    flops = training_flops_per_image(model, loss_fn, example_batch_of(batch, 2))  # on meta tensors: free
    if args.grad_ckpt:  # after the count: the recomputation is not the model's work
        model.set_grad_checkpointing(True)
    model.to(device.torch_device)
    batch = to_device(batch, device.torch_device)
    batch[0].normal_()  # images of ImageNet's statistics after normalisation, not zeros
    steps = {}
    if isinstance(counterpart, tuple):
        official_model, official_loss_fn, _ = counterpart
        official_model.to(device.torch_device)
        steps['official'] = official_step(official_model, official_loss_fn, batch, device, precision,
                                          recipe.clip_grad)
        steps['official model, this step'] = training_step(official_model, official_loss_fn, batch, device, precision)
        if args.compile:
            steps['this project, eager'] = training_step(model, loss_fn, batch, device, precision)
    compiled = compile_with_fallback(model, args.compile_mode) if args.compile else model
    steps[THIS] = training_step(compiled, loss_fn, batch, device, precision)
    seconds = time_steps(steps, device, args.warmup, args.steps, args.rounds)
    peak = device_peak(device, matmul_precision(device, precision), args.peak_tflops)
    ips = {variant: batch_size / s for variant, s in seconds.items()}
    rate = FlopRate(flops, peak).fields(ips[THIS])
    result = {'model': name, 'size': size, 'batch': batch_size, 'ips': ips[THIS], 'ms': seconds[THIS] * 1000,
              'gflops': flops / 1e9, 'tflops': rate['tflops'], 'mfu': rate.get('mfu'),
              'memory': peak_memory_of(steps[THIS], device)}
    if isinstance(counterpart, tuple):
        result['official'] = {variant: (value, FlopRate(flops, peak).fields(value).get('mfu'))
                              for variant, value in ips.items()}
        result['official_weights'] = counterpart[2]
    elif counterpart is not None:
        result['official'] = counterpart  # why there is none
    return result


def peak_memory_of(step, device):
    """The peak device memory of one more `step()` (the weights of all models benchmarked with it
    included): 'n/a' where the device does not say."""
    reset_peak = getattr(device.module, 'reset_peak_memory_stats', None)
    if reset_peak is not None:
        device.synchronize()
        reset_peak(device.torch_device)
    step()
    device.synchronize()
    memory = device.max_memory_allocated()
    return f'{memory / 2 ** 30:.2f} GiB' if memory else 'n/a'


def example_batch_of(batch, count):
    """The first `count` images of a batch (and their masks or targets)."""
    return torch.utils._pytree.tree_map(lambda t: t[:count] if isinstance(t, torch.Tensor) else t, batch)


def print_model_figures(r, where):
    mfu = f"{100 * r['mfu']:.1f} %" if r['mfu'] is not None else 'n/a (no known peak: --peak_tflops)'
    print(f"{r['model']}: {r['size']} px, batch {r['batch']}, {where}: {r['ips']:.1f} images/s, {r['ms']:.1f} ms/step, "
          f"{r['gflops']:.3f} GFLOPs/image (training), {r['tflops']:.3f} TFLOP/s, MFU {mfu}, peak memory "
          f"{r['memory']}", flush=True)
    if isinstance(r.get('official'), str):
        print(f"  official: {r['official']}", flush=True)
    elif 'official' in r:
        official_ips = r['official']['official'][0]
        for variant, (ips, mfu) in r['official'].items():
            mfu = f', MFU {100 * mfu:.1f} %' if mfu is not None else ''
            print(f'  {variant}: {ips:.1f} images/s{mfu}, {ips / official_ips:.2f}x the official step', flush=True)


OFFICIAL_COLUMNS = ('official', 'official model, this step', 'this project, eager', THIS)


def percent(mfu):
    return f'{100 * mfu:.1f} %' if mfu is not None else 'n/a'


def compiled_how(args):
    if not args.compile:
        return 'eager'
    return 'compiled' if args.compile_mode == 'default' else f'compiled ({args.compile_mode})'


def run_models(args):
    device = resolve_device(args.device)
    precision = device.resolve_precision(args.precision)
    device.use_fast_fp32()  # what a training run (not --align) does
    resolve_compile(args, device.type, deterministic=False)
    clones = official.find_clones(args.official) if args.official else None
    sizes = args.sizes if args.sizes != 'auto' else 'small' if device.type == 'cpu' else 'published'
    names = [pair[sizes == 'published'] for pair in FAMILIES.values()] if args.all else [args.model or 'mae_vit_base']
    where = f'{precision} on {device_name(device)}, {compiled_how(args)}'
    if args.compile and not args.warmup:
        print('warning: --warmup 0 with compiling: the first timed step compiles the model, and the figures hold that')
    results = []
    for name in names:
        results.append(benchmark_model(name, args, device, precision, clones))
        print_model_figures(results[-1], where)
    print('\n| model | size | batch | precision | device | images/s | ms/step | GFLOPs/image | TFLOP/s | MFU | memory |\n'
          '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
    for r in results:
        print(f"| {r['model']} | {r['size']} | {r['batch']} | {precision} | {device_name(device)} | {r['ips']:.1f} | "
              f"{r['ms']:.1f} | {r['gflops']:.3f} | {r['tflops']:.3f} | {percent(r['mfu'])} | {r['memory']} |")
    compared = [r for r in results if isinstance(r.get('official'), dict)]
    if compared:
        columns = [v for v in OFFICIAL_COLUMNS if any(v in r['official'] for r in compared)]
        rounds = f'the best of {args.rounds} rounds taken in turns' if args.rounds > 1 else 'one round'
        print(f'\nAgainst the official code ({where}; images/s (MFU), {rounds}):\n'
              f'| model | weights | {" | ".join(columns)} | this project / official |\n'
              f'| --- | --- |{" --- |" * len(columns)} --- |')
        for r in compared:
            cells = [f'{ips:.1f} ({percent(mfu)})' for ips, mfu in (r['official'][v] for v in columns)]
            ratio = r['official'][THIS][0] / r['official']['official'][0]
            print(f"| {r['model']} | {r['official_weights']} | {' | '.join(cells)} | {ratio:.2f}x |")
    return results


# ---- loader mode -----------------------------------------------------------------------------

def pipeline_dataset(args):
    """The training samples and the collate function of the entry point's input pipeline, built
    by the functions the entry point uses.
    returns: (SeededSamples, collate_fn or None, description, the entry point's flags)"""
    bad_images = BadImages.of_run(None, 0)
    if args.finetune_pipeline:
        ft = training_args(main_finetune, args.model or 'vit_base_patch16', args.data_path, args.input_size)
        folder = build_finetune_train_folder(ft)
        mixup = main_finetune.build_mixup(ft, ft.nb_classes or len(folder.classes))
        dataset = SeededSamples(folder, ft.seed, batch_seeds=mixup is not None, bad_images=bad_images)
        return dataset, MixupCollate(mixup) if mixup else None, \
            f'main_finetune ({ft.model}, {ft.input_size} px, RandAugment {ft.aa}, random erasing {ft.reprob})', ft
    extra = ['--input_pipeline', args.input_pipeline] if args.input_pipeline else []
    if args.model and args.model not in pretrain_model_names() and timm.is_model(args.model):
        raise UsageError(f'--model {args.model} is a classifier: time main_finetune\'s pipeline with '
                         f'--finetune_pipeline')
    pre = training_args(main_pretrain, args.model or 'mae_vit_base', args.data_path, args.input_size, extra)
    masks = recipe_masks(create_pretrain_model(pre.model, img_size=pre.input_size), pre)
    dataset = build_pretrain_dataset(pre, masks, bad_images)
    collate_fn = JpegBatch.collate if pre.input_pipeline == 'nvjpeg' else None
    return dataset, collate_fn, f'main_pretrain ({pre.model}, {pre.input_size} px, {pre.input_pipeline} pipeline)', pre


def sample_indices(dataset, count):
    """`count` indices spread at random over the data set, the same every time."""
    return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count].tolist()


def images_per_second_one_core(load, indices):
    """Images/s of `load(index)` in this process on one thread: what one data-loader worker does
    (a worker runs torch with one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load(indices[0])  # the first call holds imports and caches
        start = time.perf_counter()
        for i in indices:
            load(i)
        return len(indices) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def images_per_second_loader(dataset, collate_fn, train_args, args, device=None):
    """Images/s of a DataLoader with --num_workers over the data set, in steady state: after the
    batches its workers made while the first one was awaited (worker start-up), which arrive at
    once; with a `device`, each batch's images are also put there as training does (the nvjpeg
    pipeline decodes them there). returns: (images/s, images timed)"""
    train_args.batch_size = args.batch_size or 64
    train_args.num_workers, train_args.accum_iter = args.num_workers, 1
    ready_early = 1 + args.num_workers * 2  # the first batch, and each worker's prefetch_factor (2) more
    full_batches = len(dataset) // train_args.batch_size
    if full_batches < ready_early + 2:  # checked before build_loader, whose advice (--accum_iter) is training's
        early = (f'after the {ready_early} the workers have ready at the start' if args.num_workers else
                 f'after the first')
        fewer = 'lower --batch_size or --num_workers' if args.num_workers else 'lower --batch_size'
        raise UsageError(f'the data set makes {counted(full_batches, "batch", "batches")} of {train_args.batch_size}, '
                         f'too few to time {early}: {fewer}')
    loader = build_loader(dataset, SimpleNamespace(world_size=1, rank=0), train_args,
                          pin_memory=device is not None and device.type != 'cpu', collate_fn=collate_fn)
    loader.sampler.set_epoch(0)

    def put(batch):
        if device is not None:
            to_device(batch[0], device.torch_device)
        return len(batch[0])

    batches = iter(loader)
    for _ in range(ready_early):
        put(next(batches))
    if device is not None:
        device.synchronize()
    images, start = 0, time.perf_counter()
    for batch in batches:
        images += put(batch)
        if images >= args.images:
            break
    if device is not None:
        device.synchronize()
    return images / (time.perf_counter() - start), images


def official_mae_load(path, transform):
    """The official MAE pipeline of one image: ImageFolder's pil_loader, then its transform."""
    return transform(pil_loader(path))


def run_loader(args):
    dataset, collate_fn, description, train_args = pipeline_dataset(args)
    device = resolve_device(args.device) if getattr(train_args, 'input_pipeline', None) == 'nvjpeg' else None
    indices = sample_indices(dataset, args.images)
    per_core = images_per_second_one_core(lambda i: dataset[(i, 0)], indices)
    print(f'input pipeline of {description}, {len(dataset)} images in {args.data_path}:')
    print(f'  one core (a data-loader worker): {per_core:.1f} images/s ({1000 / per_core:.2f} ms an image, '
          f'{len(indices)} images)' + (': reading and drawing the crops; the decoding is on the device' if device
                                       else ''), flush=True)
    total, timed = images_per_second_loader(dataset, collate_fn, train_args, args, device)
    decoded = f', decoded, cropped and resized on {device_name(device)}' if device else ''
    share = f'{total / args.num_workers:.1f} per worker' if args.num_workers else 'in the main process'
    print(f'  DataLoader, {counted(args.num_workers, "worker")}, batch {train_args.batch_size}{decoded}: {total:.1f} '
          f'images/s in total, {share} ({timed} images after those ready at the start)', flush=True)
    figures = {'per_core': per_core, 'total': total}
    if args.compare_official:
        paths = {i: dataset.dataset.samples[i][0] for i in indices}
        transform = pretrain_transform(train_args.input_size)  # the official MAE transform: crop (0.2, 1) bicubic
        official = images_per_second_one_core(lambda i: official_mae_load(paths[i], transform), indices)
        figures['official'] = official
        print(f'  official MAE transform (Pillow), same files, one core: {official:.1f} images/s; this pipeline / '
              f'official: {per_core / official:.2f}x per core')
    return figures


# ---- checkpoint mode -------------------------------------------------------------------------

def model_and_adamw(name, device):
    """The model and an AdamW whose moments exist (one step on zero gradients): the state a
    training checkpoint holds."""
    model = create_pretrain_model(name).to(device.torch_device)
    optimizer = build_adamw(param_groups(model, 0.05), 1e-4, (0.9, 0.95), device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


def state_of(model, optimizer, step):
    args = argparse.Namespace(batch_size=64, accum_iter=1, model='benchmark')
    return checkpoint.training_state(model, optimizer, None, 0, step, args)


def work(size=1024):
    """A stand-in for training steps: matrix products for about a second. returns: seconds"""
    a = torch.randn(size, size)
    start = time.perf_counter()
    for _ in range(20):
        a = torch.tanh(a @ a / size)
    return time.perf_counter() - start


def time_saves(writer, model, optimizer, path, saves, device):
    """`saves` saves, each after the write before it has ended. returns: ([stall s], [write s], slowdown)"""
    stalls, writes, slowdowns = [], [], []
    for step in range(saves):
        stalls.append(writer.save({path: state_of(model, optimizer, step)}))
        device.synchronize()
        if not writer.synchronous:
            slowdowns.append(work())  # runs while the write does
        writer.wait()
        writes.append(writer.write_seconds)
    return stalls, writes, slowdowns


def run_checkpoint_stall(args):
    """--checkpoint_stall: the seconds each save of a training checkpoint (weights and AdamW state)
    holds training up, synchronous (--sync_checkpoints) against the background writer (the first
    background save allocates its host buffers, later ones reuse them), the time of the write
    itself, and how much a stand-in for training slows down while a background write runs."""
    device = resolve_device(args.device)
    name = args.model or 'mae_vit_base'
    model, optimizer = model_and_adamw(name, device)
    tensors = [t for t in state_of(model, optimizer, 0)['model'].values()] + \
        [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    size = sum(t.numel() * t.element_size() for t in tensors)
    print(f'{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, '
          f'{size / 2 ** 30:.2f} GiB with the AdamW moments, on {device.torch_device}, '
          f'{counted(torch.get_num_threads(), "thread")}')
    alone = min(work() for _ in range(3))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, checkpoint.LAST)
        for name, writer in (('synchronous', CheckpointWriter(synchronous=True, synchronize=device.synchronize)),
                             ('background', CheckpointWriter(synchronize=device.synchronize))):
            stalls, writes, during = time_saves(writer, model, optimizer, path, args.saves, device)
            writer.close()
            line = (f'{name:>11}: training held up {", ".join(f"{s:.2f}" for s in stalls)} s per save; '
                    f'writes {", ".join(f"{w:.2f}" for w in writes)} s')
            if during:
                line += f'; training work during a write took {max(during) / alone:.2f}x its time alone ({alone:.2f} s)'
            print(line, flush=True)
        print(f'file size {os.path.getsize(path) / 2 ** 30:.2f} GiB')


def main(args):
    check_args(args)
    torch.manual_seed(0)
    if args.checkpoint_stall:
        return run_checkpoint_stall(args)
    return run_loader(args) if args.data_path else run_models(args)


if __name__ == '__main__':
    run_command(main, get_args_parser)
