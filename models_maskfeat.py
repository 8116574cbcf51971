"""MaskFeat: masked feature prediction (Wei et al., "Masked Feature Prediction for Self-Supervised
Visual Pre-Training", CVPR 2022), as mmpretrain's maskfeat_vit-base-p16 configuration trains it.

The target of a masked patch is the histogram of oriented gradients (HOG) of the normalised
input, computed on the device, batched, by `HOGGenerator`. (The model and its recipe follow.)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from util.errors import UsageError


class HOGGenerator(nn.Module):
    """HOG features of a batch of images, one vector per patch (MaskFeat's target).

    For each channel: reflect-pad by 1, Sobel gradients gx (kernel [[1, 0, -1], [2, 0, -2],
    [1, 0, -1]]) and gy (its transpose), magnitude |(gx, gy)|, unsigned orientation
    floor(atan2(gx, gy) / pi * nbins) mod nbins; the magnitudes, weighted by a Gaussian window
    (gaussian_window pixels, std gaussian_window / 2, summing to 1) tiled over the image, are
    summed per orientation bin over cells of pool x pool pixels, and each cell's histogram is
    L2-normalised. A patch's vector holds its (patch / pool)^2 cells for every channel and bin,
    ordered (channel, bin, cell row, cell column): 3 x 9 x 2 x 2 = 108 values for 16-pixel
    patches. Any image size that the patch size divides works (mmpretrain fixes 14 patches a side).
    """

    def __init__(self, nbins=9, pool=8, gaussian_window=16, patch_size=16, in_chans=3):
        super().__init__()
        if patch_size % pool or (gaussian_window and patch_size % gaussian_window):
            raise UsageError(f'HOG cells of {pool} pixels and a Gaussian window of {gaussian_window} pixels must '
                             f'tile a {patch_size}-pixel patch')
        self.nbins, self.pool, self.patch_size, self.in_chans = nbins, pool, patch_size, in_chans
        sobel_x = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
        self.register_buffer('weight_x', sobel_x.expand(in_chans, 1, 3, 3).contiguous(), persistent=False)
        self.register_buffer('weight_y', sobel_x.t().expand(in_chans, 1, 3, 3).contiguous(), persistent=False)
        self.gaussian_window = gaussian_window
        if gaussian_window:
            offsets = (torch.arange(gaussian_window, dtype=torch.float32) - (gaussian_window - 1) / 2)
            profile = torch.exp(-0.5 * (offsets / (gaussian_window // 2)) ** 2)
            window = profile[:, None] * profile[None, :]
            self.register_buffer('gaussian_kernel', window / window.sum(), persistent=False)

    @property
    def dim(self):
        """Values per patch: channels x bins x cells per patch."""
        return self.in_chans * self.nbins * (self.patch_size // self.pool) ** 2

    @torch.no_grad()
    def forward(self, x):
        """
        x: (N, C, H, W) normalised images; H and W multiples of the patch size
        returns: (N, L, C * nbins * (patch / pool)^2) with L = (H / patch) * (W / patch), row-major
        """
        n, c, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise UsageError(f'HOG targets need an image size that the patch size {self.patch_size} divides, '
                             f'got {h}x{w}')
        x = F.pad(x.float(), (1, 1, 1, 1), mode='reflect')
        gx = F.conv2d(x, self.weight_x, groups=c)
        gy = F.conv2d(x, self.weight_y, groups=c)
        magnitude = torch.stack([gx, gy], dim=-1).norm(dim=-1)
        bins = torch.floor(torch.atan2(gx, gy) / math.pi * self.nbins).long() % self.nbins
        if self.gaussian_window:
            g = self.gaussian_window
            magnitude = magnitude * self.gaussian_kernel.repeat(h // g, w // g)
        histogram = torch.zeros(n, c, self.nbins, h, w, device=x.device)
        histogram.scatter_add_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
        p = self.pool
        cells = histogram.reshape(n, c, self.nbins, h // p, p, w // p, p).sum(dim=(4, 6))
        cells = F.normalize(cells, p=2, dim=2)  # (N, C, bins, H/p, W/p)
        k = self.patch_size // p  # cells per patch side
        cells = cells.reshape(n, c * self.nbins, h // self.patch_size, k, w // self.patch_size, k)
        return cells.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // self.patch_size) * (w // self.patch_size), -1)
