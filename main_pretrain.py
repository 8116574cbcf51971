"""Self-supervised pre-training (MAE).

    python main_pretrain.py --model mae_vit_tiny --data_path demo --input_size 64 ...
    torchrun --nproc_per_node 8 main_pretrain.py --model mae_vit_base --data_path /imagenet

Defaults are the published MAE recipe (ViT-B: 800 epochs, batch 4096, blr 1.5e-4, warm-up 40,
AdamW (0.9, 0.95), wd 0.05, normalised-pixel targets). This file parses arguments and wires
the parts together; the loop is util/engine.py.
"""
import argparse
import time
from functools import partial

import torch

from util import dist
from util.datasets import EpochSampler, SeededSamples, build_image_folder, build_loader, pretrain_transform
from util.engine import train
from util.errors import UsageError, run_cli
from util.launch import (add_run_args, add_schedule_args, compile_and_wrap, fingerprint, print_outputs,
                         resume_training, set_learning_rate, start_run)
from util.logger import RunLogger
from util.masking import UniformNoise
from util.optim import build_adamw, param_groups
from util.registry import create_pretrain_model


RECIPE = dict(batch_size=64, epochs=800, blr=1.5e-4, weight_decay=0.05, min_lr=0.0, warmup_epochs=40)


def get_args_parser():
    parser = argparse.ArgumentParser('Masked-image-modeling pre-training', add_help=True)
    add_schedule_args(parser, RECIPE, {'batch_size': 'default 64; the MAE recipe has an effective batch of 4096, '
                                                     'e.g. 64 per device x 8 accumulation steps x 8 devices'})
    parser.add_argument('--model', default='mae_vit_base_patch16', type=str, help='model name, e.g. mae_vit_base')
    parser.add_argument('--input_size', default=224, type=int, help='image size in pixels')
    parser.add_argument('--mask_ratio', default=0.75, type=float, help='fraction of patches masked')
    parser.add_argument('--norm_pix_loss', default=True, action=argparse.BooleanOptionalAction,
                        help='per-patch normalised pixels as the target (published recipe; '
                             '--no-norm_pix_loss for raw pixels)')
    add_run_args(parser)
    parser.add_argument('--align', action='store_true',
                        help='loss-curve alignment with a run on another device: deterministic kernels, fp32 unless '
                             '--precision is given, a log line every step unless --log_freq is given, and '
                             'fingerprints of the initial weights, the data order and sample 0 (its crop and '
                             'mask) printed. Weights, data order, crops and masks come from seeded CPU generators '
                             'in every run')
    return parser


def mim_loss(model, batch, forward_kwargs):
    """The loss of one batch of (images, mask arguments from the mask generator)."""
    images, mask_kwargs = batch
    loss, _, _ = model(images, **mask_kwargs, **forward_kwargs)
    return loss


def use_alignment_defaults(args):
    """--align: fp32 and a log line every step, unless the flags say otherwise."""
    if args.precision == 'auto':
        args.precision = 'fp32'  # 'auto' would be bf16 on a GPU and fp32 on the CPU
    if args.log_freq is None:
        args.log_freq = 1


def print_fingerprints(model, dataset, seed):
    """Hashes of the initial weights, of the order of epoch 0 over all processes, and of sample 0
    of epoch 0 (its crop and its mask noise): two runs to be aligned must print the same three."""
    order = [index for index, _ in EpochSampler(dataset, num_replicas=1, rank=0, seed=seed)]
    image, mask_kwargs = dataset[(0, 0)]
    print(f'align: initial weights {fingerprint(model.state_dict().values())}, '
          f'data order {fingerprint([torch.tensor(order)])}, sample 0 {fingerprint([image, *mask_kwargs.values()])}')


def main(args):
    if not 0 <= args.mask_ratio < 1:
        raise UsageError(f'--mask_ratio must be in [0, 1), got {args.mask_ratio}')
    if args.align:
        use_alignment_defaults(args)
    world, device, precision = start_run(args, deterministic=args.align)

    torch.manual_seed(args.seed)  # the same initial weights on every rank, drawn on the CPU
    model = create_pretrain_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss)
    print(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters')
    dataset = SeededSamples(build_image_folder(args.data_path, 'train', pretrain_transform(args.input_size)),
                            args.seed, mask_generator=UniformNoise(model.num_patches))
    if args.align:
        print_fingerprints(model, dataset, args.seed)
    model.to(device.torch_device)
    loader = build_loader(dataset, world, args, pin_memory=args.pin_mem and device.type != 'cpu')
    print(f'{len(dataset)} training images, {len(loader)} batches of {args.batch_size} per process')

    set_learning_rate(args, world)
    optimizer = build_adamw(param_groups(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    scaler = device.grad_scaler(precision)
    start_epoch, start_iter, progress = resume_training(args, model, optimizer, scaler)

    model_ddp = compile_and_wrap(model, device, args)
    logger = RunLogger(args.output_dir, args.log_dir, enabled=dist.is_main_process())
    loss_fn = partial(mim_loss, forward_kwargs={'mask_ratio': args.mask_ratio})
    start_time = time.time()
    stats = train(model_ddp, model, loss_fn, loader, optimizer, scaler, device, precision, args, logger,
                  start_epoch=start_epoch, start_iter=start_iter, progress=progress)
    logger.close()
    print_outputs(args, stats, time.time() - start_time)
    dist.destroy_process_group()


if __name__ == '__main__':
    run_cli(main, get_args_parser().parse_args())
