"""SimMIM: masked image modeling with a one-layer decoder (Xie et al., "SimMIM: A Simple Framework
for Masked Image Modeling", CVPR 2022).

The encoder is timm's: `SwinTransformer` (Swin-B, 192 px, window 6) or `Beit` (a BEiT-style
ViT-B: layer scale, one relative position bias shared by all blocks, no absolute position
embedding). A learned mask token replaces the embedding of every masked patch before any
position information is added; every token is encoded; a 1x1 convolution and a PixelShuffle
turn the final feature map back into pixels, and the loss is the mean L1 error over the masked
pixels of the normalised image. For the same weights, images and mask, the loss and the
reconstruction are those of the official code (microsoft/SimMIM); `checkpoint_filter_fn` loads
its checkpoints, whose Swin layout and relative-position buffers differ from timm's.

The published recipes (100 and 800 epochs) sit in tables beside the factories; the BEiT-style
classifiers that SimMIM fine-tunes are registered with timm at the bottom.
"""

import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import beit as timm_beit
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import swin_transformer as timm_swin

from util.checkpoint import encoder_of, rebuilt_buffers, register_pretrained_filter
from util.errors import UsageError
from models_vit import timm_vit_like
from util.export import register_timm_encoder, timm_model_like
from util.layers import apply_blocks
from util.masking import MaskPatches, batch_masks, pixel_mask
from util.pictures import reconstruction_panels
from util.optim import register_layer_ids
from util.registry import file_only_cfg, register_checkpoint_identifier, register_pretrain_model


class SwinEncoder(timm_swin.SwinTransformer):
    """timm's Swin Transformer with SimMIM's mask token and no classifier."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, **kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, std=.02)

    @property
    def stride(self):
        """Pixels per token of the final feature map: the patch size, halved resolution per stage."""
        return self.patch_embed.patch_size[0] * 2 ** (len(self.layers) - 1)

    def no_weight_decay(self):
        """The mask token only (besides 1-D parameters and biases), as the official pre-training: its
        Swin also names `relative_position_bias_table` as a keyword to exempt, but SimMIM prefixes
        it with `encoder.`, which no parameter name contains, so the tables are decayed (when
        fine-tuning, timm's Swin exempts them, as the official code does there)."""
        return {'mask_token'}

    def forward_masked(self, x, mask):
        """
        x: (N, C, H, W) images
        mask: (N, H/p, W/p), 1 = masked
        returns: (N, D, H/s, W/s) features, s = self.stride
        """
        x = self.patch_embed(x)  # (N, H/p, W/p, D): timm's Swin works channels-last
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w
        x = self.layers(x)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2)


