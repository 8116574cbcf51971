"""MAE: masked autoencoders with a ViT encoder (He et al., "Masked Autoencoders Are Scalable
Vision Learners", CVPR 2022).

The constructor keywords, the `forward` signature and the `state_dict` keys and shapes are those
of the official implementation, so its released checkpoints load as they are and a model
built here computes the same loss, prediction and mask for the same weights, images and noise.
The transformer blocks are timm's (attention through PyTorch's scaled_dot_product_attention).
"""
from functools import partial

import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from models_vit import timm_vit_like
from util.export import register_timm_encoder
from util.layers import apply_blocks
from util.masking import UniformNoise, pixel_mask
from util.pictures import reconstruction_panels, unnormalize_patches
from util.pos_embed import get_2d_sincos_pos_embed
from util.registry import register_pretrain_model
from util.errors import UsageError


class MaskedAutoencoderViT(nn.Module):
    """Masked autoencoder: a ViT encoder sees the visible patches only, a light decoder
    reconstructs the pixels of the masked ones."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3,
                 embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4., norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'the image size {img_size} must be a multiple of the patch size {patch_size}')
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos tables; parameters (not buffers) so the keys match the official checkpoints
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        grid_size = self.patch_embed.grid_size[0]
        self.pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid_size, cls_token=True).unsqueeze(0))

        # the patch projection is a linear map of the flattened patch: initialise it like one
        w = self.patch_embed.proj.weight.data
        torch.nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # a truncated normal with std .02 cut at +-2 is a plain normal in practice
        torch.nn.init.normal_(self.cls_token, std=.02)
        torch.nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            # xavier_uniform as in the official JAX ViT
            torch.nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self):
        """As in the official pre-training (timm's add_weight_decay without a skip list): only 1-D
        parameters and biases escape weight decay; the cls and mask tokens are decayed. The sin-cos
        tables are frozen, so not optimised at all."""
        return {'pos_embed', 'decoder_pos_embed'}

    @property
    def num_patches(self):
        return self.patch_embed.num_patches

    def set_grad_checkpointing(self, enable=True):
        """--grad_ckpt: recompute each block's activations in the backward pass (util.layers)."""
        self.grad_checkpointing = enable

    def mask_generator(self, args):
        """What the data pipeline draws per sample for this model: MAE's uniform noise (--mask_ratio)."""
        return UniformNoise(self.num_patches, args.mask_ratio)

    def patchify(self, imgs):
        """
        imgs: (N, C, H, W)
        returns: (N, L, p*p*C), each patch flattened as (p, p, C)
        """
        return patchify(imgs, self.patch_embed.patch_size[0])

    def unpatchify(self, x):
        """
        x: (N, L, p*p*C)
        returns: (N, C, H, W)
        """
        return unpatchify(x, self.patch_embed.patch_size[0], self.patch_embed.proj.in_channels)

    def random_masking(self, x, mask_ratio, noise=None):
        """Keep a random subset of int(L * (1 - mask_ratio)) patches per sample.

        x: (N, L, D) patch tokens
        noise: (N, L) in [0, 1) or None (drawn here); the patches with the smallest noise are kept
        returns: x_masked (N, L_keep, D), mask (N, L) with 0 keep / 1 masked,
                 ids_restore (N, L) that undoes the shuffle
        """
        N, L, D = x.shape
        ids_keep, mask, ids_restore = masking_order(noise, N, L, mask_ratio, x.device)
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """
        imgs: (N, C, H, W)
        returns: latent (N, 1 + L_keep, D) with the cls token first, mask (N, L), ids_restore (N, L)
        """
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = apply_blocks(self.blocks, x, self.grad_checkpointing)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """
        x: (N, 1 + L_keep, D) encoder output
        returns: (N, L, p*p*C) predicted pixels of every patch
        """
        x = self.decoder_embed(x)

        # mask tokens take the places of the dropped patches, then the shuffle is undone
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], num_masked, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)

        x = x + self.decoder_pos_embed
        x = apply_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """The MSE of pred (N, L, p*p*C) over the patches masked in mask (N, L): see pixel_loss."""
        return pixel_loss(imgs, pred, mask, self.patch_embed.patch_size[0], self.norm_pix_loss)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def pictures(self, imgs, pred, mask):
        """What visualize.py and TensorBoard show of a forward's output: see pixel_pictures."""
        return pixel_pictures(imgs, pred, mask, self.patch_embed.patch_size[0], self.norm_pix_loss)

    def encoder_keys(self):
        """The state_dict keys of the encoder: what an encoder-only checkpoint holds."""
        decoder_prefixes = ('decoder_', 'mask_token')
        return [k for k in self.state_dict() if not k.startswith(decoder_prefixes)]

    def load_encoder_state_dict(self, state_dict):
        """Load an encoder-only checkpoint (e.g. the released `mae_pretrain_vit_base.pth`) into
        the encoder, strictly: every encoder key must be there with its shape, nothing else."""
        expected = self.encoder_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing or unexpected:
            raise UsageError(f'not an encoder state dict for this model: missing {missing[:5]}, '
                             f'unexpected {unexpected[:5]}')
        own = self.state_dict()
        wrong = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}'
                 for k, v in state_dict.items() if v.shape != own[k].shape]
        if wrong:
            raise UsageError(f'encoder weights of another shape: {wrong[:3]}')
        self.load_state_dict(state_dict, strict=False)


