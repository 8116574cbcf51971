"""Self-supervised pre-training: MAE, SimMIM.

    python main_pretrain.py --model mae_vit_tiny --data_path demo ...
    torchrun --nproc_per_node 8 main_pretrain.py --model mae_vit_base --data_path /imagenet
    torchrun --nproc_per_node 8 main_pretrain.py --model simmim_swin_base --data_path /imagenet

The defaults are the published recipe of --model, kept beside its factory in its model file (MAE
ViT-B: 800 epochs, batch 4096, blr 1.5e-4, warm-up 40, AdamW (0.9, 0.95), wd 0.05, normalised
pixels; SimMIM Swin-B: 100 epochs at 192 px, batch 2048, 2e-4 per 512 images, clipping 5);
every flag overrides it. This file parses arguments and wires the parts together; the loop is
util/engine.py.
"""
import argparse
import time
from functools import partial

import torch

from util import checkpoint, dist
from util.datasets import (INPUT_PIPELINES, EpochSampler, JpegBatch, build_loader, build_pretrain_dataset,
                           check_data_path, eval_images)
from util.images import BadImages, require_jpeg_decoder
from util.engine import train
from util.errors import UsageError, run_command
from util.feature_eval import KnnMonitor, add_knn_k_argument, feature_loaders
from util.flops import FlopRate, example_batch
from util.compiling import compile_and_wrap
from util.determinism import fingerprint, switch_off_drop_path
from util.flags import add_run_args, add_schedule_args, apply_recipe, set_learning_rate
from util.launch import print_outputs, resume_training, start_run
from util.logger import RunLogger
from util.optim import build_adamw, param_groups
from util.pictures import ReconstructionMonitor
from util.registry import create_pretrain_model, model_names_by_method, pretrain_recipe

DEFAULT_MODEL = 'mae_vit_base_patch16'
VIS_IMAGES = 8  # the rows of the reconstructions in TensorBoard


def recipe_note(flag):
    """--help: where a default comes from, with the default model's and SimMIM Swin-B's values."""
    values = {name: pretrain_recipe(name).get(flag) for name in (DEFAULT_MODEL, 'simmim_swin_base')}
    shown = ', '.join(f'{name}: {value}' for name, value in values.items() if value is not None)
    return f'default: the recipe of --model ({shown})' if shown else 'default: the recipe of --model'


def get_args_parser():
    # no shortened flags: --batch=4 passed through a ModelZoo script, which reads the full names, ran another case
    # than the one it reported (and every tool takes only the names --help shows)
    parser = argparse.ArgumentParser(description='Masked-image-modeling pre-training (MAE, SimMIM, MaskFeat, '
                                                 'MAE-HiViT). Flags left out take the published recipe of --model.',
                                     allow_abbrev=False)
    add_schedule_args(parser, recipe_note)
    parser.add_argument('--model', default=None, type=str,
                        help=f'pre-training model, by official name or alias (default: {DEFAULT_MODEL}, or the '
                             f'model of the checkpoint a run resumes). '
                             f'{model_names_by_method()}')
    parser.add_argument('--input_size', default=None, type=int, help='image size in pixels; ' + recipe_note('input_size'))
    parser.add_argument('--crop_min', default=None, type=float,
                        help='smallest area of the random crop, as a fraction of the image; ' + recipe_note('crop_min'))
    parser.add_argument('--interpolation', default=None, choices=('bicubic', 'bilinear'),
                        help='resampling of the random crop; ' + recipe_note('interpolation'))
    parser.add_argument('--mask_ratio', default=None, type=float,
                        help='fraction of patches (MAE) or mask units (SimMIM) masked; ' + recipe_note('mask_ratio'))
    parser.add_argument('--mask_patch_size', default=None, type=int,
                        help='SimMIM: side in pixels of the square units masked together, a multiple of the '
                             'patch size; ' + recipe_note('mask_patch_size'))
    parser.add_argument('--mask_count', default=None, type=int,
                        help='MaskFeat: patches masked per image (default: --mask_ratio of them, 78 of 196 at 224 px)')
    parser.add_argument('--mask_min_patches', default=None, type=int,
                        help='MaskFeat: smallest block of the block-wise masks, in patches; ' +
                             recipe_note('mask_min_patches'))
    parser.add_argument('--mask_min_aspect', default=None, type=float,
                        help='MaskFeat: the blocks\' aspect ratio lies in [this, 1 / this]; ' +
                             recipe_note('mask_min_aspect'))
    parser.add_argument('--norm_pix_loss', default=None, action=argparse.BooleanOptionalAction,
                        help='MAE: per-patch normalised pixels as the target (--no-norm_pix_loss for raw pixels); '
                             + recipe_note('norm_pix_loss'))
    parser.add_argument('--input_pipeline', default=None, choices=INPUT_PIPELINES,
                        help='tensor: JPEGs decoded by libjpeg-turbo, cropped, resized and flipped as uint8 tensors, '
                             'normalised on the device (1.8x the images/s of a data-loader core on ImageNet-like '
                             'JPEGs); pil: the torchvision transforms on Pillow images, normalised in the workers, as '
                             'before. The '
                             'same crops and flips; the pixels differ by resampling rounding (mean 0.05 of 255, at '
                             'most 1 bilinear, 4 bicubic); nvjpeg: the workers only read the files and draw the crops, '
                             'the GPU decodes each batch (nvJPEG) and crops, resizes and flips it: for hosts with too '
                             'few cores to decode (CUDA; on the CPU the training process decodes) (default: tensor; '
                             'pil with --align, whose pixels do not depend on the CPU)')
    add_run_args(parser)
    parser.add_argument('--knn_freq', default=0, type=int,
                        help='every N epochs and at the last, the k-NN accuracy of the encoder\'s features on val/, '
                             'with train/ as the reference (knn_acc1 in log.txt, log.jsonl and TensorBoard): a curve '
                             'of what the representation is worth. Each costs a forward pass over train/ and val/ '
                             '(seconds on the demo, minutes on ImageNet: knn_seconds says) (default: 0, off)')
    add_knn_k_argument(parser)
    parser.add_argument('--vis_freq', default=None, type=int,
                        help=f'every N epochs and at the last, reconstructions of {VIS_IMAGES} fixed val/ images go to '
                             f'TensorBoard (default: --save_freq; 0: never)')
    parser.add_argument('--align', action='store_true',
                        help='loss-curve alignment with a run on another device: deterministic kernels, fp32 unless '
                             '--precision is given, a log line every step unless --log_freq is given, and '
                             'fingerprints of the initial weights, the data order and sample 0 (its crop and '
                             'mask) printed, the pil input pipeline unless --input_pipeline is given, drop path off '
                             '(the device draws it; SimMIM ViT pre-trains with 0.1). Weights, data '
                             'order, crops and masks come from seeded CPU generators '
                             'in every run')
    return parser


