"""The official implementations of MAE, SimMIM and HiViT, imported from clones the user made, for
benchmark.py's step-against-step comparisons (`--official DIR ...`). Nothing of them is in this
repository: clone facebookresearch/mae, microsoft/SimMIM and zhangxiaosong18/hivit anywhere and
give their folders.

An official model is built with the architecture of this project's model of the same name: the
keywords this project's factory passed to its constructor (`recording_constructors`), which are
the official ones for MAE and HiViT (their contract) and timm's, of the same names, for SimMIM's
encoders. MAE and HiViT then load this project's weights (their keys are the official ones), so
both compute from the same numbers; SimMIM's official model keeps its own initialisation.

The official code was written for older libraries. Stand-ins let it run unchanged on the ones
of this project, only while it is imported and built: numpy's `np.float` (removed in numpy 1.24)
and the `qk_scale` keyword of timm's ViT block (gone from current timm; the official MAE passes
None, its default). Its folders are made packages without running any `__init__`: HiViT's
`models/__init__` imports a file that repository lacks, and MAE's util/ has none, so that Python
would take this project's util package instead.
"""
import contextlib
import importlib
import inspect
import math
import os
import sys
import types
import warnings
from functools import partial

import numpy as np
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn as nn

from util.errors import UsageError

# What identifies each clone: a file only it has, and the repository to clone.
REPOSITORIES = {
    'MAE': ('engine_pretrain.py', 'https://github.com/facebookresearch/mae'),
    'SimMIM': (os.path.join('models', 'simmim.py'), 'https://github.com/microsoft/SimMIM'),
    'HiViT': (os.path.join('self_supervised', 'models', 'models_hivit_mae.py'),
              'https://github.com/zhangxiaosong18/hivit'),
}


def find_clones(folders):
    """The clone of each official repository among `folders` (--official).
    returns: {'MAE' | 'SimMIM' | 'HiViT': folder}"""
    clones = {}
    for folder in folders:
        if not os.path.isdir(folder):
            raise UsageError(f'--official {folder} does not exist: give the folder git clone made')
        found = [name for name, (marker, _) in REPOSITORIES.items() if os.path.isfile(os.path.join(folder, marker))]
        if not found:
            raise UsageError(f'--official {folder}: not a clone of one of ' + ', '.join(
                url for _, url in REPOSITORIES.values()) + ': give the folder git clone made')
        clones[found[0]] = folder
    return clones


@contextlib.contextmanager
def recording_constructors():
    """Within it, the keywords that the first construction of each pre-training model class (and
    of SimMIM's encoders) receives are recorded: {class name: keywords}."""
    import models_hivit
    import models_mae
    import models_simmim
    classes = (models_mae.MaskedAutoencoderViT, models_hivit.HiViTMaskedAutoencoder, models_simmim.SwinEncoder,
               models_simmim.BeitEncoder)
    recorded = {}
    originals = {cls: cls.__dict__['__init__'] for cls in classes}

    def recording(cls, init):
        def record(self, *args, **kwargs):
            recorded.setdefault(cls.__name__, kwargs)
            init(self, *args, **kwargs)
        return record
    for cls, init in originals.items():
        cls.__init__ = recording(cls, init)
    try:
        yield recorded
    finally:
        for cls, init in originals.items():
            cls.__init__ = init


class BlockTakingQkScale(timm_vit.Block):
    """timm's ViT block, taking (and dropping) the qk_scale=None the official MAE passes."""

    def __init__(self, *args, qk_scale=None, **kwargs):
        if qk_scale is not None:
            raise UsageError('the official model asks for a qk_scale, which timm\'s block no longer has')
        super().__init__(*args, **kwargs)


@contextlib.contextmanager
def official_imports(folder, packages=()):
    """Import from `folder` as its own scripts do: its top-level names (util, models_mae, models)
    are its files, not this project's, and ours come back afterwards. `packages`, and the folders
    without an __init__.py (which Python would otherwise let this project's util package win
    over), are made as bare packages, without running any __init__. The legacy stand-ins hold
    while inside."""
    shadowed = {name[:-3] if name.endswith('.py') else name for name in os.listdir(folder)}
    ours = {name: module for name, module in sys.modules.items() if name.split('.')[0] in shadowed}
    for name in ours:
        del sys.modules[name]
    bare = set(packages) | {name for name in shadowed if os.path.isdir(os.path.join(folder, name))
                            and not os.path.exists(os.path.join(folder, name, '__init__.py'))}
    for package in bare:
        module = types.ModuleType(package)
        module.__path__ = [os.path.join(folder, package)]
        sys.modules[package] = module
    sys.path.insert(0, folder)
    had_float = hasattr(np, 'float')
    block = timm_vit.Block
    np.float, timm_vit.Block = float, BlockTakingQkScale  # np.float is float; the block drops qk_scale
    try:
        with warnings.catch_warnings():  # what current libraries say of old code (meshgrid's indexing, ...)
            warnings.simplefilter('ignore')
            yield
    finally:
        sys.path.remove(folder)
        for name in [name for name in sys.modules if name.split('.')[0] in shadowed]:
            del sys.modules[name]
        sys.modules.update(ours)
        timm_vit.Block = block
        if not had_float:
            del np.float


