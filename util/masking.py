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


class UniformNoise:
    """MAE's random masking: one uniform value per patch; the model keeps the patches with the
    smallest values, so every subset of int(L * (1 - mask_ratio)) patches is equally likely."""

    def __init__(self, num_patches, mask_ratio=0.75):
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
            raise UsageError(f'--mask_patch_size {mask_patch_size} must be a multiple of the model\'s patch size '
                             f'{model_patch_size}')
        if input_size % mask_patch_size:
            raise UsageError(f'a mask of {mask_patch_size}-pixel units does not fit a {input_size}-pixel image: '
                             f'choose a --mask_patch_size that divides --input_size')
        self.units_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.num_units = self.units_per_side ** 2
        self.num_masked = math.ceil(self.num_units * mask_ratio)
        self.forward_kwargs = {}

    def __call__(self, generator=None):
        """returns: {'mask': (H/p, W/p) float, 1 = masked}"""
        masked_units = torch.randperm(self.num_units, generator=generator)[:self.num_masked]
        units = torch.zeros(self.num_units)
        units[masked_units] = 1
        units = units.view(self.units_per_side, self.units_per_side)
        return {'mask': units.repeat_interleave(self.scale, 0).repeat_interleave(self.scale, 1)}
