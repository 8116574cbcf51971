"""MaskFeat: masked feature prediction (Wei et al., "Masked Feature Prediction for Self-Supervised
Visual Pre-Training", CVPR 2022), as mmpretrain's maskfeat_vit-base-p16_8xb256-amp-coslr-300e
configuration trains it.

A ViT-B/16 (timm's blocks, a cls token, a learned position embedding) encodes every patch, the
masked ones (BEiT's block-wise masks, 40 %) replaced by a mask token before the cls token and the
position embedding are added; a linear head predicts each patch's histogram of oriented
gradients (HOG) of the normalised input, computed on the device by `HOGGenerator`; the loss is
the mean squared error over the masked patches. The encoder's keys are those of this project's
ViT classifiers (`vit_base_patch16`), which fine-tune it.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from models_vit import timm_vit_like
from util.errors import UsageError
from util.export import register_timm_encoder
from util.layers import apply_blocks
from util.masking import BlockMask, batch_masks, pixel_mask
from util.pictures import Panels, masked_view, oriented_gradient_picture, to_display, upscale
from util.registry import register_pretrain_model


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
        with torch.autocast(x.device.type, enabled=False):  # the target in fp32, whatever the model runs in
            return self._hog(x.float())

    def cells(self, features):
        """The histograms of the cells back from the per-patch vectors of forward, averaged over
        the channels (for pictures).

        features: (N, L, C * nbins * k * k) with k = patch / pool, over a square grid of patches
        returns: (N, nbins, H/pool, W/pool)
        """
        n, num_patches, _ = features.shape
        grid, k = math.isqrt(num_patches), self.patch_size // self.pool
        cells = features.reshape(n, grid, grid, self.in_chans, self.nbins, k, k)
        cells = cells.permute(0, 3, 4, 1, 5, 2, 6).reshape(n, self.in_chans, self.nbins, grid * k, grid * k)
        return cells.mean(dim=1)

    def _hog(self, x):
        n, c, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise UsageError(f'HOG targets need an image size that the patch size {self.patch_size} divides, '
                             f'got {h}x{w}')
        x = F.pad(x, (1, 1, 1, 1), mode='reflect')
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


class MaskedViTEncoder(VisionTransformer):
    """timm's ViT with a cls token, a learned position embedding, the final norm, a mask token and
    no classifier; initialised as mmpretrain initialises MaskFeat's ViT (truncated normals of std
    0.02 for weights, tokens and position table)."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, global_pool='token', class_token=True, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(m.weight, std=.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            for token in (self.cls_token, self.mask_token, self.pos_embed):
                nn.init.trunc_normal_(token, std=.02)

    def forward_masked(self, x, mask):
        """
        x: (N, C, H, W) images
        mask: (N, H/p, W/p), 1 = masked
        returns: (N, L, D) features of the patch tokens (the cls token is encoded, then dropped)
        """
        x = self.patch_embed(x)  # (N, L, D)
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        x = self.pos_drop(x)
        x = apply_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x)[:, 1:]


class MaskFeat(nn.Module):
    """A ViT that sees block-masked images and predicts the HOG of the masked patches."""

    def __init__(self, encoder, hog, mask_ratio=0.4, mask_min_patches=15, mask_min_aspect=0.3):
        super().__init__()
        self.encoder = encoder
        self.hog = hog
        self.head = nn.Linear(encoder.embed_dim, hog.dim)
        nn.init.trunc_normal_(self.head.weight, std=.02)
        nn.init.zeros_(self.head.bias)
        # the masking drawn when forward() is given no mask (the data pipeline draws its own)
        self.mask_ratio, self.mask_min_patches, self.mask_min_aspect = mask_ratio, mask_min_patches, mask_min_aspect

    @property
    def grid(self):
        return self.encoder.patch_embed.grid_size[0]

    def no_weight_decay(self):
        """The mask token only, besides 1-D parameters and biases: mmpretrain decays the position
        table and the cls token."""
        return {'encoder.mask_token'}

    def set_grad_checkpointing(self, enable=True):
        """--grad_ckpt: recompute each encoder block's activations in the backward pass."""
        self.encoder.set_grad_checkpointing(enable)

    def mask_generator(self, args):
        """What the data pipeline draws per sample: BEiT's block-wise masks of --mask_count patches
        (default: --mask_ratio of them), blocks of --mask_min_patches or more, aspect from
        --mask_min_aspect to its inverse."""
        count = getattr(args, 'mask_count', None)
        if count is None:  # not `or`: --mask_count 0 is refused, not read as unset
            count = BlockMask.default_count(self.grid, args.mask_ratio)
        return BlockMask(self.grid, count, args.mask_min_patches, min_aspect=args.mask_min_aspect)

    def forward_loss(self, target, pred, mask):
        """
        target, pred: (N, L, D) HOG and its prediction
        mask: (N, H/p, W/p), 1 = masked
        returns: the squared error, averaged over the D values, then over the masked patches
        """
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        weights = mask.flatten(1).to(per_patch.dtype)
        return (per_patch * weights).sum() / weights.sum()

    def pictures(self, imgs, pred, mask):
        """What visualize.py and TensorBoard show of a forward's output (util.pictures): the input,
        the masked input, the HOG of the input (the target) and the predicted HOG of the masked
        patches, as oriented-gradient pictures. Cells are drawn at least 8 pixels wide, the
        images enlarged to match."""
        scale = max(1, math.ceil(8 / self.hog.pool))
        glyph = self.hog.pool * scale
        original = to_display(upscale(imgs, scale))
        masked = upscale(pixel_mask(mask, self.encoder.patch_embed.patch_size[0]), scale)
        target = oriented_gradient_picture(self.hog.cells(self.hog(imgs)), glyph)
        predicted = oriented_gradient_picture(self.hog.cells(pred * mask.flatten(1).unsqueeze(-1)), glyph)
        return Panels(['input', 'masked input', 'HOG target', 'predicted HOG (masked)'],
                      [original, masked_view(original, masked), target, predicted])

    def forward(self, imgs, mask=None):
        """
        imgs: (N, C, H, W), normalised
        mask: (N, H/p, W/p) with 1 = masked, or None to draw one per image
        returns: loss, pred (N, L, D) the predicted HOG of every patch, mask (N, H/p, W/p)
        """
        default = None if mask is not None else BlockMask(
            self.grid, BlockMask.default_count(self.grid, self.mask_ratio), self.mask_min_patches,
            min_aspect=self.mask_min_aspect)
        mask = batch_masks(imgs, mask, self.encoder.patch_embed.patch_size[0], default)
        pred = self.head(self.encoder.forward_masked(imgs, mask))
        return self.forward_loss(self.hog(imgs), pred, mask), pred, mask