def mim_loss(model, batch, forward_kwargs):
    """The loss of one batch of (images, mask arguments from the mask generator)."""
    images, mask_kwargs = batch
    loss, _, _ = model(images, **mask_kwargs, **forward_kwargs)
    return loss


def use_alignment_defaults(args):
    """--align: fp32, a log line every step and the pil input pipeline, unless the flags say otherwise."""
    if args.precision == 'auto':
        args.precision = 'fp32'  # 'auto' would be bf16 on a GPU and fp32 on the CPU
    if args.log_freq is None:
        args.log_freq = 1
    if args.input_pipeline is None:
        args.input_pipeline = 'pil'  # Pillow's integer resampling: the same pixels on an x86 and an Arm host


def print_fingerprints(model, dataset, seed):
    """Hashes of the initial weights, of the order of epoch 0 over all processes, and of sample 0
    of epoch 0 (its crop and its mask noise): two runs to be aligned must print the same three."""
    order = [index for index, _ in EpochSampler(dataset, num_replicas=1, rank=0, seed=seed)]
    image, mask_kwargs = dataset[(0, 0)]
    print(f'align: initial weights {fingerprint(model.state_dict().values())}, '
          f'data order {fingerprint([torch.tensor(order)])}, sample 0 {fingerprint([image, *mask_kwargs.values()])}')


# A method's own flags: the recipe entry that the models of that method have, and whose flag it is
METHOD_FLAGS = {'norm_pix_loss': ('norm_pix_loss', 'MAE\'s and MAE-HiViT\'s'),
                'mask_patch_size': ('mask_patch_size', 'SimMIM\'s'),
                'mask_count': ('mask_min_patches', 'MaskFeat\'s'),
                'mask_min_patches': ('mask_min_patches', 'MaskFeat\'s'),
                'mask_min_aspect': ('mask_min_aspect', 'MaskFeat\'s')}


def check_method_flags(args, recipe):
    """Another method's flag would be ignored (or fail in the model's constructor): refused."""
    for flag, (entry, whose) in METHOD_FLAGS.items():
        if getattr(args, flag) is not None and entry not in recipe:
            raise UsageError(f'--{flag} is {whose} option, which {args.model} does not have: leave it out')
    if args.mask_count is not None and args.mask_ratio is not None:  # the count decides: the ratio would be ignored
        raise UsageError(f'--mask_count {args.mask_count} and --mask_ratio {args.mask_ratio} both say how many patches '
                         f'to mask: give one of them')


def fill_recipe(args):
    """The flags left unset take the published recipe of --model (of --epochs epochs when the model
    has one of that length, e.g. SimMIM Swin-B's 800-epoch recipe), then --align's defaults, then
    the tensor input pipeline. returns: what was chosen, in words"""
    args.model = args.model or checkpoint.resumed_model(args) or DEFAULT_MODEL
    recipe = pretrain_recipe(args.model, args.epochs)
    check_method_flags(args, recipe)
    apply_recipe(args, recipe)
    if args.align:
        use_alignment_defaults(args)
    args.input_pipeline = args.input_pipeline or 'tensor'
    # not "published": the tiny models' recipes are their base model's, at their size
    return f"recipe: {args.model}'s {recipe.get('epochs')}-epoch recipe of its model file; the flags given override it"


