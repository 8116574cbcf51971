"""Pictures of what the models predict: the panels (against NumPy and geometry), visualize.py for
every method, and the reconstructions and gradient norm that pre-training sends to TensorBoard."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_main
from test_models_maskfeat import cells_by_definition
from util.errors import UsageError, run_cli
from util.pictures import MASKED_GRAY, oriented_gradient_picture, reconstruction_panels, unnormalize_patches
from util.registry import create_pretrain_model

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def patches_by_hand(images, p):
    """(N, C, H, W) -> (N, L, p*p*C): patches row by row, each flattened as (row, column, channel)."""
    n, c, h, w = images.shape
    out = np.zeros((n, (h // p) * (w // p), p * p * c))
    for i in range(h // p):
        for j in range(w // p):
            block = images[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (N, C, p, p)
            out[:, i * (w // p) + j] = block.transpose(0, 2, 3, 1).reshape(n, -1)
    return out


def normalised_by_hand(patches):
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, ddof=1, keepdims=True)
    return (patches - mean) / np.sqrt(var + 1e-6)


def display_by_hand(images):
    return np.clip(images * STD[None, :, None, None] + MEAN[None, :, None, None], 0, 1)


def test_unnormalising_the_normalised_target_recovers_the_original_patches():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32) * 2 + 0.5
    patches = patches_by_hand(images.double().numpy(), 8)
    recovered = unnormalize_patches(torch.from_numpy(normalised_by_hand(patches)), torch.from_numpy(patches))
    np.testing.assert_allclose(recovered.numpy(), patches, rtol=0, atol=1e-9)


@pytest.mark.parametrize('name', ['mae_vit_tiny', 'mae_hivit_tiny'])
def test_a_norm_pix_model_predicting_its_target_shows_the_original(name):
    """pred = the normalised target of every patch: the reconstruction is the original image, the
    masked input is gray exactly on the masked patches, and the figure says how it was un-normalised."""
    torch.manual_seed(0)
    model = create_pretrain_model(name, norm_pix_loss=True)
    images = torch.randn(2, 3, 64, 64)
    target = torch.from_numpy(normalised_by_hand(patches_by_hand(images.double().numpy(), 8))).float()
    mask = (torch.rand(2, 64) < 0.75).float()
    panels = model.pictures(images, target, mask)
    assert panels.titles == ['original', 'masked input', 'reconstruction', 'reconstruction + visible']
    expected = display_by_hand(images.numpy())
    for shown in (panels.images[0], panels.images[2], panels.images[3]):
        np.testing.assert_allclose(shown.numpy(), expected, atol=1e-5)
    masked_pixels = mask.reshape(2, 8, 8).repeat_interleave(8, 1).repeat_interleave(8, 2).bool()
    masked_input = panels.images[1].permute(1, 0, 2, 3)  # (C, N, H, W)
    assert (masked_input[:, masked_pixels] == MASKED_GRAY).all()
    np.testing.assert_allclose(masked_input[:, ~masked_pixels].numpy(),
                               expected.transpose(1, 0, 2, 3)[:, ~masked_pixels.numpy()], atol=1e-6)
    assert any('mean and variance of the original' in note for note in panels.notes)
    # a raw-pixel model shows its prediction as it is, without the note
    raw = create_pretrain_model(name, norm_pix_loss=False).pictures(images, target, mask)
    assert not raw.notes and not torch.allclose(raw.images[2], panels.images[2])


def test_pasting_keeps_the_visible_pixels_and_the_prediction_elsewhere():
    torch.manual_seed(0)
    images, recon = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)
    mask_px = torch.zeros(1, 1, 16, 16)
    mask_px[..., :8, :] = 1  # the top half masked
    pasted = reconstruction_panels(images, recon, mask_px).images[3].numpy()
    np.testing.assert_allclose(pasted[..., :8, :], display_by_hand(recon.numpy())[..., :8, :], atol=1e-6)
    np.testing.assert_allclose(pasted[..., 8:, :], display_by_hand(images.numpy())[..., 8:, :], atol=1e-6)


def test_hog_cells_are_the_histograms_of_the_definition():
    torch.manual_seed(0)
    model = create_pretrain_model('maskfeat_vit_tiny')
    images = torch.randn(2, 3, 64, 64)
    cells = model.hog.cells(model.hog(images))
    assert cells.shape == (2, 9, 16, 16)
    for n in range(2):
        expected = cells_by_definition(images[n].numpy(), cell=4, window=8).mean(axis=0)
        np.testing.assert_allclose(cells[n].numpy(), expected, rtol=1e-4, atol=1e-5)


def line_direction(cell):
    """The direction in degrees (0 = along x, 90 = along y, in [0, 180)) of the principal axis of
    the bright pixels of a square picture, and their spread along it in pixels (standard deviation)."""
    side = cell.shape[0]
    y, x = np.mgrid[0:side, 0:side] + 0.5
    w = cell.numpy() / cell.sum().item()
    mx, my = (w * x).sum(), (w * y).sum()
    cov = np.array([[(w * (x - mx) ** 2).sum(), (w * (x - mx) * (y - my)).sum()],
                    [(w * (x - mx) * (y - my)).sum(), (w * (y - my) ** 2).sum()]])
    values, vectors = np.linalg.eigh(cov)
    axis = vectors[:, 1]
    return np.degrees(np.arctan2(axis[1], axis[0])) % 180, np.sqrt(values[1])


@pytest.mark.parametrize('edge, angle', [('vertical', 90), ('horizontal', 0)])
def test_each_edge_is_drawn_along_itself(edge, angle):
    """A step edge between two halves: the cells beside it draw one line through their centre
    along the edge (within half of a 20-degree orientation bin), the cells away from it nothing."""
    model = create_pretrain_model('maskfeat_vit_tiny')
    image = -torch.ones(1, 3, 64, 64)
    if edge == 'vertical':
        image[..., :, 32:] = 1
    else:
        image[..., 32:, :] = 1
    picture = oriented_gradient_picture(model.hog.cells(model.hog(image)), glyph_size=8)[0, 0]  # cells of 4 px
    cell = picture[56:64, 56:64]  # the cell just before the edge (at 28-32 px, drawn 8 px wide)
    direction, spread = line_direction(cell)
    assert min(abs(direction - angle), 180 - abs(direction - angle)) <= 10.5
    assert spread > 1.5  # a line across the cell (8 px long: about 2.3), not a dot (below 0.7)
    away = picture[:, :40] if edge == 'vertical' else picture[:40, :]
    assert away.abs().max() < 1e-6


def save_checkpoint(path, name, with_args=True):
    torch.manual_seed(0)
    model = create_pretrain_model(name)
    torch.save({'model': model.state_dict(), **({'args': {'model': name}} if with_args else {})}, path)
    return model


@pytest.mark.parametrize('name', ['mae_vit_tiny', 'mae_hivit_tiny', 'simmim_swin_tiny', 'simmim_vit_tiny',
                                  'maskfeat_vit_tiny'])
def test_visualize_writes_a_figure_of_the_expected_size_for_every_method(name, tmp_path, demo_root):
    save_checkpoint(tmp_path / 'ckpt.pth', name)
    out = tmp_path / 'recon.png'
    run_main('visualize', '--checkpoint', tmp_path / 'ckpt.pth', '--data_path', 'demo', '--num_images', 3,
             '--output', out)
    with Image.open(out) as figure:
        assert figure.format == 'PNG'
        assert figure.size == (800, 680)  # 4 panels of 2 in at 100 dpi; 3 rows of 2 in and a 0.8 in header
        pixels = np.asarray(figure.convert('RGB'))
    assert pixels.std() > 20  # pictures, not an empty canvas


def test_visualize_reads_an_official_layout_given_the_model_and_an_image_file(tmp_path, demo_root):
    """A checkpoint without args (as the official releases) with --model, on one image file."""
    save_checkpoint(tmp_path / 'release.pth', 'mae_vit_tiny', with_args=False)
    image = next(os.path.join(d, f) for d, _, files in os.walk(os.path.join(demo_root, 'val')) for f in sorted(files))
    out = tmp_path / 'one.png'
    run_main('visualize', '--model', 'mae_vit_tiny', '--no-norm_pix_loss', '--checkpoint', tmp_path / 'release.pth',
             '--data_path', image, '--output', out)
    with Image.open(out) as figure:
        assert figure.size == (800, 280)


def test_visualize_bad_input_is_one_line(tmp_path, demo_root, capsys):
    model = save_checkpoint(tmp_path / 'full.pth', 'mae_vit_tiny', with_args=False)
    with pytest.raises(UsageError, match='does not say which pre-training model'):
        run_main('visualize', '--checkpoint', tmp_path / 'full.pth', '--output', tmp_path / 'a.png')
    torch.save({'model': {k: v for k, v in model.state_dict().items() if k in model.encoder_keys()}},
               tmp_path / 'encoder.pth')
    with pytest.raises(UsageError, match='without its decoder'):
        run_main('visualize', '--model', 'mae_vit_tiny', '--checkpoint', tmp_path / 'encoder.pth',
                 '--output', tmp_path / 'a.png')
    # --model of another size than the run that wrote the checkpoint: the mismatch names the recorded one
    save_checkpoint(tmp_path / 'recorded.pth', 'mae_vit_tiny')
    with pytest.raises(UsageError, match=r'does not fit this model: .*; it was written by --model mae_vit_tiny: '
                                         r'leave --model out$'):
        run_main('visualize', '--model', 'mae_vit_small', '--checkpoint', tmp_path / 'recorded.pth', '--output',
                 tmp_path / 'a.png')
    # MAE's --norm_pix_loss given for another method's model, or the MAE run's value passed on to --model
    # simmim_vit_tiny: Beit's TypeError showed through
    with pytest.raises(UsageError, match=r"^--norm_pix_loss is an option of MAE's and MAE-HiViT's models, which "
                                         r"simmim_vit_tiny is not: leave it out$"):
        run_main('visualize', '--model', 'simmim_vit_tiny', '--checkpoint', tmp_path / 'recorded.pth',
                 '--no-norm_pix_loss', '--output', tmp_path / 'a.png')
    with pytest.raises(UsageError, match='^not a SimMIM checkpoint'):
        run_main('visualize', '--model', 'simmim_vit_tiny', '--checkpoint', tmp_path / 'recorded.pth', '--output',
                 tmp_path / 'a.png')
    # --input_size other than the run's, whatever the family: a ViT's position table would not fit, a Swin's
    # relative position tables were resampled and the model drawn at 128 px without a word
    for name in ('mae_vit_tiny', 'simmim_swin_tiny'):
        torch.save({'model': create_pretrain_model(name).state_dict(), 'args': {'model': name, 'input_size': 64}},
                   tmp_path / 'at64.pth')
        with pytest.raises(UsageError, match=re.escape(f"--input_size 128: '{tmp_path / 'at64.pth'}' was trained at 64 "
                                                       f"px (its run's --input_size), and visualize.py draws it at "
                                                       f"that size: leave --input_size out")):
            run_main('visualize', '--checkpoint', tmp_path / 'at64.pth', '--input_size', 128, '--output',
                     tmp_path / 'a.png')
    # weights alone of a run at 96 px (8 px patches: 1 + 144 rows), shown at the model's own 64 px: the size to give
    torch.save({'model': create_pretrain_model('mae_vit_tiny', img_size=96).state_dict()}, tmp_path / 'at96.pth')
    with pytest.raises(UsageError, match=r'; its position table is for 96 px images: give --input_size 96$'):
        run_main('visualize', '--model', 'mae_vit_tiny', '--checkpoint', tmp_path / 'at96.pth', '--output',
                 tmp_path / 'a.png')
    # main_pretrain.py's bounds: a ratio of 0 drew the unmasked images with a loss of nothing
    with pytest.raises(UsageError, match=r'^--mask_ratio must lie between 0 and 1 \(both excluded'):
        run_main('visualize', '--checkpoint', tmp_path / 'recorded.pth', '--mask_ratio', 0, '--output',
                 tmp_path / 'a.png')
    torch.save({'model': {}, 'args': {'model': 'vit_tiny_patch8'}}, tmp_path / 'finetuned.pth')
    with pytest.raises(UsageError, match='vit_tiny_patch8, which is not a pre-training model'):
        run_main('visualize', '--checkpoint', tmp_path / 'finetuned.pth', '--output', tmp_path / 'a.png')
    torch.save({'model': {}, 'args': {'model': 'vit_tiny_patch8', 'finetune': 'x.pth'}}, tmp_path / 'finetuned.pth')
    with pytest.raises(UsageError, match=r'is a checkpoint of main_finetune.py \(vit_tiny_patch8\), a classifier '
                                         r'without a decoder: reconstructions need a pre-training checkpoint'):
        run_main('visualize', '--checkpoint', tmp_path / 'finetuned.pth', '--output', tmp_path / 'a.png')
    with pytest.raises(UsageError, match='^cannot write the figure /proc/self/a.png: No such file or directory$'):
        run_main('visualize', '--checkpoint', tmp_path / 'full.pth', '--model', 'mae_vit_tiny', '--output',
                 '/proc/self/a.png')  # a folder that exists and that not even root writes in
    # as the command line ends it (util.errors.run_cli): one line on stderr, exit code 2
    import visualize
    argv = ['--checkpoint', str(tmp_path / 'full.pth'), '--model', 'mae_vit_tiny', '--output', str(tmp_path / 'a.jpg')]
    with pytest.raises(SystemExit) as ended:
        run_cli(visualize.main, visualize.get_args_parser().parse_args(argv))
    assert ended.value.code == 2
    assert capsys.readouterr().err.strip() == (f'error: --output {tmp_path / "a.jpg"} is not a .png file: pictures '
                                               f'are written as .png, lossless (a .jpg would blur the reconstructed '
                                               f'pixels): give a name such as {tmp_path / "a"}.png')
    with pytest.raises(UsageError, match=r'--output \S+/a has no extension: .* give a name such as \S+/a\.png$'):
        run_main('visualize', '--checkpoint', tmp_path / 'full.pth', '--model', 'mae_vit_tiny', '--output', tmp_path / 'a')


def test_visualize_masks_maskfeat_by_the_ratio_given_and_says_what_it_cannot_mask(tmp_path, demo_root):
    """A MaskFeat run's --mask_count won over the --mask_ratio given (the title said the ratio); a
    masking the size cannot take advised main_pretrain's --mask_count, which visualize.py lacks."""
    import visualize
    model = save_checkpoint(tmp_path / 'ckpt.pth', 'maskfeat_vit_tiny')
    torch.save({'model': model.state_dict(), 'args': {'model': 'maskfeat_vit_tiny', 'mask_count': 49}},
               tmp_path / 'count.pth')
    ckpt = torch.load(tmp_path / 'count.pth', weights_only=True)
    parser = visualize.get_args_parser()
    settings = visualize.model_settings('maskfeat_vit_tiny', ckpt, parser.parse_args(['--mask_ratio', '0.2']))
    assert (settings.mask_count, settings.mask_ratio) == (None, 0.2)
    assert model.mask_generator(settings).num_masking_patches == round(0.2 * 64)
    assert visualize.model_settings('maskfeat_vit_tiny', ckpt, parser.parse_args([])).mask_count == 49
    with pytest.raises(UsageError, match=r'^cannot mask 63 of 64 patches with blocks, .* \(the masking of the '
                                         r"checkpoint's run, with the flags given\): give another --mask_ratio or "
                                         r'--input_size$'):
        run_main('visualize', '--checkpoint', tmp_path / 'ckpt.pth', '--mask_ratio', 0.99, '--output',
                 tmp_path / 'a.png')


