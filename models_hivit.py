"""HiViT: a hierarchical ViT whose early stages stay inside each patch (Zhang et al., "HiViT:
A Simpler and More Efficient Design of Hierarchical Vision Transformer", ICLR 2023), and its
MAE pre-training.

The image is cut into 16 x 16 units. Inside each unit, two MLP-only stages work on 4 x 4 and then
2 x 2 sub-patches, each ending in a patch merging; the main stage is a plain transformer over one
token per unit, with an absolute and (optionally) a relative position bias. Nothing in the stem
mixes units, so MAE's masking works as in a ViT: the masked units are dropped before the stem.

The constructor keywords and the state_dict keys are those of the official code
(zhangxiaosong18/hivit), so its checkpoints load as they are: one flat `blocks` list (MLP blocks,
`PatchMerge`s, then the attention blocks), `absolute_pos_embed`, a `relative_position_index`
buffer shared by the blocks, a `relative_position_bias_table` per block, `fc_norm`, `head`.
Attention goes through PyTorch's scaled_dot_product_attention, the relative position bias as
its additive mask. The classifiers are registered with timm (`hivit_tiny` ... `hivit_large`).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed as TimmPatchEmbed, trunc_normal_
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging

from models_mae import masking_order, pixel_loss, pixel_pictures, unpatchify
from util.checkpoint import rebuilt_buffers, register_pretrained_filter
from util.export import register_timm_encoder, timm_model_like
from util.layers import apply_blocks
from util.masking import UniformNoise
from util.pos_embed import get_2d_sincos_pos_embed
from util.registry import file_only_cfg, register_pretrain_model, supervised_recipe


def relative_position_index(grid):
    """
    grid: tokens per side of a square grid
    returns: (grid^2, grid^2) long, the row of each (query, key) pair's offset in a table of
             (2 grid - 1)^2 offsets (Swin's layout)
    """
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    return offsets[..., 0] * (2 * grid - 1) + offsets[..., 1]


class Attention(nn.Module):
    """Multi-head self-attention with an optional relative position bias table of its own."""

    def __init__(self, input_size, dim, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.,
                 rpe=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * input_size - 1) ** 2, num_heads)) if rpe else None
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rpe_index=None):
        """
        x: (N, T, D)
        rpe_index: (T*T,) shared, or (N, T*T) per sample (the kept units of a masked image), or None
        returns: (N, T, D)
        """
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None
        if rpe_index is not None and self.relative_position_bias_table is not None:
            bias = self.relative_position_bias_table[rpe_index].view(-1, T, T, self.num_heads).permute(0, 3, 1, 2)
            bias = bias.to(q.dtype)  # the table stays fp32 under autocast
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                           dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(N, T, D)))


class BlockWithRPE(nn.Module):
    """A pre-norm transformer block; with num_heads=0 an MLP-only block (the stem's)."""

    def __init__(self, input_size, dim, num_heads=0, mlp_ratio=4., qkv_bias=True, qk_scale=None, drop=0.,
                 attn_drop=0., drop_path=0., rpe=True, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        with_attn = num_heads > 0
        self.norm1 = norm_layer(dim) if with_attn else None
        self.attn = Attention(input_size, dim, num_heads, qkv_bias, qk_scale, attn_drop, drop,
                              rpe) if with_attn else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x, rpe_index=None):
        """x: (..., D), tokens on the last dimension but one (attention) or anywhere (MLP only)"""
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x), rpe_index))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(TimmPatchEmbed):
    """timm's patch embedding at the sub-patch size (patch_size / inner_patches, 4 px), its
    output grouped by unit: (N, L, inner, inner, C), units and sub-patches row by row."""

    def __init__(self, img_size=224, patch_size=16, inner_patches=4, in_chans=3, embed_dim=128, norm_layer=None):
        if img_size % patch_size or patch_size % inner_patches:
            raise ValueError(f'the image size {img_size} must be a multiple of the patch size {patch_size}, '
                             f'and the patch size of the {inner_patches} sub-patches a side')
        super().__init__(img_size, patch_size // inner_patches, in_chans, embed_dim, norm_layer, output_fmt='NHWC')
        self.inner_patches = inner_patches
        self.patches_resolution = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.patches_resolution[0] ** 2  # units, the main stage's tokens

    def forward(self, x):
        x = super().forward(x)  # (N, H/s, W/s, C), s the sub-patch size
        n, h, w, c = x.shape
        k = self.inner_patches
        return x.view(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, k, k, c)


class PatchMerge(PatchMerging):
    """timm's Swin patch merging (2 x 2 neighbours concatenated, normalised, projected to twice the
    width), applied inside each unit: (N, L, k, k, C) -> (N, L, k/2, k/2, 2C)."""

    def forward(self, x):
        n, units = x.shape[:2]
        return super().forward(x.flatten(0, 1)).unflatten(0, (n, units))


class HiViT(nn.Module):
    """The HiViT classifier: the mean of the main stage's tokens, `fc_norm` (mmpretrain's
    classifiers: none, fc_norm=False), then the head."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=512, depths=(2, 2, 20),
                 num_heads=8, stem_mlp_ratio=3., mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0.,
                 attn_drop_rate=0., drop_path_rate=0., norm_layer=nn.LayerNorm, ape=True, rpe=True, patch_norm=True,
                 global_pool='avg', fc_norm=True):
        super().__init__()
        if global_pool not in ('avg', ''):
            raise ValueError(f'Invalid pool type {global_pool!r}: HiViT has no cls token and classifies the mean '
                             f'of its tokens (pass --global_pool)')
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.depths, self.num_main_blocks = tuple(depths), depths[-1]
        self.ape, self.rpe = ape, rpe
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, 4, in_chans, embed_dim // 2 ** (len(depths) - 1),
                                      norm_layer if patch_norm else None)
        grid = self.patch_embed.patches_resolution[0]
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
        if rpe:
            self.register_buffer('relative_position_index', relative_position_index(grid))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = self._build_blocks(grid, embed_dim, depths, num_heads, stem_mlp_ratio, mlp_ratio, qkv_bias,
                                         qk_scale, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, rpe)
        self.fc_norm = norm_layer(embed_dim) if fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        HiViT.init_weights(self)

    @staticmethod
    def _build_blocks(grid, embed_dim, depths, num_heads, stem_mlp_ratio, mlp_ratio, qkv_bias, qk_scale, drop_rate,
                      attn_drop_rate, drop_path_rate, norm_layer, rpe):
        """Each stem stage: 2 x depth MLP blocks and a PatchMerge; then depths[-1] attention
        blocks. Stochastic depth grows linearly over the blocks that are not merges."""
        stem_depths = [2 * d for d in depths[:-1]]
        rates = iter(torch.linspace(0, drop_path_rate, sum(stem_depths) + depths[-1]).tolist())
        blocks, dim = nn.ModuleList(), embed_dim // 2 ** len(stem_depths)
        for depth in stem_depths:
            blocks.extend(BlockWithRPE(grid, dim, 0, stem_mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                                       next(rates), rpe, norm_layer=norm_layer) for _ in range(depth))
            blocks.append(PatchMerge(dim, norm_layer=norm_layer))
            dim *= 2
        blocks.extend(BlockWithRPE(grid, dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                                   next(rates), rpe, norm_layer=norm_layer) for _ in range(depths[-1]))
        return blocks

    def init_weights(self):
        """The official supervised initialisation: truncated normals (std .02) for the linear
        layers, the position table and the relative position tables."""
        if self.ape:
            trunc_normal_(self.absolute_pos_embed, std=.02)
        for name, p in self.named_parameters():
            if name.endswith('relative_position_bias_table'):
                trunc_normal_(p, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable=True):
        """--grad_ckpt (timm's name): recompute each block's activations in the backward pass."""
        self.grad_checkpointing = enable

    def no_weight_decay(self):
        """The position tables (biases and norms are left out of decay anyway)."""
        return {'absolute_pos_embed'} | {n for n, _ in self.named_parameters()
                                         if n.endswith('relative_position_bias_table')}

    def layer_id(self, name):
        """The official layer ids of layer-wise lr decay: 0 for the patch embedding and the
        position table, i for the i-th block that is not a merge, the id of the block before it
        for a merge, and the number of those blocks + 1 for the rest (fc_norm, head, norm)."""
        if name.startswith(('patch_embed', 'absolute_pos_embed')):
            return 0
        merges = [isinstance(b, PatchMerge) for b in self.blocks]
        if name.startswith('blocks.'):
            index = int(name.split('.')[1])
            return sum(not m for m in merges[:index + 1])
        return merges.count(False) + 1

    def group_matcher(self, coarse=False):
        """timm's hook for layer-wise lr decay: the official layer ids (a callable matcher)."""
        return self.layer_id

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def main_stage_rpe_index(self, ids_keep=None):
        """The relative position index of the main stage: (L*L,) for all units, (N, K*K) for the
        kept units ids_keep (N, K) of each sample; None without rpe."""
        if not self.rpe:
            return None
        if ids_keep is None:
            return self.relative_position_index.view(-1)
        index = self.relative_position_index[ids_keep]  # (N, K, L): the kept queries
        return torch.gather(index, 2, ids_keep[:, None, :].expand(-1, ids_keep.shape[1], -1)).flatten(1)

    def forward_features(self, x, ids_keep=None, return_hifeat=False):
        """
        x: (N, C, H, W)
        ids_keep: (N, K) the units to keep (MAE), or None for all L units
        returns: (N, K, D) main-stage tokens; with return_hifeat, [(N, K, 4, 4, D/4) before the
                 first merge, (N, K, 2, 2, D/2) before the second, (N, K, D) the tokens]
        """
        x = self.patch_embed(x)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[:, :, None, None, None].expand(-1, -1, *x.shape[2:]))
        hifeat = []
        for blk in self.blocks[:-self.num_main_blocks]:
            if isinstance(blk, PatchMerge):
                hifeat.append(x)
            x = apply_blocks([blk], x, self.grad_checkpointing)
        x = x[:, :, 0, 0, :]  # one sub-patch is left per unit
        if self.ape:
            pos_embed = self.absolute_pos_embed.expand(x.shape[0], -1, -1)
            if ids_keep is not None:
                pos_embed = torch.gather(pos_embed, 1, ids_keep[:, :, None].expand(-1, -1, pos_embed.shape[2]))
            x = x + pos_embed
        x = self.pos_drop(x)
        rpe_index = self.main_stage_rpe_index(ids_keep)
        x = apply_blocks(self.blocks[-self.num_main_blocks:], x, self.grad_checkpointing, rpe_index)
        return hifeat + [x] if return_hifeat else x

    def forward_head(self, x, pre_logits=False):
        x = self.fc_norm(x.mean(dim=1))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        """x: (N, C, H, W) -> logits (N, num_classes)"""
        return self.forward_head(self.forward_features(x))


class HiViTMaskedAutoencoder(HiViT):
    """MAE with a HiViT encoder. The masked units are dropped before the stem; with `hifeat` the
    encoder's output for each kept unit is its features before each merge and after the last
    stage, concatenated (4*4*D/4 + 2*2*D/2 + D = 7D) and normalised; a ViT decoder without cls
    token (fixed sin-cos positions) predicts the pixels of every unit."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=512, depths=(2, 2, 20), num_heads=8,
                 stem_mlp_ratio=3., mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=nn.LayerNorm, ape=True, rpe=True, patch_norm=True,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, hifeat=False, norm_pix_loss=True):
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depths, num_heads, stem_mlp_ratio, mlp_ratio,
                         qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, ape, rpe,
                         patch_norm)
        del self.fc_norm, self.head  # the official pre-training model has neither
        self.hifeat, self.norm_pix_loss, self.patch_size = hifeat, norm_pix_loss, patch_size
        grid = self.patch_embed.patches_resolution[0]
        self.norm = norm_layer(7 * embed_dim if hifeat else embed_dim)
        if not hifeat:  # the official code normalises only the hifeat features: the norm stays (its keys), unused
            self.norm.requires_grad_(False)

        self.decoder_embed = nn.Linear(self.norm.normalized_shape[0], decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            BlockWithRPE(grid, decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias, qk_scale, rpe=False,
                         norm_layer=norm_layer) for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.init_weights()

    def init_weights(self):
        """The official pre-training initialisation: sin-cos position tables (the encoder's is
        trained, the decoder's fixed), relative position tables at zero, mask token N(0, .02),
        truncated normals for the linear layers."""
        grid = self.patch_embed.patches_resolution[0]
        if self.ape:
            self.absolute_pos_embed.data.copy_(get_2d_sincos_pos_embed(self.absolute_pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid))
        for name, p in self.named_parameters():
            if name.endswith('relative_position_bias_table'):
                nn.init.zeros_(p)
        nn.init.normal_(self.mask_token, std=.02)
        self.apply(self._init_weights)

    def no_weight_decay(self):
        """As in the official pre-training: only 1-D parameters and biases escape weight decay (the
        position table and the mask token are decayed); the decoder's table is frozen."""
        return {'decoder_pos_embed'}

    @property
    def num_patches(self):
        return self.patch_embed.num_patches

    def mask_generator(self, args):
        """What the data pipeline draws per sample: MAE's uniform noise over the units (--mask_ratio)."""
        return UniformNoise(self.num_patches, args.mask_ratio)

    def unpatchify(self, x):
        """x: (N, L, p*p*C) -> (N, C, H, W)"""
        return unpatchify(x, self.patch_size, self.patch_embed.proj.in_channels)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """
        imgs: (N, C, H, W)
        returns: latent (N, K, 7D with hifeat, else D) for the K kept units, mask (N, L) with
                 0 keep / 1 masked, ids_restore (N, L)
        """
        ids_keep, mask, ids_restore = masking_order(noise, imgs.shape[0], self.num_patches, mask_ratio, imgs.device)
        if self.hifeat:
            features = self.forward_features(imgs, ids_keep, return_hifeat=True)
            return self.norm(torch.cat([f.flatten(2) for f in features], dim=-1)), mask, ids_restore
        return self.forward_features(imgs, ids_keep), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """
        x: (N, K, E) latent of the kept units
        returns: (N, L, p*p*C) predicted pixels of every unit
        """
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] - x.shape[1], -1)
        x = torch.cat([x, mask_tokens], dim=1)  # kept units first, in the order of ids_keep
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = x + self.decoder_pos_embed
        x = apply_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))

    def pictures(self, imgs, pred, mask):
        """What visualize.py and TensorBoard show of a forward's output: models_mae.pixel_pictures."""
        return pixel_pictures(imgs, pred, mask, self.patch_size, self.norm_pix_loss)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """
        imgs: (N, C, H, W)
        noise: (N, L) in [0, 1) or None; the units with the smallest noise are kept (as in MAE)
        returns: loss, pred (N, L, p*p*C), mask (N, L) with 1 = masked
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return pixel_loss(imgs, pred, mask, self.patch_size, self.norm_pix_loss), pred, mask


@register_pretrained_filter(HiViT)
def checkpoint_filter_fn(state_dict, model):
    """An official (or this project's) HiViT checkpoint in the layout of `model`, in timm's
    convention: the supervised code's per-block relative position indices dropped (the model
    keeps its own), the position table and the relative position tables resized to the model's
    grid, tables the checkpoint lacks (MAE-HiViT is pre-trained without them) started at zero,
    and the pre-training norm of the concatenated features dropped when the model has none."""
    state = {k: v for k, v in state_dict.items() if not k.endswith('relative_position_index')}
    own = model.state_dict()
    if 'norm.weight' not in own:
        state = {k: v for k, v in state.items() if not k.startswith('norm.')}
    elif 'norm.weight' not in state and not getattr(model, 'hifeat', True):
        # mmpretrain's MAE-HiViT has no such norm; the model keeps its unused one as it is
        state.update({k: v for k, v in own.items() if k.startswith('norm.')})
    for key, value in own.items():
        if key.endswith('relative_position_bias_table'):
            if key not in state:
                state[key] = torch.zeros_like(value)
            elif state[key].shape != value.shape:
                side = int(value.shape[0] ** .5)
                state[key] = resize_rel_pos_bias_table(state[key], new_window_size=((side + 1) // 2,) * 2,
                                                       new_bias_shape=value.shape)
    if 'absolute_pos_embed' in own and state.get('absolute_pos_embed') is not None \
            and state['absolute_pos_embed'].shape != own['absolute_pos_embed'].shape:
        state['absolute_pos_embed'] = resample_abs_pos_embed(
            state['absolute_pos_embed'], new_size=model.patch_embed.patches_resolution, num_prefix_tokens=0)
    return {**rebuilt_buffers(model, state), **state}


# --------------------------------------------------------------------------------------------
# Classifiers (timm)

# The sizes of the classifiers (and of the encoders exported to timm as them).
HIVIT_SIZES = {
    'hivit_tiny': dict(img_size=224, patch_size=16, embed_dim=384, depths=(1, 1, 10), num_heads=6),
    'hivit_small': dict(img_size=224, patch_size=16, embed_dim=384, depths=(2, 2, 20), num_heads=6),
    'hivit_base': dict(img_size=224, patch_size=16, embed_dim=512, depths=(2, 2, 20), num_heads=8),
    'hivit_large': dict(img_size=224, patch_size=16, embed_dim=768, depths=(2, 2, 40), num_heads=12),
    'hivit_tiny_patch8_64': dict(img_size=64, patch_size=8, embed_dim=192, depths=(1, 1, 10), num_heads=3),
}

default_cfgs = generate_default_cfgs({name: file_only_cfg(arch['img_size']) for name, arch in HIVIT_SIZES.items()})


# The official supervised recipe (Swin's training code and configs): lr 1e-3 at batch 1024 (5e-4 per
# 512, here per 256), warm-up from 1e-6 and cosine to 1e-5 (scaled with the batch like the lr) over
# the whole run, AdamW (0.9, 0.999), wd 0.05, no clipping, RandAugment, mixup, cutmix, random
# erasing, smoothing, no EMA, no repeated augmentation; 128 per device x 8 devices.
# Top-1: tiny 82.1 (mmpretrain's measured checkpoint), small 83.5, base 84.2 (paper).
HIVIT_SUPERVISED = dict(
    epochs=300, batch_size=128, effective_batch=1024, blr=2.5e-4, warmup_blr=2.5e-7, min_blr=2.5e-6,
    warmup_epochs=20, lr_schedule='cosine_whole_run', weight_decay=0.05, opt_betas=(0.9, 0.999), clip_grad=0,
    layer_decay=None, aa='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, global_pool=True,
    head_init_std=None)


def _hivit(variant, pretrained, kwargs):
    """HiViT of the size HIVIT_SIZES[variant] with the official defaults (stem MLP ratio 3, LayerNorm
    eps 1e-6); keywords override the architecture. Weights given with pretrained=True load through
    checkpoint_filter_fn."""
    defaults = dict(stem_mlp_ratio=3., mlp_ratio=4., norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return build_model_with_cfg(HiViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**defaults, **HIVIT_SIZES[variant], **kwargs})


@register_model
@supervised_recipe(dict(HIVIT_SUPERVISED, drop_path=0.05))
def hivit_tiny(pretrained=False, **kwargs):
    """384 wide, depths (1, 1, 10), 6 heads: 19.2 M parameters."""
    return _hivit('hivit_tiny', pretrained, kwargs)


@register_model
@supervised_recipe(dict(HIVIT_SUPERVISED, drop_path=0.3))
def hivit_small(pretrained=False, **kwargs):
    """384 wide, depths (2, 2, 20), 6 heads."""
    return _hivit('hivit_small', pretrained, kwargs)


@register_model
@supervised_recipe(dict(HIVIT_SUPERVISED, drop_path=0.5))
def hivit_base(pretrained=False, **kwargs):
    """512 wide, depths (2, 2, 20), 8 heads: 66.4 M parameters (the paper's and the official
    code's; mmpretrain's hivit-base config has 24 main blocks, 79 M)."""
    return _hivit('hivit_base', pretrained, kwargs)


@register_model
def hivit_large(pretrained=False, **kwargs):
    """768 wide, depths (2, 2, 40), 12 heads."""
    return _hivit('hivit_large', pretrained, kwargs)


@register_model
@supervised_recipe(dict(HIVIT_SUPERVISED, drop_path=0.05, batch_size=64, effective_batch=64))
def hivit_tiny_patch8_64(pretrained=False, **kwargs):
    """192 wide, depths (1, 1, 10), 3 heads, on 8-pixel units (2-pixel sub-patches) of 64 px
    images: the demo and the tests."""
    return _hivit('hivit_tiny_patch8_64', pretrained, kwargs)


# mmpretrain's HiViT classifiers (configs/hivit; util/mmpretrain.py reads their checkpoints): the
# mean of the tokens goes to the head without fc_norm, LayerNorm keeps torch's eps (1e-5), and its
# base has 24 main blocks (79 M parameters).
MMPRETRAIN_SIZES = {'hivit_tiny': HIVIT_SIZES['hivit_tiny'], 'hivit_small': HIVIT_SIZES['hivit_small'],
                    'hivit_base': dict(HIVIT_SIZES['hivit_base'], depths=(2, 2, 24)),
                    'hivit_tiny_patch8_64': HIVIT_SIZES['hivit_tiny_patch8_64']}
default_cfgs.update(generate_default_cfgs({f'{name}_mmpretrain': file_only_cfg(arch['img_size'])
                                           for name, arch in MMPRETRAIN_SIZES.items()}))


def _mmpretrain_hivit(size, pretrained, kwargs):
    defaults = dict(stem_mlp_ratio=3., mlp_ratio=4., fc_norm=False)
    return build_model_with_cfg(HiViT, f'{size}_mmpretrain', pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**defaults, **MMPRETRAIN_SIZES[size], **kwargs})


@register_model
def hivit_tiny_mmpretrain(pretrained=False, **kwargs):
    """mmpretrain's hivit-tiny-p16 classifier: hivit_tiny without fc_norm."""
    return _mmpretrain_hivit('hivit_tiny', pretrained, kwargs)