def check_input_pipeline(args, device):
    """nvjpeg decodes with torchvision's CUDA decoder (or on the CPU): no other device has one, and
    its pixels are the GPU's, which another device cannot reproduce under --align."""
    if args.input_pipeline != 'nvjpeg':
        return
    require_jpeg_decoder('--input_pipeline nvjpeg')
    if device.type not in ('cuda', 'cpu'):
        raise UsageError(f'--input_pipeline nvjpeg decodes on CUDA GPUs only, not on {device.type}: use tensor')
    if args.align:
        raise UsageError('--input_pipeline nvjpeg decodes with the GPU\'s arithmetic, which another device cannot '
                         'reproduce: leave it out under --align (pil)')
    if device.type == 'cpu':  # allowed: it runs the path's code without a GPU
        print('note: --input_pipeline nvjpeg on the CPU decodes in the training process, one batch at a time (nvJPEG '
              'is a GPU decoder); tensor decodes in the loader workers')


def after_each_epoch(*hooks):
    """One after_epoch hook running the given ones (None: absent) and merging their results."""
    hooks = [hook for hook in hooks if hook is not None]

    def run(epoch, stats):
        results = {}
        for hook in hooks:
            results.update(hook(epoch, stats))
        return results
    return run if hooks else None


def main(args):
    recipe = fill_recipe(args)
    checkpoint.check_resumed_checkpoint(args)
    world, device, precision = start_run(args, deterministic=args.align)
    check_input_pipeline(args, device)
    check_data_path(args.data_path)  # the dataset itself needs the model's mask generator
    print(recipe)

    torch.manual_seed(args.seed)  # the same initial weights on every rank, drawn on the CPU
    model_kwargs = {'img_size': args.input_size}
    if args.norm_pix_loss is not None:  # MAE's option (check_method_flags)
        model_kwargs['norm_pix_loss'] = args.norm_pix_loss
    model = create_pretrain_model(args.model, **model_kwargs)
    print(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters')
    mask_generator = model.mask_generator(args)
    dataset = build_pretrain_dataset(args, mask_generator, BadImages.of_run(args.output_dir, world.rank))
    if args.align:
        print_fingerprints(model, dataset, args.seed)
        switched_off = switch_off_drop_path(model)
        if switched_off:
            print(switched_off)
    model.to(device.torch_device)
    loader = build_loader(dataset, world, args, pin_memory=args.pin_mem and device.type != 'cpu',
                          collate_fn=JpegBatch.collate if args.input_pipeline == 'nvjpeg' else None)
    print(f'{len(dataset)} training images, {len(loader)} batches of {args.batch_size} per process')

    set_learning_rate(args)
    optimizer = build_adamw(param_groups(model, args.weight_decay), args.lr, tuple(args.opt_betas), device)
    scaler = device.grad_scaler(precision)
    start_epoch, start_iter, progress = resume_training(args, model, optimizer, scaler, len(dataset))

    loss_fn = partial(mim_loss, forward_kwargs=mask_generator.forward_kwargs)
    # counted before compile_and_wrap: --grad_ckpt's recomputation is not model FLOPs
    flop_rate = FlopRate.of_run(model, loss_fn, example_batch(2, args.input_size, mask_generator), device, precision,
                                world.world_size, args.peak_tflops)
    model_ddp = compile_and_wrap(model, device, args)
    logger = RunLogger(args.output_dir, args.log_dir, enabled=dist.is_main_process())
    monitor = None
    every = args.save_freq if args.vis_freq is None else args.vis_freq
    if logger.draws_images and every:  # the same images and masks at every epoch shown
        images = eval_images(args.data_path, VIS_IMAGES, args.input_size, what='the pictures of --vis_freq (0 turns '
                                                                              'them off)')
        monitor = ReconstructionMonitor(model, mask_generator, images.to(device.torch_device), logger, every, args.epochs)
    knn = None
    if args.knn_freq != 0:
        train_loader, val_loader, num_classes = feature_loaders(args, world, args.pin_mem and device.type != 'cpu',
                                                                beside_training=True)
        knn = KnnMonitor(model, (train_loader, val_loader), device, precision, num_classes, args.knn_k,
                         args.knn_freq, args.epochs, logger, progress)
    start_time = time.time()
    stats = train(model_ddp, model, loss_fn, loader, optimizer, scaler, device, precision, args, logger,
                  start_epoch=start_epoch, start_iter=start_iter, progress=progress,
                  after_epoch=after_each_epoch(monitor, knn), flop_rate=flop_rate)
    logger.close()
    print_outputs(args, stats, time.time() - start_time, dataset.bad_images)
    dist.destroy_process_group()


if __name__ == '__main__':
    run_command(main, get_args_parser)
