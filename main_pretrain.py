"""Self-supervised pre-training (MAE).

    python main_pretrain.py --model mae_vit_tiny --data_path demo --input_size 64 ...
    torchrun --nproc_per_node 8 main_pretrain.py --model mae_vit_base --data_path /imagenet

Defaults are the published MAE recipe (ViT-B: 800 epochs, batch 4096, blr 1.5e-4, warm-up 40,
AdamW (0.9, 0.95), wd 0.05, normalised-pixel targets). This file parses arguments and wires
the parts together; the loop is util/engine.py.
"""
import argparse
import json
import os
import time
from functools import partial

import torch

from util import checkpoint, dist
from util.datasets import SeededSamples, build_image_folder, build_loader, pretrain_transform
from util.device import AUTO_ORDER, PRECISIONS, resolve_device
from util.engine import Progress, train
from util.errors import UsageError, run_cli
from util.logger import RunLogger
from util.masking import UniformNoise
from util.optim import build_adamw, param_groups
from util.registry import create_pretrain_model


def get_args_parser():
    parser = argparse.ArgumentParser('Masked-image-modeling pre-training', add_help=True)
    parser.add_argument('--batch_size', default=64, type=int,
                        help='images per device per step; effective batch = batch_size * accum_iter * devices '
                             '(published recipe: 4096, e.g. 64 x 8 x 8 GPUs)')
    parser.add_argument('--epochs', default=800, type=int)
    parser.add_argument('--accum_iter', default=1, type=int,
                        help='accumulate gradients over this many micro-batches per optimizer step')

    parser.add_argument('--model', default='mae_vit_base_patch16', type=str, help='model name, e.g. mae_vit_base')
    parser.add_argument('--input_size', default=224, type=int, help='image size in pixels')
    parser.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches masked')
    parser.add_argument('--norm_pix_loss', default=True, action=argparse.BooleanOptionalAction,
                        help='per-patch normalised pixels as the target (published recipe; '
                             '--no-norm_pix_loss for raw pixels)')

    parser.add_argument('--weight_decay', type=float, default=0.05)
    parser.add_argument('--lr', type=float, default=None, help='absolute learning rate (default: blr * batch / 256)')
    parser.add_argument('--blr', type=float, default=1.5e-4,
                        help='base learning rate: lr = blr * effective batch size / 256')
    parser.add_argument('--min_lr', type=float, default=0., help='lower bound of the cosine schedule')
    parser.add_argument('--warmup_epochs', type=int, default=40, help='epochs of linear warm-up')
    parser.add_argument('--clip_grad', type=float, default=None,
                        help='clip the gradient norm to this value (off in the published MAE recipe)')

    parser.add_argument('--data_path', required=True, type=str,
                        help='ImageFolder root with train/ (e.g. ImageNet), or "demo" for the built-in set')
    parser.add_argument('--output_dir', default='./output_dir', help='checkpoints, log.jsonl, log.txt')
    parser.add_argument('--log_dir', default=None, help='TensorBoard directory (default: output_dir)')
    parser.add_argument('--device', default='auto', choices=('auto',) + AUTO_ORDER,
                        help='auto picks the first present of ' + ', '.join(AUTO_ORDER))
    parser.add_argument('--precision', default='auto', choices=PRECISIONS,
                        help='autocast dtype; auto: bf16 where supported, else fp16 (with loss scaling), '
                             'fp32 on the CPU')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--seed', default=0, type=int)
    parser.add_argument('--resume', default='',
                        help='checkpoint to resume from (default: <output_dir>/checkpoint-last.pth if present)')
    parser.add_argument('--start_epoch', default=0, type=int, help='first epoch when not resuming')
    parser.add_argument('--max_steps', default=None, type=int,
                        help='stop after this many optimizer steps (smoke and performance runs)')
    parser.add_argument('--save_freq', default=20, type=int, help='keep checkpoint-<epoch>.pth every N epochs')
    parser.add_argument('--log_freq', default=20, type=int, help='log every N optimizer steps')
    parser.add_argument('--num_workers', default=min(10, os.cpu_count() or 1), type=int,
                        help='data-loading processes per training process (default: 10, or the number of CPUs if fewer)')
    parser.add_argument('--pin_mem', default=True, action=argparse.BooleanOptionalAction,
                        help='pin host memory in the data loader for faster copies to the device')
    return parser


