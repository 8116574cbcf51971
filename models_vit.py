"""ViT classifiers for fine-tuning and linear probing, registered with timm.

These are timm's `VisionTransformer` in the form the MAE paper fine-tunes: by default the patch
tokens are averaged and normalised by `fc_norm` before the head (global pooling); with
`global_pool='token'` the cls token after the final `norm` is used instead. The state_dict keys
are those of the official fine-tuned MAE checkpoints, and the encoder keys are those of the
pre-training models of models_mae.py, so a pre-trained encoder loads as it is.

    timm.create_model('vit_base_patch16', num_classes=1000, drop_path_rate=0.1)
    # weights from a file (export.py writes them): loaded through timm's ViT filter
    timm.create_model('vit_base_patch16', pretrained=True, pretrained_cfg_overlay=dict(file='vit.safetensors'))
"""
from functools import partial

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import vision_transformer as timm_vit
from timm.models.vision_transformer import VisionTransformer

from util.export import timm_model_like
from util.registry import file_only_cfg


# the image size each classifier is built for (main_finetune.py's default --input_size)
default_cfgs = generate_default_cfgs({
    'vit_tiny_patch8': file_only_cfg(64),
    'vit_tiny_patch16': file_only_cfg(), 'vit_small_patch16': file_only_cfg(), 'vit_base_patch16': file_only_cfg(),
    'vit_large_patch16': file_only_cfg(), 'vit_huge_patch14': file_only_cfg(),
})


def _vit(variant, pretrained, arch, kwargs):
    """Build the given architecture in MAE's fine-tuning form; keywords override it. Weights given
    with pretrained=True load through timm's ViT filter (position tables resampled)."""
    defaults = dict(global_pool='avg', mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return build_model_with_cfg(VisionTransformer, variant, pretrained,
                                pretrained_filter_fn=timm_vit.checkpoint_filter_fn, **{**defaults, **arch, **kwargs})


@register_model
def vit_tiny_patch8(pretrained=False, **kwargs):
    """ViT-Ti on 8x8 patches of 64x64 images: the encoder of models_mae.mae_vit_tiny_patch8."""
    return _vit('vit_tiny_patch8', pretrained, dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3),
                kwargs)


@register_model
def vit_tiny_patch16(pretrained=False, **kwargs):
    return _vit('vit_tiny_patch16', pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_small_patch16(pretrained=False, **kwargs):
    return _vit('vit_small_patch16', pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_base_patch16(pretrained=False, **kwargs):
    return _vit('vit_base_patch16', pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_large_patch16(pretrained=False, **kwargs):
    return _vit('vit_large_patch16', pretrained, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model
def vit_huge_patch14(pretrained=False, **kwargs):
    return _vit('vit_huge_patch14', pretrained, dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)


# timm's own ViTs of the sizes MAE and MaskFeat pre-train: a cls token, the final norm (LayerNorm, eps
# 1e-6), token pooling, as timm's vit_base_patch16_224.mae. An encoder exported for timm is one of
# them, with keywords for what differs (image and patch size, say).
TIMM_VITS = {
    'vit_tiny_patch16_224': dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4),
    'vit_small_patch16_224': dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4),
    'vit_base_patch16_224': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    'vit_large_patch16_224': dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
    'vit_huge_patch14_224': dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4),
}


def timm_vit_like(encoder, family=None):
    """(timm name, keywords) of the model of `family` ({timm name: architecture}; default timm's
    ViTs) with the architecture of `encoder`, a ViT of timm's patch embedding and blocks (MAE's
    encoder, MaskFeat's, SimMIM's BEiT)."""
    width = encoder.patch_embed.proj.out_channels
    arch = dict(img_size=encoder.patch_embed.img_size[0], patch_size=encoder.patch_embed.patch_size[0],
                embed_dim=width, depth=len(encoder.blocks), num_heads=encoder.blocks[0].attn.num_heads,
                mlp_ratio=encoder.blocks[0].mlp.fc1.out_features / width)
    return timm_model_like(family or TIMM_VITS, arch)