@register_model
def hivit_small_mmpretrain(pretrained=False, **kwargs):
    """mmpretrain's hivit-small-p16 classifier: hivit_small without fc_norm."""
    return _mmpretrain_hivit('hivit_small', pretrained, kwargs)


@register_model
def hivit_base_mmpretrain(pretrained=False, **kwargs):
    """mmpretrain's hivit-base-p16 classifier: 512 wide, depths (2, 2, 24), 8 heads, no fc_norm."""
    return _mmpretrain_hivit('hivit_base', pretrained, kwargs)


@register_model
def hivit_tiny_patch8_64_mmpretrain(pretrained=False, **kwargs):
    """hivit_tiny_patch8_64 as mmpretrain builds its classifiers (no fc_norm): the tests."""
    return _mmpretrain_hivit('hivit_tiny_patch8_64', pretrained, kwargs)


# --------------------------------------------------------------------------------------------
# MAE pre-training

# The official MAE-HiViT recipe: MAE's, with blr 1e-4 (1.6e-3 at 4096 = 256 x 8 devices x 2) and
# 1600 epochs (800 also published); 100 epochs of fine-tuning as hivit_base with relative position
# bias (its tables start at zero), blr 5e-4 at 1024 (64 x 8 x 2), layer decay 0.85, drop path
# 0.2, 5 warm-up epochs: 84.6 top-1 after 1600 epochs. The augmentation is MAE's.
MAE_HIVIT_FINETUNE = dict(model='hivit_base', epochs=100, blr=5e-4, warmup_epochs=5, min_lr=1e-6, layer_decay=0.85,
                          weight_decay=0.05, drop_path=0.2, head_init_std=2e-5, batch_size=64, effective_batch=1024)