# The published recipe (mmpretrain, 8 x 256 images, AMP): AdamW (0.9, 0.999), lr 2e-4 per 256 images
# (1.6e-3 at 2048), wd 0.05, clipping 0.02, 30 warm-up epochs from 1e-6 x lr, then a cosine to 1e-6,
# 300 epochs, RandomResizedCrop(0.5-1, bicubic) + flip, 78 of 196 patches masked in blocks of 15 or
# more. Fine-tuned as a ViT-B with average pooling: 83.4 top-1, with MAE's recipe but for: lr 1e-3 per
# 256, 20 warm-up epochs from 1e-4 x each layer's lr to a floor of 1e-6 shared by every layer
# (mmpretrain's LinearLR and CosineAnnealingLR), colour jitter 0.4 after RandAugment, and the new
# head's bias starting at 2e-5 (its weights: a normal of std 2e-5).
MASKFEAT_RECIPE = dict(
    epochs=300, input_size=224, batch_size=256, effective_batch=2048, blr=2e-4, warmup_epochs=30,
    warmup_blr=2e-4 * 1e-6, min_lr=1e-6, lr_schedule='cosine', weight_decay=0.05, opt_betas=(0.9, 0.999),
    clip_grad=0.02, crop_min=0.5, interpolation='bicubic', mask_ratio=0.4, mask_min_patches=15, mask_min_aspect=0.3,
    finetune=dict(model='vit_base_patch16', epochs=100, blr=1e-3, warmup_epochs=20, warmup_blr=1e-3 * 1e-4,
                  min_lr=1e-6, layer_decay=0.65, layer_lr_bounds='warmup_scaled', weight_decay=0.05, drop_path=0.1,
                  head_init_std=2e-5, head_init_bias=2e-5, aa='rand-m9-mstd0.5-inc1', color_jitter=0.4,
                  reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, global_pool=True, batch_size=256,
                  effective_batch=2048))


def _maskfeat(overrides, hog=None, **arch):
    """MaskFeat around timm's ViT; keywords (timm's names) override the architecture."""
    kwargs = {**dict(patch_size=16, mlp_ratio=4, qkv_bias=True, drop_path_rate=0.0), **arch, **overrides}
    masking = {k: kwargs.pop(k) for k in ('mask_ratio', 'mask_min_patches', 'mask_min_aspect') if k in kwargs}
    if kwargs['img_size'] % kwargs['patch_size']:
        raise ValueError(f"the image size {kwargs['img_size']} must be a multiple of the patch size "
                         f"{kwargs['patch_size']}")
    encoder = MaskedViTEncoder(norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)
    return MaskFeat(encoder, HOGGenerator(patch_size=kwargs['patch_size'], **(hog or {})), **masking)


@register_pretrain_model('maskfeat_vit_base', recipes=[MASKFEAT_RECIPE])
def maskfeat_vit_base_patch16(**kwargs):
    """ViT-B/16 (768 x 12, 12 heads) at 224 px; HOG of 9 bins in 8-pixel cells: 108 values a patch."""
    return _maskfeat(kwargs, img_size=224, embed_dim=768, depth=12, num_heads=12)


@register_pretrain_model('maskfeat_vit_tiny', recipes=[dict(
        MASKFEAT_RECIPE, input_size=64, batch_size=64, effective_batch=64, mask_min_patches=4,
        finetune=dict(MASKFEAT_RECIPE['finetune'], model='vit_tiny_patch8', batch_size=64, effective_batch=64))])
def maskfeat_vit_tiny_patch8(**kwargs):
    """ViT-Ti on 8x8 patches (192 x 12, 3 heads) at 64 px, HOG of 4-pixel cells and an 8-pixel
    window (108 values a patch), blocks of 4 patches or more: the demo and the tests."""
    return _maskfeat(kwargs, hog=dict(pool=4, gaussian_window=8), img_size=64, patch_size=8, embed_dim=192, depth=12,
                     num_heads=3, mask_min_patches=4)


@register_timm_encoder(MaskFeat)
def timm_encoder(model):
    """The encoder as timm's ViT of its size (models_vit.TIMM_VITS: a cls token, the final norm, token
    pooling); the mask token and the HOG head are left out."""
    state = {k: v for k, v in model.encoder.state_dict().items() if k != 'mask_token'}
    return (*timm_vit_like(model.encoder), state)
