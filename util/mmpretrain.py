"""Checkpoints written by mmpretrain (open-mmlab/mmpretrain: its MAE, MaskFeat and HiViT configs,
the ones accelerator ports such as SDAA's train with), read as the official layouts this project
loads: `util.checkpoint.model_state_of` passes every state dict whose keys start with `backbone.`
through `official_layout`, so --finetune, --eval, --knn, visualize.py and export.py take them as
they take the official releases. mmpretrain itself is not needed.

What differs (mmpretrain's module names on the left):
    backbone.patch_embed.projection       patch_embed.proj           (ViT)
    backbone.layers.N.ln1 / ln2           blocks.N.norm1 / norm2     (ViT, and the MAE decoder's blocks)
    ....ffn.layers.0.0 / ffn.layers.1     ....mlp.fc1 / mlp.fc2
    backbone.ln1                          norm                       (the final norm)
    backbone.ln2                          fc_norm                    (after average pooling)
    backbone.pos_embed                    absolute_pos_embed         (HiViT; its other keys are the official ones)
    neck.decoder_* / neck.mask_token      decoder_* / mask_token     (MAE's decoder; neck.ln1 is decoder_norm)
    neck.fc                               head                       (MaskFeat's HOG predictor)
    backbone.* of MaskFeat                encoder.*
    head.fc, head.layers.head             head                       (classifiers)
    neck.bn + head.fc                     head.0 + head.1            (a linear probe: BatchNorm, then the linear)
The HOG generator's buffers (`target_generator.*`) are dropped: the model computes its own.
"""
import re

import torch