MAE_HIVIT_RECIPE = dict(epochs=1600, input_size=224, batch_size=256, effective_batch=4096, blr=1e-4, min_lr=0.0,
                        warmup_epochs=40, lr_schedule='cosine', weight_decay=0.05, opt_betas=(0.9, 0.95),
                        clip_grad=None, mask_ratio=0.75, norm_pix_loss=True, crop_min=0.2, interpolation='bicubic',
                        finetune=MAE_HIVIT_FINETUNE)


def _mae_hivit(overrides, **arch):
    defaults = dict(stem_mlp_ratio=3., mlp_ratio=4., norm_layer=partial(nn.LayerNorm, eps=1e-6), hifeat=True,
                    rpe=False)
    return HiViTMaskedAutoencoder(**{**defaults, **arch, **overrides})


@register_pretrain_model('mae_hivit_base', recipes=[MAE_HIVIT_RECIPE, dict(MAE_HIVIT_RECIPE, epochs=800)])
def mae_hivit_base_dec512d6b(**kwargs):
    """HiViT-B encoder without relative position bias, hifeat, decoder 512 x 6 (16 heads)."""
    return _mae_hivit(kwargs, embed_dim=512, depths=(2, 2, 20), num_heads=8, decoder_embed_dim=512, decoder_depth=6,
                      decoder_num_heads=16)