def patchify(imgs, p):
    """
    imgs: (N, C, H, W), H and W multiples of p
    returns: (N, L, p*p*C), each p x p patch flattened as (p, p, C), patches row by row
    """
    n, c, h_px, w_px = imgs.shape
    assert h_px == w_px and h_px % p == 0, f'square images divisible by {p} expected, got {h_px}x{w_px}'
    h = w = h_px // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(n, h * w, p * p * c)


def unpatchify(x, p, channels):
    """
    x: (N, L, p*p*C), a square grid of patches
    returns: (N, C, H, W)
    """
    h = w = int(x.shape[1] ** .5)
    assert h * w == x.shape[1], f'a square grid of patches expected, got {x.shape[1]}'
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def masking_order(noise, N, L, mask_ratio, device):
    """MAE's random masking as indices: the int(L * (1 - mask_ratio)) patches with the smallest
    noise are kept.

    noise: (N, L) in [0, 1), or None (drawn here)
    returns: ids_keep (N, L_keep), mask (N, L) with 0 keep / 1 masked, ids_restore (N, L) that
             puts the kept-then-masked order back into patch order
    """
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=device)
    elif noise.shape != (N, L):
        raise ValueError(f'noise must have shape {(N, L)}, got {tuple(noise.shape)}')
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is masked
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones([N, L], device=device)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, dim=1, index=ids_restore), ids_restore


def pixel_loss(imgs, pred, mask, p, norm_pix_loss):
    """
    imgs: (N, C, H, W)
    pred: (N, L, p*p*C)
    mask: (N, L), 0 keep / 1 masked
    returns: mean squared error over the masked patches (each patch's error is its mean over
             pixels); with norm_pix_loss the target is each patch normalised by its own mean
             and (unbiased) variance
    """
    target = patchify(imgs, p)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


NORM_PIX_NOTE = ('norm-pix target: each predicted patch is shown with the mean and variance of the '
                 'original image\'s patch')


def pixel_pictures(imgs, pred, mask, p, norm_pix_loss):
    """The panels of a model that predicts the pixels of each patch (util.pictures).

    imgs: (N, C, H, W) normalised
    pred: (N, L, p*p*C) the prediction of forward, per-patch normalised with norm_pix_loss
    mask: (N, L), 1 = masked
    returns: Panels (original, masked input, reconstruction, reconstruction + visible)
    """
    if norm_pix_loss:
        pred = unnormalize_patches(pred, patchify(imgs, p))
    panels = reconstruction_panels(imgs, unpatchify(pred, p, imgs.shape[1]), pixel_mask(mask, p))
    if norm_pix_loss:
        panels.notes.append(NORM_PIX_NOTE)
    return panels