class BeitEncoder(timm_beit.Beit):
    """timm's BEiT as SimMIM pre-trains a ViT: layer scale, one relative position bias shared by
    every block, no absolute position embedding, the final `norm` (no `fc_norm`), a cls token
    that is encoded and then dropped, and no classifier."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=0, global_pool='', use_abs_pos_emb=False, use_rel_pos_bias=False,
                         use_shared_rel_pos_bias=True, **kwargs)  # global_pool '': the final norm, no fc_norm
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.init_like_simmim()

    @torch.no_grad()
    def init_like_simmim(self):
        """The official initialisation, which differs from timm's: linear and convolution weights,
        the cls and mask tokens are drawn from a normal of std 0.02 truncated at one standard
        deviation (timm cuts at 100), the relative position table starts at zero, and the output
        projections of block i are divided by sqrt(2 i) (BEiT's rescaling, as timm does)."""
        def truncated(tensor):
            trunc_normal_(tensor, std=.02, a=-.02, b=.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                truncated(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        truncated(self.cls_token)
        truncated(self.mask_token)
        nn.init.zeros_(self.rel_pos_bias.relative_position_bias_table)
        self.fix_init_weight()

    @property
    def stride(self):
        return self.patch_embed.patch_size[0]

    def no_weight_decay(self):
        """The cls token only, as the official ViT: its mask token and relative position table are
        decayed (the official Swin exempts its mask token only)."""
        return {'cls_token'}

    def forward_masked(self, x, mask):
        """
        x: (N, C, H, W) images
        mask: (N, H/p, W/p), 1 = masked
        returns: (N, D, H/p, W/p) features of the patch tokens (the cls token is dropped)
        """
        x = self.patch_embed(x)  # (N, L, D)
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        x = apply_blocks(self.blocks, x, self.grad_checkpointing, shared_rel_pos_bias=self.rel_pos_bias())
        x = self.norm(x)[:, 1:]
        h, w = self.patch_embed.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class SimMIM(nn.Module):
    """An encoder that sees masked images, a linear decoder, an L1 loss on the masked pixels."""

    def __init__(self, encoder, mask_ratio=0.6, mask_patch_size=32):
        super().__init__()
        self.encoder = encoder
        stride, in_chans = encoder.stride, encoder.patch_embed.proj.in_channels
        if self.img_size % stride:  # timm's Swin pads a stage of odd size: the rebuilt image would be larger
            raise ValueError(f'the image size {self.img_size} must be a multiple of {stride}, the pixels one token '
                             f'of the encoder\'s last stage covers (the decoder rebuilds blocks of that size)')
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, stride ** 2 * in_chans, kernel_size=1),
            nn.PixelShuffle(stride))
        # the masking drawn when forward() is given no mask (the data pipeline draws its own)
        self.mask_ratio, self.mask_patch_size = mask_ratio, mask_patch_size

    @property
    def patch_size(self):
        return self.encoder.patch_embed.patch_size[0]

    @property
    def img_size(self):
        return self.encoder.patch_embed.img_size[0]

    def no_weight_decay(self):
        return {f'encoder.{name}' for name in self.encoder.no_weight_decay()}

    def set_grad_checkpointing(self, enable=True):
        """--grad_ckpt: recompute the encoder's activations in the backward pass, block by block
        (timm's Swin stages do it themselves once told)."""
        self.encoder.set_grad_checkpointing(enable)

    def mask_generator(self, args):
        """What the data pipeline draws per sample: SimMIM's mask units (--mask_ratio,
        --mask_patch_size) at this encoder's patch grid."""
        return MaskPatches(self.img_size, args.mask_patch_size, self.patch_size, args.mask_ratio)

    def forward_loss(self, imgs, pred, mask):
        """
        imgs, pred: (N, C, H, W)
        mask: (N, H/p, W/p), 1 = masked
        returns: sum |imgs - pred| over the masked pixels / (masked pixels + 1e-5) / C
        """
        masked = pixel_mask(mask, self.patch_size).to(imgs.dtype)
        error = F.l1_loss(pred.float(), imgs.float(), reduction='none')
        return (error * masked).sum() / (masked.sum() + 1e-5) / imgs.shape[1]

    def pictures(self, imgs, pred, mask):
        """What visualize.py and TensorBoard show of a forward's output (util.pictures): the
        original, the masked input, the reconstruction (the decoder predicts every pixel of the
        normalised image, masked or not) and the reconstruction with the visible pixels pasted back."""
        return reconstruction_panels(imgs, pred, pixel_mask(mask, self.patch_size))

    def forward(self, imgs, mask=None):
        """
        imgs: (N, C, H, W), normalised
        mask: (N, H/p, W/p) with 1 = masked, or None to draw one per image (--mask_ratio and
              --mask_patch_size of the model's recipe)
        returns: loss, pred (N, C, H, W) the reconstructed image, mask (N, H/p, W/p)
        """
        default = MaskPatches(self.img_size, self.mask_patch_size, self.patch_size, self.mask_ratio)
        mask = batch_masks(imgs, mask, self.patch_size, default)
        pred = self.decoder(self.encoder.forward_masked(imgs, mask))
        return self.forward_loss(imgs, pred, mask), pred, mask


@register_pretrained_filter(SimMIM)
def checkpoint_filter_fn(state_dict, model):
    """A SimMIM pre-training checkpoint (the official layout, or this project's) as a state dict
    that `model.load_state_dict(..., strict=True)` accepts.

    The official checkpoints hold {'model': {'encoder.*', 'decoder.*'}}; their Swin puts each
    patch merging at the end of a stage (timm at the start of the next) and both encoders store
    buffers (relative_position_index, attn_mask) that timm rebuilds. timm's own Swin and BEiT
    filters convert the layout, drop the buffers, and resize the relative position tables when
    the window (or the image) differs.
    """
    state_dict = state_dict.get('model', state_dict)
    encoder_state, others = encoder_of(state_dict)
    if encoder_state is state_dict:  # nothing under encoder.
        raise UsageError(f'not a SimMIM checkpoint: no "encoder." keys (first keys: {list(state_dict)[:3]})')
    convert = swin_from_pretrained if isinstance(model.encoder, timm_swin.SwinTransformer) else beit_from_pretrained
    state = {**{f'encoder.{k}': v for k, v in convert(encoder_state, model.encoder).items()},
             **{k: state_dict[k] for k in others if k.startswith('decoder.')}}
    return {**rebuilt_buffers(model, state), **state}



# --- fine-tuning: loading into timm's classifiers, layer ids for layer-wise lr decay ---------

def swin_original_layout(state_dict):
    """A Swin state dict (timm's layout or already the original) in the layout of the original code
    (microsoft/Swin-Transformer, SimMIM's releases): each patch merging at the end of its stage
    (timm's `layers.{s}.downsample` is `layers.{s-1}.downsample` there), the classifier `head.`
    (timm: `head.fc.`), no relative_position_index or attn_mask buffers.

    Every timm release the project supports converts this layout correctly on loading, but not
    timm's own layout without a classifier: timm 1.0.12's filter takes any state dict without
    'head.fc.weight' for the original layout and moves each merging one stage on (timm 1.0.31
    looks for 'layers.0.downsample.reduction.weight' instead). So Swin weights pass through here
    before timm's filter, and an exported Swin encoder is written in this layout."""
    original = 'layers.0.downsample.reduction.weight' in state_dict
    out = {}
    for k, v in state_dict.items():
        if k.endswith(('relative_position_index', 'attn_mask')):
            continue
        if not original:
            k = re.sub(r'^layers\.(\d+)\.downsample\.', lambda m: f'layers.{int(m[1]) - 1}.downsample.', k)
            k = re.sub(r'^head\.fc\.', 'head.', k)
        out[k] = v
    return out


@register_pretrained_filter(timm_swin.SwinTransformer)
def swin_from_pretrained(state_dict, model):
    """A Swin encoder (SimMIM's official layout or timm's) for a Swin classifier: timm's filter
    converts the layout (from the original one, which every timm release reads alike) and resizes
    the relative position tables to the classifier's windows (224 px window 7 after pre-training
    at 192 px window 6)."""
    with warnings.catch_warnings():  # timm's table interpolation warns about torch internals
        warnings.simplefilter('ignore', UserWarning)
        return timm_swin.checkpoint_filter_fn(swin_original_layout(state_dict), model)


@register_pretrained_filter(timm_beit.Beit)
def beit_from_pretrained(state_dict, model):
    """A BEiT-style encoder for a BEiT classifier: a shared relative position table becomes each
    block's own when the classifier has one per block (as SimMIM and BEiT fine-tune), then timm's
    filter resizes the tables to the classifier's grid."""
    state_dict = dict(state_dict)
    shared = 'rel_pos_bias.relative_position_bias_table'
    if shared in state_dict and model.rel_pos_bias is None:
        table = state_dict.pop(shared)
        state_dict.pop('rel_pos_bias.relative_position_index', None)
        for i, block in enumerate(model.blocks):
            if block.attn.relative_position_bias_table is not None:
                state_dict[f'blocks.{i}.attn.relative_position_bias_table'] = table.clone()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)
        return timm_beit.checkpoint_filter_fn(state_dict, model)