@register_pretrain_model('mae_hivit_tiny', recipes=[dict(
        MAE_HIVIT_RECIPE, input_size=64, batch_size=64, effective_batch=64,
        finetune=dict(MAE_HIVIT_FINETUNE, model='hivit_tiny_patch8_64', batch_size=64, effective_batch=64))])
def mae_hivit_tiny_patch8_64(**kwargs):
    """The encoder of hivit_tiny_patch8_64 at 64 px, decoder 128 x 2 (4 heads): the demo and the tests."""
    return _mae_hivit(kwargs, img_size=64, patch_size=8, embed_dim=192, depths=(1, 1, 10), num_heads=3,
                      decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)


# mmpretrain's MAE-HiViT (configs/mae/mae_hivit-base-p16_8xb512-amp-coslr-1600e_in1k.py): its HiViT-B of
# 24 main blocks, without hifeat (the decoder sees the main stage's tokens) and without relative position
# bias, the same decoder; MAE's recipe (blr 1.5e-4 at 4096 = 512 x 8, 40 warm-up epochs from 1e-4 x lr,
# 1600 epochs; 400 and 800 also published). Fine-tuned as mmpretrain's classifier of the same size.
MAE_HIVIT_MMPRETRAIN = [dict(MAE_HIVIT_RECIPE, epochs=epochs, blr=1.5e-4, warmup_blr=1.5e-4 * 1e-4, batch_size=512,
                             finetune=dict(MAE_HIVIT_FINETUNE, model='hivit_base_mmpretrain'))
                        for epochs in (1600, 800, 400)]


