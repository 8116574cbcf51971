"""ViT classifiers for fine-tuning and linear probing, registered with timm.

These are timm's `VisionTransformer` in the form the MAE paper fine-tunes: by default the patch
tokens are averaged and normalised by `fc_norm` before the head (global pooling); with
`global_pool='token'` the cls token after the final `norm` is used instead. The state_dict keys
are those of the official fine-tuned MAE checkpoints, and the encoder keys are those of the
pre-training models of models_mae.py, so a pre-trained encoder loads as it is.

    timm.create_model('vit_base_patch16', num_classes=1000, drop_path_rate=0.1)
"""
from functools import partial

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from util.registry import classifier_kwargs


# the image size each classifier is built for (main_finetune.py's default --input_size)
default_cfgs = generate_default_cfgs({'vit_tiny_patch8': dict(input_size=(3, 64, 64), num_classes=1000)})


def _vit(pretrained, arch, kwargs):
    """Build the given architecture in MAE's fine-tuning form; keywords override it."""
    defaults = dict(global_pool='avg', mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return VisionTransformer(**{**defaults, **arch, **classifier_kwargs(pretrained, kwargs)})


@register_model
def vit_tiny_patch8(pretrained=False, **kwargs):
    """ViT-Ti on 8x8 patches of 64x64 images: the encoder of models_mae.mae_vit_tiny_patch8."""
    return _vit(pretrained, dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_tiny_patch16(pretrained=False, **kwargs):
    return _vit(pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_small_patch16(pretrained=False, **kwargs):
    return _vit(pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_base_patch16(pretrained=False, **kwargs):
    return _vit(pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_large_patch16(pretrained=False, **kwargs):
    return _vit(pretrained, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


@register_model
def vit_huge_patch14(pretrained=False, **kwargs):
    return _vit(pretrained, dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)