# The published pre-training recipe (ViT-B/L/H alike): the defaults of main_pretrain.py and of the
# ModelZoo scripts. blr counts per 256 images; the effective batch is batch_size x accum_iter x devices.
MAE_RECIPE = dict(epochs=800, input_size=224, batch_size=64, effective_batch=4096, blr=1.5e-4, min_lr=0.0,
                  warmup_epochs=40, lr_schedule='cosine', weight_decay=0.05, opt_betas=(0.9, 0.95), clip_grad=None,
                  mask_ratio=0.75, norm_pix_loss=True, crop_min=0.2, interpolation='bicubic')


def mae_recipe(classifier, **changes):
    """MAE_RECIPE for one encoder size: its checkpoints fine-tune as `classifier` (models_vit) when
    main_finetune.py is given no --model; the fine-tuning recipe itself is main_finetune's (MAE's)."""
    return dict(MAE_RECIPE, finetune=dict(model=classifier), **changes)


def _mae_vit(overrides, **arch):
    """Build the given architecture; keywords passed to a factory override it (the tests
    shrink depth, the entry points set img_size and norm_pix_loss)."""
    defaults = dict(mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                    decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    return MaskedAutoencoderViT(**{**defaults, **arch, **overrides})


@register_pretrain_model('mae_vit_base', 'mae_vit_base_patch16_dec512d8b', recipes=[mae_recipe('vit_base_patch16')])
def mae_vit_base_patch16(**kwargs):
    """ViT-B/16 encoder (768 x 12, 12 heads), decoder 512 x 8 (16 heads)."""
    return _mae_vit(kwargs, patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_pretrain_model('mae_vit_large', 'mae_vit_large_patch16_dec512d8b', recipes=[mae_recipe('vit_large_patch16')])
def mae_vit_large_patch16(**kwargs):
    """ViT-L/16 encoder (1024 x 24, 16 heads), decoder 512 x 8 (16 heads)."""
    return _mae_vit(kwargs, patch_size=16, embed_dim=1024, depth=24, num_heads=16)


@register_pretrain_model('mae_vit_huge', 'mae_vit_huge_patch14_dec512d8b', recipes=[mae_recipe('vit_huge_patch14')])
def mae_vit_huge_patch14(**kwargs):
    """ViT-H/14 encoder (1280 x 32, 16 heads), decoder 512 x 8 (16 heads)."""
    return _mae_vit(kwargs, patch_size=14, embed_dim=1280, depth=32, num_heads=16)


@register_pretrain_model('mae_vit_small', recipes=[mae_recipe('vit_small_patch16')])
def mae_vit_small_patch16(**kwargs):
    """ViT-S/16 encoder (384 x 12, 6 heads), decoder 256 x 4 (8 heads): small-scale studies."""
    return _mae_vit(kwargs, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                    decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)


@register_pretrain_model('mae_vit_tiny', recipes=[mae_recipe('vit_tiny_patch8', input_size=64)])
def mae_vit_tiny_patch8(**kwargs):
    """ViT-Ti encoder (192 x 12, 3 heads) on 8x8 patches, decoder 128 x 2 (4 heads): the demo
    and the tests, at 64x64 pixels (an 8x8 grid of patches)."""
    return _mae_vit(kwargs, img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                    decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)


@register_timm_encoder(MaskedAutoencoderViT)
def timm_encoder(model):
    """The encoder as timm's ViT of its size (models_vit.TIMM_VITS: a cls token, the final norm, token
    pooling, as timm's vit_base_patch16_224.mae); the decoder and the mask token are left out."""
    state = model.state_dict()
    return (*timm_vit_like(model), {k: state[k] for k in model.encoder_keys()})