def keywords_for(cls, keywords, **defaults):
    """`defaults` updated by those of `keywords` that `cls`'s constructor, or one of its bases'
    (SimMIM's encoders pass **kwargs on), names."""
    names = {name for base in cls.__mro__ if '__init__' in base.__dict__ and base not in (nn.Module, object)
             for name in inspect.signature(base.__init__).parameters}
    return {**defaults, **{k: v for k, v in keywords.items() if k in names}}


def build_official_mae(folder, recorded, model):
    with official_imports(folder):
        official = importlib.import_module('models_mae')
        return official.MaskedAutoencoderViT(**recorded['MaskedAutoencoderViT'])


def build_official_hivit(folder, recorded, model):
    with official_imports(os.path.join(folder, 'self_supervised'), packages=('models',)):
        official = importlib.import_module('models.models_hivit_mae')
        keywords = dict(recorded['HiViTMaskedAutoencoder'])
        keywords.pop('norm_pix_loss', None)  # the official one always normalises the target
        return official.HiViTMaskedAutoencoder(**keywords)


def build_official_simmim(folder, recorded, model):
    """The official SimMIM with the encoder and decoder stride this project's model has, the rest
    as the official configurations set it (Swin: no absolute position embedding; ViT: BEiT's layer
    scale 0.1 and one shared relative position bias)."""
    with official_imports(folder, packages=('models',)):
        official = importlib.import_module('models.simmim')
        if 'SwinEncoder' in recorded:
            cls = official.SwinTransformerForSimMIM
            encoder = cls(**keywords_for(cls, recorded['SwinEncoder'], num_classes=0, qkv_bias=True, ape=False,
                                         patch_norm=True, drop_path_rate=0.0))
            return official.SimMIM(encoder=encoder, encoder_stride=model.encoder.stride)
        cls = official.VisionTransformerForSimMIM
        encoder = cls(**keywords_for(cls, recorded['BeitEncoder'], num_classes=0, qkv_bias=True, init_values=0.1,
                                     norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos_emb=False,
                                     use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_mean_pooling=False,
                                     drop_path_rate=0.1))
        return official.SimMIM(encoder=encoder, encoder_stride=model.encoder.stride)


def mae_loss(model, batch, mask_ratio):
    """The official MAE and MAE-HiViT take the ratio and draw their own noise."""
    images, _ = batch
    return model(images, mask_ratio=mask_ratio)[0]


def simmim_loss(model, batch):
    """The official SimMIM takes the mask (N, H/p, W/p) and returns the loss alone."""
    images, masks = batch
    return model(images, masks['mask'])


# This project's model class -> (repository, builder, its loss function, same weights)
BUILDERS = {
    'MaskedAutoencoderViT': ('MAE', build_official_mae, mae_loss, True),
    'HiViTMaskedAutoencoder': ('HiViT', build_official_hivit, mae_loss, True),
    'SwinEncoder': ('SimMIM', build_official_simmim, simmim_loss, False),
    'BeitEncoder': ('SimMIM', build_official_simmim, simmim_loss, False),
}


def official_counterpart(model, recorded, clones, recipe):
    """The official model of the architecture of `model` (whose construction `recorded` holds);
    `recipe`: main_pretrain's flags for it (the mask ratio), None for a classifier.
    returns: (official model, its loss_fn(model, batch), 'same weights' or 'its own weights'),
             or a str saying why there is none"""
    kinds = [kind for kind in recorded if kind in BUILDERS]
    if not kinds:
        return f'none for {type(model).__name__}: the official code compared is MAE\'s, SimMIM\'s and HiViT\'s ' \
               f'pre-training (MaskFeat\'s is mmpretrain\'s, the classifiers are timm\'s)'
    repository, build, loss_fn, same_weights = BUILDERS[kinds[0]]
    if repository not in clones:
        return f'no clone of {REPOSITORIES[repository][1]} among --official'
    official = build(clones[repository], recorded, model)
    if same_weights:
        official.load_state_dict(model.state_dict())  # strict: the architectures are the same
    loss_fn = partial(mae_loss, mask_ratio=recipe.mask_ratio) if loss_fn is mae_loss else loss_fn
    return official, loss_fn, 'same weights' if same_weights else 'its own initial weights'


def official_training_step(model, loss_fn, batch, optimizer, scaler, device, precision, clip_grad=None):
    """One step as the official loops run it (MAE's engine_pretrain.py, which HiViT's repository
    keeps; SimMIM's main_simmim.py does the same with apex): autocast, the loss read on the host
    and checked each step, backward through a gradient scaler (the official loops scale at any
    precision), unscale, the gradient norm (clipped to `clip_grad` where the recipe clips), the
    optimizer step, zero_grad, and a device synchronize at the end of every step."""
    with device.autocast(precision):
        loss = loss_fn(model, batch)
    value = loss.item()  # a host sync every step, as the official loops read the loss
    if not math.isfinite(value):
        raise RuntimeError(f'the official model\'s loss is {value}')
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    parameters = [p for p in model.parameters() if p.grad is not None]
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    else:  # the official loops measure the norm every step even where nothing clips: its cost is theirs
        torch.nn.utils.get_total_norm([p.grad for p in parameters])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    device.synchronize()