@register_pretrain_model(recipes=MAE_HIVIT_MMPRETRAIN)
def mae_hivit_base_mmpretrain(**kwargs):
    """mmpretrain's MAE-HiViT-B: depths (2, 2, 24), no hifeat, no relative position bias, decoder
    512 x 6 (16 heads)."""
    return _mae_hivit(kwargs, embed_dim=512, depths=(2, 2, 24), num_heads=8, hifeat=False, decoder_embed_dim=512,
                      decoder_depth=6, decoder_num_heads=16)


@register_pretrain_model(recipes=[dict(
        MAE_HIVIT_MMPRETRAIN[0], input_size=64, batch_size=64, effective_batch=64,
        finetune=dict(MAE_HIVIT_FINETUNE, model='hivit_tiny_patch8_64_mmpretrain', batch_size=64, effective_batch=64))])
def mae_hivit_tiny_patch8_64_mmpretrain(**kwargs):
    """mae_hivit_tiny_patch8_64 as mmpretrain builds MAE-HiViT (no hifeat): the tests."""
    return _mae_hivit(kwargs, img_size=64, patch_size=8, embed_dim=192, depths=(1, 1, 10), num_heads=3, hifeat=False,
                      decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)


@register_timm_encoder(HiViTMaskedAutoencoder)
def timm_encoder(model):
    """The encoder as the HiViT classifier of its size (registered with timm by this file), without
    relative position bias when it was pre-trained without (the official fine-tuning adds tables
    that start at zero: leave out rpe=False and checkpoint_filter_fn adds them). Its features are
    the main stage's tokens; the pooled features, their mean through `fc_norm`, which MAE-HiViT
    does not have: it starts as the identity (weight 1, bias 0). The norm of the concatenated
    features, the decoder and the mask token are left out."""
    skip = ('norm.', 'decoder_', 'mask_token')
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    state.update({'fc_norm.weight': torch.ones(model.num_features), 'fc_norm.bias': torch.zeros(model.num_features)})
    arch = dict(img_size=model.patch_embed.img_size[0], patch_size=model.patch_size, embed_dim=model.num_features,
                depths=model.depths, num_heads=model.blocks[-1].attn.num_heads)
    name, kwargs = timm_model_like(HIVIT_SIZES, arch)
    return name, {**kwargs, **({} if model.rpe else {'rpe': False})}, state