# Block-level renames of mmpretrain's TransformerEncoderLayer (the ViT's and the MAE decoder's).
VIT_BLOCK = ((r'\.ln1\.', '.norm1.'), (r'\.ln2\.', '.norm2.'), (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
             (r'\.ffn\.layers\.1\.', '.mlp.fc2.'))


def is_mmpretrain(state):
    """Whether a state dict is in mmpretrain's layout (an mmengine model: backbone, neck, head)."""
    return isinstance(state, dict) and any(isinstance(k, str) and k.startswith('backbone.') for k in state)


def is_hivit(state):
    return any(k.startswith('backbone.blocks.') for k in state)


def is_maskfeat(state):
    """MaskFeat's pre-training model: a backbone with a mask token, the linear neck predicting HOG."""
    return 'neck.fc.weight' in state and 'backbone.mask_token' in state


def official_layout(state):
    """An mmpretrain state dict (a pre-training model or a classifier) in the layout of the official
    code: MAE's (ViT or HiViT encoder, its decoder), this project's MaskFeat (encoder.*, head.*), a timm
    classifier's (ViT: patch_embed.proj, blocks.N.norm1, ..., fc_norm, head; HiViT: the official keys)."""
    hivit, maskfeat = is_hivit(state), is_maskfeat(state)
    probe = 'neck.bn.running_mean' in state
    out = {}
    for key, value in state.items():
        if key.startswith(('target_generator.', 'data_preprocessor.')):
            continue
        key = _renamed(key, hivit, maskfeat, probe)
        if key == 'decoder_pos_embed' and hivit:
            value = value[:, 1:]  # mmpretrain's decoder keeps a cls slot that HiViT has no token for
        out[key] = value
    return out


def _renamed(key, hivit, maskfeat, probe):
    part, _, rest = key.partition('.')
    if part == 'backbone':
        if hivit:
            return 'absolute_pos_embed' if rest == 'pos_embed' else rest
        rest = re.sub(r'^patch_embed\.projection\.', 'patch_embed.proj.', rest)
        rest = re.sub(r'^ln1\.', 'norm.', rest)
        rest = re.sub(r'^ln2\.', 'fc_norm.', rest)
        rest = re.sub(r'^layers\.', 'blocks.', rest)
        return ('encoder.' if maskfeat else '') + _block_renamed(rest)
    if part == 'neck':
        if rest.startswith('fc.'):  # MaskFeat's linear neck predicts the HOG features
            return 'head.' + rest[len('fc.'):]
        if rest.startswith('bn.'):
            return 'head.0.' + rest[len('bn.'):]
        if rest.startswith('ln1.'):
            return 'decoder_norm.' + rest[len('ln1.'):]
        return _block_renamed(rest)
    if part == 'head':
        rest = re.sub(r'^(fc|layers\.head)\.', '', rest)
        return ('head.1.' if probe else 'head.') + rest
    return key


def _block_renamed(key):
    for pattern, new in VIT_BLOCK:
        key = re.sub(pattern, new, key)
    return key


# --- which model wrote it -------------------------------------------------------------------
# mmpretrain's pre-training models by (method, width, encoder depth, patch size): this project's
# model of the same architecture. HiViT's depth counts the main stage's blocks.
PRETRAINING_MODELS = {
    ('mae', 768, 12, 16): 'mae_vit_base_patch16',
    ('mae', 1024, 24, 16): 'mae_vit_large_patch16',
    ('mae', 1280, 32, 14): 'mae_vit_huge_patch14',
    ('mae', 192, 12, 8): 'mae_vit_tiny_patch8',
    ('maskfeat', 768, 12, 16): 'maskfeat_vit_base_patch16',
    ('maskfeat', 192, 12, 8): 'maskfeat_vit_tiny_patch8',
    ('mae_hivit', 512, 24, 16): 'mae_hivit_base_mmpretrain',
    ('mae_hivit', 192, 10, 8): 'mae_hivit_tiny_patch8_64_mmpretrain',
}


def architecture(state):
    """(method, width, depth, patch size) of an mmpretrain pre-training state dict; None for a
    classifier or another layout."""
    if not is_mmpretrain(state):
        return None
    if is_maskfeat(state):
        method = 'maskfeat'
    elif 'neck.decoder_pred.weight' in state:
        method = 'mae_hivit' if is_hivit(state) else 'mae'
    else:
        return None
    if method == 'mae_hivit':
        width = state['backbone.pos_embed'].shape[-1]
        blocks = {int(k.split('.')[2]) for k in state if re.match(r'backbone\.blocks\.\d+\.attn\.qkv\.weight', k)}
        conv = state['backbone.patch_embed.proj.weight']
        return method, width, len(blocks), conv.shape[-1] * 4  # four sub-patches a side make a unit
    blocks = {int(k.split('.')[2]) for k in state if k.startswith('backbone.layers.')}
    conv = state['backbone.patch_embed.projection.weight']
    return method, conv.shape[0], len(blocks), conv.shape[-1]


def pretraining_of(ckpt):
    """(model name, epochs) of an mmpretrain pre-training checkpoint ({'meta', 'state_dict'}), for
    the recipes; None for any other checkpoint. The epochs are read from the configuration that
    mmengine stores as text in meta['cfg'] (max_epochs), when it is there."""
    state = ckpt.get('state_dict') if isinstance(ckpt, dict) else None
    arch = architecture(state) if isinstance(state, dict) else None
    if arch is None or arch not in PRETRAINING_MODELS:
        return None
    config = (ckpt.get('meta') or {}).get('cfg') if isinstance(ckpt.get('meta'), dict) else None
    epochs = re.search(r'max_epochs\s*=\s*(\d+)', config) if isinstance(config, str) else None
    return PRETRAINING_MODELS[arch], int(epochs[1]) if epochs else None


# --- mmengine's training checkpoints ------------------------------------------------------------
# Besides meta and state_dict, an epoch_N.pth of mmengine's Runner holds the message hub: the
# logger's HistoryBuffer objects and the numpy arrays inside them. Loaded as data, each of these
# names is given a stand-in that builds nothing (no code of the file's choosing runs); the weights
# and meta are untouched.
class Ignored:
    """Stands in for an object of mmengine's logger state (a class or a function of its pickle), which
    loading weights does not need: called or built, it keeps nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


LOGGER_STATE = ('mmengine.logging.history_buffer.HistoryBuffer', 'numpy.ndarray', 'numpy.dtype',
                'numpy._core.multiarray._reconstruct', 'numpy.core.multiarray._reconstruct',
                'numpy._core.multiarray.scalar', 'numpy.core.multiarray.scalar', 'builtins.getattr')


def training_state_stand_ins(path):
    """What it takes to load a checkpoint that torch's weights-only loading refuses.
    returns: (stand-ins [(callable, name)] for the logger state of an mmengine training checkpoint,
              the names of the other Python objects the file holds: none for such a checkpoint)"""
    names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    if LOGGER_STATE[0] not in names:
        return [], names
    return [(Ignored, name) for name in names if name in LOGGER_STATE], [n for n in names if n not in LOGGER_STATE]
