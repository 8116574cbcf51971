"""Mask generators: per-sample masking randomness, made in the data pipeline.

A generator is called once per sample with a seeded `torch.Generator` (see
`util.datasets.SeededSamples`) and returns the keyword arguments of the model's forward that
carry the mask, so the masks of a run depend only on (seed, epoch, sample index): the same
on every device and every number of processes, and the same again after a resume. Its
`forward_kwargs` are the arguments that are the same for every batch (MAE's mask ratio).
A pre-training model makes its own generator from the flags: `model.mask_generator(args)`.
"""
import math

import torch

from util.errors import UsageError


class MaskingError(UsageError):
    """Flags whose masking cannot mask images of this size: `problem` says what is wrong and
    `advice` what to give instead (main_pretrain.py's flags); a caller that takes other flags
    (benchmark.py times the recipe's masking) keeps the problem and gives its own advice."""

    def __init__(self, problem, advice):
        super().__init__(f'{problem}: {advice}')
        self.problem, self.advice = problem, advice


def batch_masks(imgs, mask, patch_size, generator):
    """The (N, H/p, W/p) masks of a batch of images: `mask` checked against their patch grid, or,
    when None, one drawn per image by `generator` from the global random state."""
    grid = (imgs.shape[0], *(s // patch_size for s in imgs.shape[-2:]))
    if mask is None:
        return torch.stack([generator()['mask'] for _ in range(imgs.shape[0])]).to(imgs.device)
    if tuple(mask.shape) != grid:
        raise ValueError(f'the mask must have one entry per patch, {grid} for these images, got {tuple(mask.shape)}')
    return mask


def pixel_mask(mask, patch_size):
    """A mask per patch as a mask per pixel.
    mask: (N, L) over a square grid, or (N, h, w); 1 = masked -> (N, 1, h*p, w*p) float"""
    if mask.dim() == 2:
        side = math.isqrt(mask.shape[1])
        mask = mask.reshape(mask.shape[0], side, side)
    return mask.float().repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def round_down(value, decimals):
    """`value` cut to `decimals` decimals: a bound printed for the user that still holds."""
    return math.floor(value * 10 ** decimals) / 10 ** decimals


class UniformNoise:
    """MAE's random masking: one uniform value per patch; the model keeps the patches with the
    smallest values, so every subset of int(L * (1 - mask_ratio)) patches is equally likely."""

    def __init__(self, num_patches, mask_ratio=0.75):
        if not 0 <= mask_ratio < 1:
            raise UsageError(f'--mask_ratio must be in [0, 1), got {mask_ratio}')
        if int(num_patches * (1 - mask_ratio)) < 1:  # the encoder would see nothing (HiViT's cannot even run)
            advice = f'--mask_ratio {round_down(1 - 1 / num_patches, 4)} or less' if num_patches > 1 else \
                'a larger --input_size (the image is one patch)'
            raise MaskingError(f'a mask ratio of {mask_ratio} leaves none of the {num_patches} patches visible',
                               f'give {advice}')
        self.num_patches = num_patches
        self.forward_kwargs = {'mask_ratio': mask_ratio}

    def __call__(self, generator):
        return {'noise': torch.rand(self.num_patches, generator=generator)}


class MaskPatches:
    """SimMIM's masking: the image is cut into square mask units of `mask_patch_size` pixels, and
    exactly ceil(mask_ratio x units) of them, a uniformly random subset, are masked. The mask is
    returned at the encoder's patch grid, (H/p, W/p) with 1 = masked, each unit covering
    (mask_patch_size / p)^2 patches."""

    def __init__(self, input_size, mask_patch_size, model_patch_size, mask_ratio):
        if not 0 <= mask_ratio <= 1:
            raise UsageError(f'--mask_ratio must be in [0, 1], got {mask_ratio}')
        if mask_patch_size <= 0 or mask_patch_size % model_patch_size:
            raise UsageError(f'--mask_patch_size {mask_patch_size} must be a positive multiple of the model\'s patch '
                             f'size {model_patch_size}')
        if input_size % mask_patch_size:
            raise MaskingError(f'a mask of {mask_patch_size}-pixel units does not fit a {input_size}-pixel image',
                               'choose a --mask_patch_size that divides --input_size')
        self.units_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.num_units = self.units_per_side ** 2
        self.num_masked = math.ceil(self.num_units * mask_ratio)
        if self.num_masked == self.num_units and mask_ratio < 1:  # a ratio of 1 is refused by its flag's check
            advice = f'--mask_ratio {round_down(1 - 1 / self.num_units, 4)} or less' if self.num_units > 1 else \
                f'a --mask_patch_size below {mask_patch_size} (the image is one mask unit)'
            raise MaskingError(f'a mask ratio of {mask_ratio} masks all {self.num_units} mask units of '
                               f'{mask_patch_size} px (SimMIM masks ceil(ratio x units)), leaving nothing visible',
                               f'give {advice}')
        self.forward_kwargs = {}

    def __call__(self, generator=None):
        """returns: {'mask': (H/p, W/p) float, 1 = masked}"""
        masked_units = torch.randperm(self.num_units, generator=generator)[:self.num_masked]
        units = torch.zeros(self.num_units)
        units[masked_units] = 1
        units = units.view(self.units_per_side, self.units_per_side)
        return {'mask': units.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)}


class NoBlockFits(Exception):
    """BlockMask.draw found no block to add in 10,000 tries (it drew for ever)."""


class BlockMask:
    """BEiT's block-wise masking, which MaskFeat uses: rectangles of at least `min_num_patches`
    patches, of aspect ratio (height / width) drawn log-uniformly in [min_aspect, max_aspect], are
    placed at random (overlaps allowed, each adding at least one new patch) until exactly
    `num_masking_patches` of the grid x grid patches are masked. As in mmpretrain's
    BEiTMaskGenerator (MaskFeat's reference), a rectangle must be smaller than the grid and does not
    touch its last row or column (BEiT's own code draws its corner inclusively, and may)."""

    def __init__(self, grid, num_masking_patches, min_num_patches=4, max_num_patches=None, min_aspect=0.3,
                 max_aspect=None):
        coverable = (grid - 1) ** 2  # the blocks stay off the last row and column
        if not coverable:
            raise MaskingError(f'an image of {grid} x {grid} patches is too small for block masking, whose blocks '
                               f'stay off the last row and column', 'give a larger --input_size')
        if not 0 < num_masking_patches <= coverable:
            lowest = max(1, min(min_num_patches, coverable))  # a mask of fewer than one block is refused below
            raise MaskingError(f'cannot mask {num_masking_patches} of {grid * grid} patches with blocks, which cover '
                               f'at most {coverable} ({grid - 1} x {grid - 1}: as in mmpretrain\'s, no block touches '
                               f'the last row or column)', f'give --mask_count from {lowest} to {coverable}, or a '
                               f'--mask_ratio from {math.ceil(1000 * lowest / grid ** 2) / 1000} to '
                               f'{round_down(coverable / grid ** 2, 3)}')
        if min_num_patches < 1:
            raise UsageError(f'a mask block holds at least one patch: give --mask_min_patches 1 or more, got '
                             f'{min_num_patches}')
        if min_num_patches > num_masking_patches:  # the reference's draw shrank every block below it, unsaid
            raise MaskingError(f'blocks of {min_num_patches} or more patches cannot make a mask of '
                               f'{num_masking_patches}', f'give --mask_min_patches {num_masking_patches} or less, or '
                               f'mask more patches (--mask_count, --mask_ratio)')
        if not min_aspect > 0:
            raise UsageError(f'the smallest aspect ratio of a mask block (--mask_min_aspect) must be positive, '
                             f'got {min_aspect}')
        if max_aspect is None and min_aspect > 1:
            raise UsageError(f'--mask_min_aspect must be at most 1, since the largest aspect is its inverse; '
                             f'got {min_aspect}')
        max_aspect = max_aspect or 1 / min_aspect
        if min_aspect > max_aspect:
            raise UsageError(f'the aspect bounds of the mask blocks must be ordered, got {min_aspect} and '
                             f'{max_aspect}')
        self.grid, self.num_masking_patches, self.min_num_patches = grid, num_masking_patches, min_num_patches
        self.max_num_patches = max_num_patches or num_masking_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.forward_kwargs = {}
        try:  # one mask drawn now: where no block fits, that is said here, not in a data-loader worker
            self.draw(torch.Generator().manual_seed(0))
        except NoBlockFits:
            raise MaskingError(f'no block of {min_num_patches} or more patches, of aspect {min_aspect:g} to '
                               f'{max_aspect:g}, fits a mask of {num_masking_patches} of {grid} x {grid} patches',
                               'give a smaller --mask_min_patches or --mask_min_aspect') from None

    @staticmethod
    def default_count(grid, ratio=0.4):
        """MaskFeat masks 40 % of the patches: 78 of 196 at 224 px."""
        return round(ratio * grid * grid)

    def _uniform(self, low, high, generator):
        return low + (high - low) * torch.rand((), generator=generator).item()

    def _place_block(self, mask, budget, generator):
        """Try up to 10 rectangles; the first that adds 1 to `budget` new patches is kept.
        returns: (patches added, (top, left, h, w) or None)"""
        for _ in range(10):
            area = self._uniform(self.min_num_patches, budget, generator)
            aspect = math.exp(self._uniform(*self.log_aspect, generator))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h >= self.grid or w >= self.grid:
                continue
            top = int(torch.randint(0, self.grid - h, (), generator=generator))
            left = int(torch.randint(0, self.grid - w, (), generator=generator))
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= budget:
                mask[top:top + h, left:left + w] = 1
                return new, (top, left, h, w)
        return 0, None

    def draw(self, generator=None):
        """returns: mask (grid, grid) float with 1 = masked, the rectangles placed [(top, left, h, w)]"""
        mask = torch.zeros(self.grid, self.grid)
        rectangles, count, failed = [], 0, 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            added, rectangle = self._place_block(mask, budget, generator)
            failed = 0 if rectangle is not None else failed + 1
            if failed == 1000:  # 10,000 rectangles in a row: none of the sizes and aspects allowed fits
                raise NoBlockFits()
            if rectangle is not None:
                count += added
                rectangles.append(rectangle)
        return mask, rectangles

    def __call__(self, generator=None):
        return {'mask': self.draw(generator)[0]}