def check_args(args):
    if not 0 <= args.mask_ratio < 1:
        raise UsageError(f'--mask_ratio must be in [0, 1), got {args.mask_ratio}')
    for name in ('batch_size', 'epochs', 'accum_iter', 'log_freq', 'save_freq'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f'--max_steps must be at least 1, got {args.max_steps}')


def mim_loss(model, batch, forward_kwargs):
    """The loss of one batch of (images, mask arguments from the mask generator)."""
    images, mask_kwargs = batch
    loss, _, _ = model(images, **mask_kwargs, **forward_kwargs)
    return loss


def main(args):
    check_args(args)
    world = dist.read_world_from_env()
    device = resolve_device(args.device, world.local_rank)
    dist.init_process_group(world, device)
    precision = device.resolve_precision(args.precision)
    args.log_dir = args.log_dir or args.output_dir
    print(f'device: {device.torch_device} x {world.world_size} processes, precision: {precision}')
    print(json.dumps(vars(args), indent=1))

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = create_pretrain_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    model.to(device.torch_device)
    print(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters')

    dataset = SeededSamples(build_image_folder(args.data_path, 'train', pretrain_transform(args.input_size)),
                            args.seed, mask_generator=UniformNoise(model.num_patches))
    loader = build_loader(dataset, world, args, pin_memory=args.pin_mem and device.type != 'cpu')
    print(f'{len(dataset)} training images, {len(loader)} batches of {args.batch_size} per process')

    eff_batch_size = args.batch_size * args.accum_iter * world.world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch_size / 256
    print(f'effective batch size {eff_batch_size}, lr {args.lr:.3e} (blr {args.blr:.3e})')

    optimizer = build_adamw(param_groups(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    scaler = device.grad_scaler(precision)
    start_epoch, start_iter, progress = args.start_epoch, 0, Progress()
    resume = checkpoint.resume_path(args.resume, args.output_dir)
    if resume:
        start_epoch, start_iter, progress.step = checkpoint.restore_training_state(resume, model, optimizer, scaler)
        print(f'resumed from {resume}: epoch {start_epoch}, iteration {start_iter}, step {progress.step}')

    model_ddp = dist.wrap_ddp(model, device)
    if args.compile:
        model_ddp = torch.compile(model_ddp)
    logger = RunLogger(args.output_dir, args.log_dir, enabled=dist.is_main_process())
    loss_fn = partial(mim_loss, forward_kwargs={'mask_ratio': args.mask_ratio})

    if start_epoch >= args.epochs:
        print(f'nothing to train: the run in {args.output_dir} has finished its {args.epochs} epochs '
              f'(raise --epochs to train longer)')
    else:
        print(f'training epochs {start_epoch} to {args.epochs - 1}')
    start_time = time.time()
    stats = train(model_ddp, model, loss_fn, loader, optimizer, scaler, device, precision, args, logger,
                  start_epoch=start_epoch, start_iter=start_iter, progress=progress)
    logger.close()
    print(f'training time {time.time() - start_time:.0f} s')
    if stats:
        print(f"steady-state throughput: {stats['ips']:.1f} images/s; final loss {stats['loss']:.4f}")
    if args.output_dir:
        print(f'checkpoint: {os.path.join(args.output_dir, checkpoint.LAST)}\n'
              f'logs: {os.path.join(args.output_dir, "log.jsonl")} (steps), '
              f'{os.path.join(args.output_dir, "log.txt")} (epochs)\n'
              f'TensorBoard: tensorboard --logdir {args.log_dir}')
    dist.destroy_process_group()


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
