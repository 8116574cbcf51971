"""Mask generators: per-sample masking randomness, made in the data pipeline.

A generator is called once per sample with a seeded `torch.Generator` (see
`util.datasets.SeededSamples`) and returns the keyword arguments of the model's forward that
carry the mask, so the masks of a run depend only on (seed, epoch, sample index): the same
on every device and every number of processes, and the same again after a resume.
"""
import torch


class UniformNoise:
    """MAE's random masking: one uniform value per patch; the model keeps the patches with the
    smallest values, so every subset of int(L * (1 - mask_ratio)) patches is equally likely."""

    def __init__(self, num_patches):
        self.num_patches = num_patches

    def __call__(self, generator):
        return {'noise': torch.rand(self.num_patches, generator=generator)}