@register_layer_ids(timm_swin.SwinTransformer)
def swin_layer_ids(model):
    """SimMIM's layer ids of a Swin classifier: the patch embedding 0, block b of stage s
    sum(depths[:s]) + b + 1, a patch merging the id of the last block before it (timm's own
    grouping gives it the next block's), the final norm and the head one id after the last block.
    returns: name -> id"""
    depths = [len(stage.blocks) for stage in model.layers]
    head = sum(depths) + 1

    def layer_id(name):
        parts = name.split('.')
        if parts[0] == 'patch_embed':
            return 0
        if parts[0] != 'layers':
            return head
        stage = int(parts[1])
        if parts[2] == 'downsample':  # timm: merging at the start of stage s = after the blocks of s - 1
            return sum(depths[:stage])
        return sum(depths[:stage]) + int(parts[3]) + 1
    return layer_id


# The official releases by (width, blocks of the ViT or of the Swin's third stage).
OFFICIAL_RELEASES = {('vit', 768, 12): 'simmim_vit_base_patch16_224',
                     ('swin', 128, 18): 'simmim_swin_base_patch4_window6_192',
                     ('swin', 192, 18): 'simmim_swin_large_patch4_window12_192'}


@register_checkpoint_identifier
def official_pretraining(ckpt):
    """(model name, epochs) of an official SimMIM pre-training checkpoint of a released size: its
    yacs configuration when it has one (read as data), else its keys (the epochs are then unknown:
    the default, 100-epoch recipe applies to Swin-B). None for any other checkpoint, an official
    one of another size included (its --model must be given)."""
    state = ckpt.get('model') if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or 'encoder.mask_token' not in state or 'decoder.0.weight' not in state:
        return None
    config = ckpt.get('config') if isinstance(ckpt.get('config'), dict) else {}
    epochs = config.get('TRAIN', {}).get('EPOCHS')
    kind, blocks = ('vit', 'encoder.blocks.') if any(k.startswith('encoder.blocks.') for k in state) \
        else ('swin', 'encoder.layers.2.blocks.')
    depth = len({k[len(blocks):].split('.')[0] for k in state if k.startswith(blocks)})
    name = OFFICIAL_RELEASES.get((kind, state['encoder.patch_embed.proj.weight'].shape[0], depth))
    return (name, epochs) if name else None


