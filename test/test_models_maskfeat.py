"""MaskFeat's parts: the HOG target against a NumPy computation from its definition, its
invariances and shapes, and the block-wise mask generator."""
import math

import numpy as np
import pytest
import torch

from models_maskfeat import HOGGenerator
from util.errors import UsageError
from util.masking import BlockMask


def cells_by_definition(image, nbins=9, cell=8, window=16):
    """The L2-normalised histograms (C, bins, H / cell, W / cell) of one (C, H, W) image in float64
    NumPy, pixel by pixel and cell by cell."""
    c, h, w = image.shape
    padded = np.pad(image.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode='reflect')
    sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
    gx, gy = np.zeros((c, h, w)), np.zeros((c, h, w))
    for i in range(3):
        for j in range(3):  # cross-correlation, as a convolution layer computes it
            gx += sobel[i, j] * padded[:, i:i + h, j:j + w]
            gy += sobel[j, i] * padded[:, i:i + h, j:j + w]
    magnitude = np.sqrt(gx ** 2 + gy ** 2)
    orientation = np.floor(np.arctan2(gx, gy) / np.pi * nbins).astype(int) % nbins
    offsets = (np.arange(window) - (window - 1) / 2) / (window // 2)
    gauss = np.outer(np.exp(-offsets ** 2 / 2), np.exp(-offsets ** 2 / 2))
    gauss /= gauss.sum()
    weighted = magnitude * np.tile(gauss, (h // window, w // window))
    cells = np.zeros((c, nbins, h // cell, w // cell))
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                cells[ch, orientation[ch, y, x], y // cell, x // cell] += weighted[ch, y, x]
    return cells / np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-12)


def hog_by_definition(image, nbins=9, cell=8, window=16, patch=16):
    """HOG of one (C, H, W) image: its cells' histograms, 2 x 2 cells a patch, row by row."""
    _, h, w = image.shape
    cells = cells_by_definition(image, nbins, cell, window)
    k = patch // cell
    out = []
    for py in range(h // patch):
        for px in range(w // patch):
            block = cells[:, :, py * k:(py + 1) * k, px * k:(px + 1) * k]  # (C, bins, k, k)
            out.append(block.reshape(-1))
    return np.stack(out)


def test_hog_matches_its_definition():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 48)
    hog = HOGGenerator()(images)
    assert hog.shape == (2, 6, 108)
    for n in range(2):
        np.testing.assert_allclose(hog[n].numpy(), hog_by_definition(images[n].numpy()), rtol=1e-4, atol=1e-5)


def test_hog_shape_at_224_and_another_size():
    generator = HOGGenerator()
    assert generator.dim == 108
    assert generator(torch.randn(1, 3, 224, 224)).shape == (1, 196, 108)
    assert generator(torch.randn(2, 3, 96, 160)).shape == (2, 6 * 10, 108)
    assert HOGGenerator(patch_size=8, gaussian_window=8, pool=4)(torch.randn(1, 3, 64, 64)).shape == (1, 64, 108)


def test_hog_is_invariant_to_a_positive_scale_and_an_offset_per_channel():
    """Gradients ignore an added constant, and the per-cell L2 normalisation a positive factor."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    changed = images * torch.tensor([3.0, 0.5, 7.0])[:, None, None] + torch.tensor([1.0, -2.0, 0.25])[:, None, None]
    generator = HOGGenerator()
    torch.testing.assert_close(generator(changed), generator(images), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(generator(images.flip(-1)), generator(images), atol=1e-3)


@pytest.mark.parametrize('kwargs, message', [
    (dict(pool=6), 'must tile a 16-pixel patch'),
    (dict(gaussian_window=12), 'must tile a 16-pixel patch'),
])
def test_hog_settings_that_do_not_tile_a_patch_are_refused(kwargs, message):
    with pytest.raises(UsageError, match=message):
        HOGGenerator(**kwargs)


def test_hog_refuses_an_image_the_patches_do_not_divide():
    with pytest.raises(UsageError, match='the patch size 16 divides, got 40x48'):
        HOGGenerator()(torch.randn(1, 3, 40, 48))


def test_block_mask_masks_exactly_the_count_in_rectangles_within_the_bounds():
    """MaskFeat's setting: 78 of 196 patches, blocks of at least 15 patches (or the rest, at the
    end), aspect 0.3 to 1/0.3. Every rectangle is a rounding of a shape drawn inside the bounds."""
    generator = BlockMask(grid=14, num_masking_patches=78, min_num_patches=15, min_aspect=0.3)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        mask, rectangles = generator.draw(g)
        assert mask.shape == (14, 14) and mask.sum().item() == 78
        covered = torch.zeros(14, 14)
        for top, left, h, w in rectangles:
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            # h = round(sqrt(area * a)), w = round(sqrt(area / a)) for some a in the bounds and area >= 15
            lowest, highest = (h - 0.5) / (w + 0.5), (h + 0.5) / max(w - 0.5, 1e-9)
            assert highest >= 0.3 and lowest <= 1 / 0.3, (h, w)
            # the area drawn: at least 15, or what was left to mask when less (BEiT's last blocks)
            remaining = 78 - covered.sum().item()
            assert (h + 0.5) * (w + 0.5) >= min(15, remaining), (h, w, remaining)
            covered[top:top + h, left:left + w] = 1
        assert torch.equal(covered.bool(), mask.bool())  # the mask is the union of the rectangles
    masks = [BlockMask(14, 78, 15)(torch.Generator().manual_seed(s))['mask'] for s in range(2)]
    assert not torch.equal(*masks)


def test_block_mask_count_scales_and_refuses_too_many():
    assert BlockMask(8, 26, 4)(torch.Generator().manual_seed(0))['mask'].sum().item() == 26
    with pytest.raises(UsageError, match='cannot mask 200 of 196 patches'):
        BlockMask(14, 200, 15)
    # no block touches the last row or column: 13 x 13 = 169 of 196 at most (more drew blocks for ever)
    assert BlockMask(14, 169, 15)(torch.Generator().manual_seed(0))['mask'][:13, :13].sum().item() == 169
    # from one block of 15 (it said from 1, which the next check refused): 15 / 196 = 0.0765 up, 169 / 196 = 0.8622 down
    with pytest.raises(UsageError, match=r'cannot mask 170 of 196 patches with blocks, which cover at most 169 '
                                         r'\(13 x 13.*: give --mask_count from 15 to 169, or a --mask_ratio from 0.077 '
                                         r'to 0.862$'):
        BlockMask(14, 170, 15)
    assert BlockMask.default_count(14, 0.077) == 15 and BlockMask.default_count(14, 0.862) == 169
    # square blocks of 15 or more are 4 x 4 = 16 at least, more than the 15 to mask: the draw never ended
    with pytest.raises(UsageError, match=r'^no block of 15 or more patches, of aspect 1 to 1, fits a mask of 15 of 8 x 8 '
                                         r'patches: give a smaller --mask_min_patches or --mask_min_aspect$'):
        BlockMask(8, 15, 15, min_aspect=1)
    # one patch (an 8 px image of 8 px patches): no block fits (it said 'give --mask_count from 1 to 0')
    with pytest.raises(UsageError, match=r'an image of 1 x 1 patches is too small for block masking, whose blocks stay '
                                         r'off the last row and column: give a larger --input_size$'):
        BlockMask(1, 1)
    with pytest.raises(UsageError, match='give --mask_min_patches 1 or more, got -5$'):  # was sqrt's ValueError
        BlockMask(14, 78, -5)
    # blocks larger than the whole mask: the reference's draw shrank every one below the flag's bound, unsaid
    with pytest.raises(UsageError, match=r'blocks of 79 or more patches cannot make a mask of 78: give '
                                         r'--mask_min_patches 78 or less'):
        BlockMask(14, 78, 79)
    assert BlockMask(14, 78, 78)(torch.Generator().manual_seed(0))['mask'].sum().item() == 78
    with pytest.raises(UsageError, match=r'\(--mask_min_aspect\) must be positive, got -1.0$'):
        BlockMask(14, 78, 15, min_aspect=-1.0)
    with pytest.raises(UsageError, match='at most 1, since the largest aspect is its inverse; got 2'):
        BlockMask(14, 78, 15, min_aspect=2)
    with pytest.raises(UsageError, match='must be ordered, got 0.5 and 0.4'):
        BlockMask(14, 78, 15, min_aspect=0.5, max_aspect=0.4)
    assert math.isclose(BlockMask.default_count(14), 78) and BlockMask.default_count(8) == 26


def test_loss_is_the_mse_over_the_masked_patches():
    """The loss against a direct computation: squared error of the predicted HOG, averaged over the
    108 values of a patch, then over the masked patches only."""
    import models_maskfeat
    torch.manual_seed(0)
    model = models_maskfeat.maskfeat_vit_tiny_patch8(depth=2)
    imgs = torch.randn(3, 3, 64, 64)
    loss, pred, mask = model(imgs)
    assert pred.shape == (3, 64, 108) and mask.shape == (3, 8, 8) and (mask.sum((1, 2)) == 26).all()
    target = HOGGenerator(patch_size=8, pool=4, gaussian_window=8)(imgs)
    masked = mask.flatten(1).bool()
    expected = ((pred - target) ** 2)[masked].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mask_token_replaces_masked_embeddings_before_the_position_embedding():
    import models_maskfeat
    torch.manual_seed(0)
    encoder = models_maskfeat.maskfeat_vit_tiny_patch8(depth=1).encoder
    imgs = torch.randn(2, 3, 64, 64)
    mask = (torch.rand(2, 8, 8) < 0.4).float()
    seen = {}
    encoder.pos_drop.register_forward_pre_hook(lambda module, args: seen.setdefault('x', args[0]))
    encoder.forward_masked(imgs, mask)
    tokens = seen['x'][:, 1:] - encoder.pos_embed[:, 1:]  # the patch tokens before position information
    embeddings = encoder.patch_embed(imgs)
    masked = mask.flatten(1).bool()
    torch.testing.assert_close(tokens[~masked], embeddings[~masked])
    torch.testing.assert_close(tokens[masked], encoder.mask_token.reshape(1, -1).expand(int(masked.sum()), -1))
    torch.testing.assert_close(seen['x'][:, 0], (encoder.cls_token + encoder.pos_embed[:, :1]).squeeze(1).expand(2, -1))


def test_hog_target_stays_fp32_under_autocast():
    """The training loop runs the model under bf16 autocast; the target is still computed in fp32."""
    images = torch.randn(1, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        target = HOGGenerator()(images)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, HOGGenerator()(images))


def test_encoder_loads_into_the_vit_classifier(tmp_path):
    """A MaskFeat checkpoint's encoder is exactly this project's ViT-B (vit_base_patch16): every
    encoder weight loads, the mask token and the HOG head are left out."""
    import models_maskfeat
    import timm

    from util.checkpoint import load_pretrained
    from util.registry import import_model_files
    import_model_files()
    model = models_maskfeat.maskfeat_vit_base_patch16(depth=2)
    torch.save({'model': model.state_dict(), 'args': {'model': 'maskfeat_vit_base', 'epochs': 300}}, tmp_path / 'c.pth')
    classifier = timm.create_model('vit_base_patch16', depth=2, num_classes=7)
    report = load_pretrained(classifier, str(tmp_path / 'c.pth'))
    assert sorted(report['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert set(report['dropped']) == {'head.weight', 'head.bias', 'mask_token'}
    assert torch.equal(classifier.blocks[1].mlp.fc2.weight, model.encoder.blocks[1].mlp.fc2.weight)
    assert torch.equal(classifier.pos_embed, model.encoder.pos_embed)


def test_published_recipes():
    """mmpretrain maskfeat_vit-base-p16_8xb256-amp-coslr-300e_in1k: lr 1.6e-3 at 2048 (2e-4 per 256),
    AdamW (0.9, 0.999), wd 0.05, clip 0.02, 30 warm-up epochs from 1e-6 x lr, cosine to 1e-6, 300 epochs,
    crop (0.5, 1) bicubic, 78 of 196 patches in blocks of 15 or more; the mask token is not decayed,
    the position table and the cls token are."""
    import main_pretrain
    import models_maskfeat
    from util.optim import param_groups
    args = main_pretrain.get_args_parser().parse_args(['--data_path', 'demo', '--model', 'maskfeat_vit_base'])
    main_pretrain.fill_recipe(args)
    assert (args.blr * 2048 / 256, args.opt_betas, args.weight_decay, args.clip_grad) == (1.6e-3, [0.9, 0.999], 0.05,
                                                                                          0.02)
    assert (args.warmup_epochs, args.epochs, args.min_lr, args.lr_schedule) == (30, 300, 1e-6, 'cosine')
    assert args.warmup_blr == pytest.approx(args.blr * 1e-6)
    assert (args.crop_min, args.interpolation, args.input_size) == (0.5, 'bicubic', 224)
    model = models_maskfeat.maskfeat_vit_base_patch16(depth=1)
    generator = model.mask_generator(args)
    assert (generator.num_masking_patches, generator.min_num_patches) == (78, 15)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in param_groups(model, 0.05) if g['weight_decay'] == 0 for p in g['params']}
    assert 'encoder.mask_token' in no_decay and 'encoder.pos_embed' not in no_decay
    assert 'encoder.cls_token' not in no_decay


def test_fine_tuning_recipe_is_mmpretrains(tmp_path):
    """mmpretrain's maskfeat benchmarks/vit-base-p16_8xb256-coslr-100e_in1k: AdamW lr 8e-3 at 2048, layer
    decay 0.65, LinearLR from start_factor 1e-4 over 20 epochs, CosineAnnealingLR to eta_min 1e-6 (the
    same floor in every layer), RandAugment then ColorJitter(0.4, 0.4, 0.4), random erasing 0.25, the head
    TruncNormal(std=2e-5, bias=2e-5)."""
    import main_finetune
    from util import dist
    from util.datasets import finetune_transform
    from util.flags import set_learning_rate
    torch.save({'model': {}, 'args': {'model': 'maskfeat_vit_base', 'epochs': 300}}, tmp_path / 'maskfeat.pth')
    args = main_finetune.get_args_parser().parse_args(['--data_path', 'demo', '--finetune', str(tmp_path / 'maskfeat.pth'),
                                                       '--accum_iter', '8'])
    main_finetune.fill_recipe(args)
    assert dist.effective_batch_size(args) == 2048
    set_learning_rate(args)
    assert (args.lr, args.warmup_lr, args.min_lr) == pytest.approx((8e-3, 8e-3 * 1e-4, 1e-6))
    assert (args.layer_decay, args.layer_lr_bounds, args.warmup_epochs, args.epochs) == (0.65, 'warmup_scaled', 20, 100)
    assert (args.head_init_std, args.head_init_bias, args.reprob) == (2e-5, 2e-5, 0.25)
    steps = finetune_transform(args).transforms
    names = [type(t).__name__ for t in steps]
    assert names.index('ColorJitter') == names.index('RandAugment') + 1
    jitter = steps[names.index('ColorJitter')]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                                                                   None)
