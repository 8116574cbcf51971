"""Pictures: what a pre-trained model reconstructs, and the curves of training runs.

    python visualize.py --checkpoint output_dir/checkpoint-last.pth --data_path demo --output recon.png
    python visualize.py --model mae_vit_large --checkpoint mae_visualize_vit_large.pth --no-norm_pix_loss \\
        --data_path photo.jpg --output recon.png
    python visualize.py --logs output/run1 output/run2 --output curves.png

Reconstructions: one row per image. MAE, MAE-HiViT and SimMIM show the original, the masked
input, the reconstruction and the reconstruction with the visible patches pasted back; MaskFeat
shows the input, the masked input, the HOG of the input (its target) and the predicted HOG of the
masked patches. The model, its image size and its masking come from the checkpoint's run (a flag
overrides them); a checkpoint that does not record its model (an official release) needs
--model. Models trained with a norm-pix loss predict each patch normalised: it is shown with the
mean and variance of the original patch, and the figure says so.

Curves (--logs): the loss and the learning rate of one or more runs against the step, from
their log.jsonl.
"""
import argparse
import os

from util import checkpoint
from util.datasets import DEMO, load_eval_images
from util.device import resolve_device
from util.errors import UsageError, run_command
from util.flags import check_size_and_mask_ratio
from util.logger import counted
from util.masking import MaskingError
from util.pictures import reconstruct
from util.plots import check_plot_path, draw_training_curves, write_figure
from util.registry import create_pretrain_model, pretrain_recipe, pretraining_of

# the figure: each panel PANEL_INCHES square, a header for the title and the notes, at DPI
PANEL_INCHES, HEADER_INCHES, DPI = 2.0, 0.8, 100
# what a pre-training run records that decides its model and its masks
MODEL_SETTINGS = ('input_size', 'norm_pix_loss', 'mask_ratio', 'mask_patch_size', 'mask_count', 'mask_min_patches',
                  'mask_min_aspect')


def get_args_parser():
    parser = argparse.ArgumentParser(description='Pictures of pre-trained models and of training runs',
                                     allow_abbrev=False)
    parser.add_argument('--checkpoint', type=os.path.expanduser, default=None,
                        help='a pre-training checkpoint (this project\'s, or an official release with its decoder)')
    parser.add_argument('--model', default=None,
                        help='pre-training model name (default: the one recorded in the checkpoint)')
    parser.add_argument('--data_path', type=os.path.expanduser, default=DEMO,
                        help='an image file, a folder of images, an ImageFolder root (its val/ images, else '
                             'train/), or demo (default)')
    parser.add_argument('--num_images', default=4, type=int,
                        help='rows of the figure, spread over the images (default: 4)')
    parser.add_argument('--mask_ratio', default=None, type=float, help='default: the checkpoint\'s run')
    parser.add_argument('--norm_pix_loss', default=None, action=argparse.BooleanOptionalAction,
                        help='MAE: the model predicts per-patch normalised pixels (default: the checkpoint\'s run, '
                             'else the recipe; the official mae_visualize_*.pth need --no-norm_pix_loss)')
    parser.add_argument('--seed', default=0, type=int, help='seed of the masks')
    parser.add_argument('--input_size', default=None, type=int,
                        help='the size a checkpoint that records none was trained at (default: the checkpoint\'s run, '
                             'else the model\'s own)')
    parser.add_argument('--device', default='cpu', help='auto, cuda, npu, sdaa, mps or cpu')
    parser.add_argument('--logs', type=os.path.expanduser, nargs='+', default=None, metavar='RUN',
                        help='draw the loss and lr curves of these runs (output folders or log.jsonl files) instead')
    parser.add_argument('--output', type=os.path.expanduser, default=None,
                        help='the figure to write, its type from the extension: reconstructions are .png only '
                             '(lossless: the pixels as the model gave them), curves (--logs) .png, .jpg, .pdf or .svg '
                             '(default: reconstructions.png, or curves.png with --logs)')
    return parser


def model_settings(name, ckpt, args):
    """The model's image size and masking: the flags given, else the checkpoint's run, else the
    published recipe. returns: a Namespace with MODEL_SETTINGS"""
    saved = checkpoint.saved_args(ckpt)
    settings = pretrain_recipe(name, saved.get('epochs'))
    settings.update({k: saved[k] for k in MODEL_SETTINGS if saved.get(k) is not None})
    settings.update({k: getattr(args, k) for k in MODEL_SETTINGS if getattr(args, k, None) is not None})
    if args.mask_ratio is not None:  # the ratio given decides, not a MaskFeat run's --mask_count
        settings['mask_count'] = None
    return argparse.Namespace(**{k: settings.get(k) for k in MODEL_SETTINGS})