# --- recipes ---------------------------------------------------------------------------------
# The official configurations give the learning rates per 512 images; --blr here counts per 256,
# so every rate below is the published one / 2 (2e-4 per 512 is blr 1e-4).

PER_512 = 0.5  # converts a published rate per 512 images to this project's per 256

# Fine-tuning: timm's scheduler starts the warm-up of every layer at the same lr and ends every
# layer's cosine at the same floor (layer_lr_bounds 'shared').
FINETUNE = dict(epochs=100, warmup_epochs=20, blr=1.25e-3 * PER_512, warmup_blr=2.5e-7 * PER_512,
                min_blr=2.5e-7 * PER_512, lr_schedule='cosine_whole_run', layer_lr_bounds='shared', weight_decay=0.05,
                drop_path=0.1, clip_grad=5.0, aa='rand-m9-mstd0.5-inc1', mixup=0.8, cutmix=1.0, smoothing=0.1,
                reprob=0.25, batch_size=128, effective_batch=2048, global_pool=True)
PRETRAIN = dict(batch_size=128, effective_batch=2048, weight_decay=0.05, opt_betas=(0.9, 0.999), clip_grad=5.0,
                crop_min=0.67, interpolation='bilinear', mask_ratio=0.6, mask_patch_size=32, warmup_epochs=10)
# Swin-B, 100 epochs: 83.5 top-1 after fine-tuning (layer decay 0.9)
SCHEDULE_100 = dict(epochs=100, blr=2e-4 * PER_512, warmup_blr=1e-6 * PER_512, min_blr=1e-5 * PER_512,
                    lr_schedule='cosine_whole_run')
# 800 epochs: constant after the warm-up, x0.1 at epoch 700; Swin-B 84.0 (layer decay 0.8), ViT-B 83.8 (0.65)
SCHEDULE_800 = dict(epochs=800, blr=1e-4 * PER_512, warmup_blr=5e-7 * PER_512, lr_schedule='step',
                    lr_milestones=(700,), lr_gamma=0.1)


def _recipe(schedule, input_size, **finetune):
    return dict(PRETRAIN, **schedule, input_size=input_size, finetune=dict(FINETUNE, **finetune))


SWIN_BASE_RECIPES = [
    _recipe(SCHEDULE_100, 192, model='swin_base_patch4_window7_224', layer_decay=0.9, head_init_std=0.02),
    _recipe(SCHEDULE_800, 192, model='swin_base_patch4_window7_224', layer_decay=0.8, head_init_std=0.02)]
SWIN_LARGE_RECIPES = [
    _recipe(SCHEDULE_800, 192, model='swin_large_patch4_window14_224', layer_decay=0.7, drop_path=0.2,
            head_init_std=0.02)]
VIT_BASE_RECIPES = [_recipe(SCHEDULE_800, 224, model='beit_base_patch16_224', layer_decay=0.65, head_init_std=2e-5)]