def test_visualize_draws_the_curves_of_runs(tmp_path):
    """--logs: each run's curves in its own colour of util.plots' palette."""
    from helpers import color_pixels
    from util.plots import RUN_COLORS
    for run, scale in (('a', 1.0), ('b', 2.0)):
        (tmp_path / run).mkdir()
        with open(tmp_path / run / 'log.jsonl', 'w') as f:
            for step in range(1, 31):
                f.write(f'{{"epoch": 0, "step": {step}, "loss": {scale / step}, "lr": {1e-3 * step / 30}}}\n')
    out = tmp_path / 'curves.png'
    run_main('visualize', '--logs', tmp_path / 'a', tmp_path / 'b', '--output', out)
    for color in RUN_COLORS[:2]:
        rows, columns = color_pixels(out, color)
        assert len(set(columns.tolist())) > 200  # a curve across the plot, in the loss and the lr panels


def test_visualize_reads_an_official_simmim_layout(tmp_path, demo_root):
    """The official SimMIM release layout (the original Swin's patch mergings, no args) draws the
    same figure as this project's layout of the same weights."""
    from models_simmim import swin_original_layout
    for name in ('ours', 'official'):  # one file name in two folders: the figure's title names the file
        (tmp_path / name).mkdir()
    model = save_checkpoint(tmp_path / 'ours' / 'ckpt.pth', 'simmim_swin_tiny')
    official = {**{f'encoder.{k}': v for k, v in swin_original_layout(model.encoder.state_dict()).items()},
                **{f'decoder.{k}': v for k, v in model.decoder.state_dict().items()}}
    assert 'encoder.layers.0.downsample.reduction.weight' in official
    torch.save({'model': official}, tmp_path / 'official' / 'ckpt.pth')
    for name in ('ours', 'official'):
        run_main('visualize', '--model', 'simmim_swin_tiny', '--checkpoint', tmp_path / name / 'ckpt.pth',
                 '--num_images', 1, '--output', tmp_path / f'{name}.png')
    with Image.open(tmp_path / 'ours.png') as ours, Image.open(tmp_path / 'official.png') as theirs:
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