def load_pretraining_model(args):
    """The pre-training model of --checkpoint with its weights. returns: (model name, model, settings)"""
    path = args.checkpoint
    ckpt = checkpoint.load(path)
    name = args.model or pretraining_of(ckpt)[0]
    if name is None:
        saved = checkpoint.saved_args(ckpt)
        written_by = saved.get('model')
        if checkpoint.of_finetuning(saved):  # a classifier, which has no decoder
            raise UsageError(f'{path} is a checkpoint of main_finetune.py ({written_by}), a classifier without a '
                             f'decoder: reconstructions need a pre-training checkpoint (main_pretrain.py\'s, or a '
                             f'release with its decoder such as mae_visualize_vit_large.pth)')
        raise UsageError(f'{path} does not say which pre-training model wrote it'
                         f'{f" (its run trained {written_by}, which is not a pre-training model)" if written_by else ""}'
                         f': give --model, e.g. --model mae_vit_large for the official mae_visualize_vit_large.pth')
    checkpoint.check_recorded_input_size(checkpoint.saved_args(ckpt), args.input_size, path, 'visualize.py draws')
    settings = model_settings(name, ckpt, args)
    kwargs = {'img_size': settings.input_size}
    takes_norm_pix_loss = 'norm_pix_loss' in pretrain_recipe(name)  # MAE's models; the others' constructors fail
    if args.norm_pix_loss is not None and not takes_norm_pix_loss:
        raise UsageError(f'--norm_pix_loss is an option of MAE\'s and MAE-HiViT\'s models, which {name} is not: '
                         f'leave it out')
    if settings.norm_pix_loss is not None and takes_norm_pix_loss:  # not an MAE run's value for --model simmim_*
        kwargs['norm_pix_loss'] = settings.norm_pix_loss
    model = create_pretrain_model(name, **kwargs)
    try:
        state = checkpoint.in_model_layout(model, checkpoint.model_state_of(ckpt, path), path)
        missing = [k for k in model.state_dict() if k not in state]
        decoder = ('decoder', 'mask_token')
        if missing and all(k.startswith(decoder) for k in missing) and not any(k.startswith(decoder) for k in state):
            raise UsageError(f'{path} holds an encoder without its decoder (like the released '
                             f'mae_pretrain_vit_base.pth): reconstructions need the whole pre-training model, e.g. '
                             f'mae_visualize_vit_large.pth, mae_pretrain_vit_large_full.pth or a checkpoint of '
                             f'main_pretrain.py')
        checkpoint.load_weights(model, state, path)
    except checkpoint.WeightsDoNotFit as e:  # --model of another size than the run's, or --input_size
        advice = (checkpoint.written_by_advice(args.model, pretraining_of(ckpt)[0])
                  or checkpoint.input_size_advice(model, checkpoint.model_state_of(ckpt, path)))
        raise checkpoint.WeightsDoNotFit(f'{e}{advice}') from None
    return name, model, settings


def draw_panels(path, panels, title):
    """A PNG of the panels: a column per panel, a row per image, the column titles on top and the
    notes under the title. Its size is PANEL_INCHES per panel plus HEADER_INCHES, at DPI."""
    from matplotlib.figure import Figure
    rows, columns = panels.images[0].shape[0], len(panels.images)
    figure = Figure(figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES + HEADER_INCHES), dpi=DPI)
    top = 1 - HEADER_INCHES / (rows * PANEL_INCHES + HEADER_INCHES)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.04)
    axes = figure.subplots(rows, columns, squeeze=False)
    for column, (name, images) in enumerate(zip(panels.titles, panels.images)):
        axes[0, column].set_title(name, fontsize=10)
        for row in range(rows):
            axes[row, column].imshow(images[row].permute(1, 2, 0).cpu().numpy(), interpolation='nearest')
            axes[row, column].set_axis_off()
    figure.suptitle('\n'.join([title, *panels.notes]), fontsize=10, y=0.995, va='top', wrap=True)
    write_figure(figure, path)


def check_output(path, default):
    path = path or default
    if not path.lower().endswith('.png'):
        reason = 'has no extension' if not os.path.splitext(path)[1] else 'is not a .png file'
        raise UsageError(f'--output {path} {reason}: pictures are written as .png, lossless (a .jpg would blur the '
                         f'reconstructed pixels): give a name such as {os.path.splitext(path)[0]}.png')
    check_plot_path(path)  # the folder exists
    return path


def draw_reconstructions(args):
    if not args.checkpoint:
        raise UsageError('give --checkpoint (a pre-training checkpoint), or --logs RUN ... to draw training curves')
    if args.num_images < 1:
        raise UsageError(f'--num_images must be at least 1, got {args.num_images}')
    check_size_and_mask_ratio(args)
    output = check_output(args.output, 'reconstructions.png')
    device = resolve_device(args.device)
    name, model, settings = load_pretraining_model(args)
    images = load_eval_images(args.data_path, args.num_images, settings.input_size)
    model.to(device.torch_device)
    try:
        masks = model.mask_generator(settings)
    except MaskingError as e:  # its advice is on main_pretrain.py's flags
        raise UsageError(f'{e.problem} (the masking of the checkpoint\'s run, with the flags given): give another '
                         f'--mask_ratio or --input_size') from None
    panels = reconstruct(model, images.to(device.torch_device), masks, args.seed)
    masking = f'{settings.mask_count} patches masked' if settings.mask_count is not None else \
        f'mask ratio {settings.mask_ratio}' if settings.mask_ratio is not None else 'masked'
    draw_panels(output, panels, f'{name}: {os.path.basename(args.checkpoint)}, {masking}, seed {args.seed}')
    print(f'reconstructions of {counted(len(images), "image")}: {output}')


def main(args):
    if args.logs:
        output = args.output or 'curves.png'
        draw_training_curves(output, args.logs)  # any image type matplotlib writes
        print(f'curves of {counted(len(args.logs), "run")}: {output}')
    else:
        draw_reconstructions(args)


if __name__ == '__main__':
    run_command(main, get_args_parser)