# --- factories -------------------------------------------------------------------------------
# The Swin sizes, shared by the pre-training models and the classifiers that fine-tune them.
SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
SWIN_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
SWIN_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


def _simmim_swin(overrides, **arch):
    """SimMIM around timm's Swin; keywords (timm's names) override the architecture."""
    kwargs = {**dict(patch_size=4, drop_path_rate=0.0), **arch, **overrides}
    mask = {k: kwargs.pop(k) for k in ('mask_ratio', 'mask_patch_size') if k in kwargs}
    return SimMIM(SwinEncoder(**kwargs), **mask)


def _simmim_vit(overrides, **arch):
    """SimMIM around timm's BEiT; keywords (timm's names) override the architecture."""
    kwargs = {**dict(patch_size=16, mlp_ratio=4, qkv_bias=True, init_values=0.1, drop_path_rate=0.1), **arch,
              **overrides}
    mask = {k: kwargs.pop(k) for k in ('mask_ratio', 'mask_patch_size') if k in kwargs}
    return SimMIM(BeitEncoder(**kwargs), **mask)


@register_pretrain_model('simmim_swin_base', recipes=SWIN_BASE_RECIPES)
def simmim_swin_base_patch4_window6_192(**kwargs):
    """Swin-B (128 wide, depths 2-2-18-2, heads 4-8-16-32) at 192 px, window 6, drop path 0."""
    return _simmim_swin(kwargs, img_size=192, window_size=6, **SWIN_B)


@register_pretrain_model('simmim_swin_large', recipes=SWIN_LARGE_RECIPES)
def simmim_swin_large_patch4_window12_192(**kwargs):
    """Swin-L (192 wide, depths 2-2-18-2, heads 6-12-24-48) at 192 px, window 12, drop path 0."""
    return _simmim_swin(kwargs, img_size=192, window_size=12, **SWIN_L)


@register_pretrain_model('simmim_vit_base', recipes=VIT_BASE_RECIPES)
def simmim_vit_base_patch16_224(**kwargs):
    """BEiT-style ViT-B/16 (768 x 12, 12 heads) at 224 px, layer scale 0.1, drop path 0.1."""
    return _simmim_vit(kwargs, img_size=224, embed_dim=768, depth=12, num_heads=12)


# The demo and the tests: 64 px images, mask units of 16 px (16 units, 10 of them masked).
DEMO_RECIPE = dict(input_size=64, mask_patch_size=16, batch_size=64, effective_batch=64)


@register_pretrain_model('simmim_swin_tiny', recipes=[
        dict(SWIN_BASE_RECIPES[0], **DEMO_RECIPE,
             finetune=dict(SWIN_BASE_RECIPES[0]['finetune'], model='swin_tiny_patch4_window4_64'))])
def simmim_swin_tiny_patch4_window4_64(**kwargs):
    """Swin-T (96 wide, depths 2-2-6-2, heads 3-6-12-24) at 64 px, window 4: the demo and the tests."""
    return _simmim_swin(kwargs, img_size=64, window_size=4, mask_patch_size=16, **SWIN_T)


@register_pretrain_model('simmim_vit_tiny', recipes=[
        dict(VIT_BASE_RECIPES[0], **DEMO_RECIPE,
             finetune=dict(VIT_BASE_RECIPES[0]['finetune'], model='beit_tiny_patch8_64'))])
def simmim_vit_tiny_patch8_64(**kwargs):
    """BEiT-style ViT-Ti on 8x8 patches (192 x 12, 3 heads) at 64 px: the demo and the tests."""
    return _simmim_vit(kwargs, img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3, mask_patch_size=16)


# --- classifiers for fine-tuning (timm) ------------------------------------------------------
# SimMIM fine-tunes Swin as timm's swin_*_patch4_window7_224 (or the ones below) and its ViT as a
# BEiT classifier: a relative position table per block (each a copy of the shared one when
# loading), layer scale, mean pooling and fc_norm: timm's beit_base_patch16_224.

default_cfgs = generate_default_cfgs({
    'swin_base_patch4_window6_192': file_only_cfg(192, classifier='head.fc'),
    'swin_large_patch4_window14_224': file_only_cfg(224, classifier='head.fc'),
    'swin_tiny_patch4_window4_64': file_only_cfg(64, classifier='head.fc'),
    'beit_tiny_patch8_64': file_only_cfg(64),
})


