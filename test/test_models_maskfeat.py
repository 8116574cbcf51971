"""MaskFeat's parts: the HOG target against a NumPy computation from its definition, its
invariances and shapes, and the block-wise mask generator."""
import math

import numpy as np
import pytest
import torch

from models_maskfeat import HOGGenerator
from util.errors import UsageError
from util.masking import BlockMask


def hog_by_definition(image, nbins=9, cell=8, window=16, patch=16):
    """HOG of one (C, H, W) image in float64 NumPy, pixel by pixel and cell by cell."""
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
    cells /= np.maximum(np.linalg.norm(cells, axis=1, keepdims=True), 1e-12)
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
    with pytest.raises(UsageError, match='aspect'):
        BlockMask(14, 78, 15, min_aspect=0)
    assert math.isclose(BlockMask.default_count(14), 78) and BlockMask.default_count(8) == 26