def _swin_classifier(variant, pretrained, kwargs, **arch):
    """timm's Swin; weights given with pretrained=True load through swin_from_pretrained."""
    return build_model_with_cfg(timm_swin.SwinTransformer, variant, pretrained,
                                pretrained_filter_fn=swin_from_pretrained, **{**dict(patch_size=4), **arch, **kwargs})


@register_model
def swin_base_patch4_window6_192(pretrained=False, **kwargs):
    """Swin-B at 192 px, window 6: SimMIM's pre-training geometry, fine-tuned as such by the Ascend port."""
    return _swin_classifier('swin_base_patch4_window6_192', pretrained, kwargs, img_size=192, window_size=6, **SWIN_B)


@register_model
def swin_large_patch4_window14_224(pretrained=False, **kwargs):
    """Swin-L at 224 px, window 14: how SimMIM fine-tunes its Swin-L (pre-trained at 192 px, window 12)."""
    return _swin_classifier('swin_large_patch4_window14_224', pretrained, kwargs, img_size=224, window_size=14,
                            **SWIN_L)


@register_model
def swin_tiny_patch4_window4_64(pretrained=False, **kwargs):
    """Swin-T at 64 px, window 4: the classifier of simmim_swin_tiny."""
    return _swin_classifier('swin_tiny_patch4_window4_64', pretrained, kwargs, img_size=64, window_size=4, **SWIN_T)


@register_model
def beit_tiny_patch8_64(pretrained=False, **kwargs):
    """BEiT-style ViT-Ti on 8x8 patches at 64 px: the classifier of simmim_vit_tiny."""
    arch = dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3, use_abs_pos_emb=False,
                use_rel_pos_bias=True, init_values=0.1)
    return build_model_with_cfg(timm_beit.Beit, 'beit_tiny_patch8_64', pretrained,
                                pretrained_filter_fn=beit_from_pretrained, **{**arch, **kwargs})


# --- the encoder as a timm model (export.py) -------------------------------------------------
# timm's own Swin and BEiT of the sizes SimMIM pre-trains; an exported encoder is one of them, with
# keywords for what differs (image size and window, say).
TIMM_SWINS = {f'swin_{size}_patch4_window7_224': dict(img_size=224, patch_size=4, window_size=7, mlp_ratio=4, **arch)
              for size, arch in (('tiny', SWIN_T), ('base', SWIN_B), ('large', SWIN_L))}
TIMM_BEITS = {
    'beit_base_patch16_224': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4),
    'beit_large_patch16_224': dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4),
}


@register_timm_encoder(SimMIM)
def timm_encoder(model):
    """The encoder as timm's Swin (its final norm, mean pooling) or BEiT (the final norm, the cls
    token as pooling: SimMIM's ViT has no fc_norm). The Swin weights are in the original layout
    (see swin_original_layout); the BEiT's shared relative position table is copied into each block,
    as timm's BEiT has it (timm 1.0.12 cannot load a shared table through its filter: the filter
    drops the shared table's index, which that release keeps in state_dict). The mask token and the
    decoder are left out."""
    encoder = model.encoder
    state = {k: v for k, v in encoder.state_dict().items() if k != 'mask_token'}
    width = encoder.embed_dim
    if isinstance(encoder, timm_swin.SwinTransformer):
        arch = dict(img_size=encoder.patch_embed.img_size[0], patch_size=encoder.patch_embed.patch_size[0],
                    window_size=encoder.layers[0].blocks[0].window_size[0],
                    mlp_ratio=encoder.layers[0].blocks[0].mlp.fc1.out_features / width, embed_dim=width,
                    depths=tuple(len(stage.blocks) for stage in encoder.layers),
                    num_heads=tuple(stage.blocks[0].attn.num_heads for stage in encoder.layers))
        return (*timm_model_like(TIMM_SWINS, arch), swin_original_layout(state))
    name, kwargs = timm_vit_like(encoder, TIMM_BEITS)
    table = state.pop('rel_pos_bias.relative_position_bias_table')
    state.pop('rel_pos_bias.relative_position_index', None)
    state.update({f'blocks.{i}.attn.relative_position_bias_table': table.clone() for i in range(len(encoder.blocks))})
    return name, {**kwargs, 'global_pool': 'token'}, state
