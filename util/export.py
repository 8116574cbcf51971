"""A checkpoint's weights as a timm safetensors file, and the timm.create_model call that loads it.

A pre-training checkpoint gives its encoder: each model file registers, for its pre-training
class, what that encoder is in timm (`register_timm_encoder`): a timm model name, the keywords
that give it the encoder's architecture, and the encoder's weights in a layout that the model's
pretrained filter accepts, in every timm release the project supports. A fine-tuning checkpoint
gives its classifier as it is: its own name, its number of classes, its image size.

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=0), **kwargs)
"""
import math
import os
from dataclasses import dataclass, field

import torch

from util.checkpoint import (PRETRAIN_ONLY_PREFIXES, WeightsDoNotFit, check_recorded_input_size, ema_weights,
                             in_model_layout, input_size_advice, load, load_weights, model_state_of, saved_args,
                             written_by_advice)
from util.errors import UsageError, first_line
from util.output_dir import current_umask
from util.registry import (MODEL_FILES, _unknown, create_classifier_and_keywords, create_pretrain_model,
                           import_model_files, native_input_size, pretrain_model_names, pretraining_of)

_TIMM_ENCODERS = {}


def register_timm_encoder(model_class):
    """Decorator: fn(model) -> (timm name, create_model keywords, state dict) gives the encoder of a
    pre-training `model_class` as a timm model without a classifier."""
    def register(fn):
        _TIMM_ENCODERS[model_class] = fn
        return fn
    return register


def timm_model_like(family, arch):
    """The model of `family` ({timm name: its architecture keywords}) that `arch` differs from in
    the fewest keywords, and those keywords. returns: (name, keywords)"""
    name = min(family, key=lambda n: sum(family[n].get(k) != v for k, v in arch.items()))
    return name, {k: v for k, v in arch.items() if family[name].get(k) != v}


@dataclass
class TimmCall:
    """The timm.create_model call that loads an exported file."""
    name: str
    kwargs: dict
    overlay: dict = field(default_factory=dict)

    @property
    def module(self):
        """The model file of this repository that registers `name` with timm, or None for timm's own."""
        from timm.models import is_model_in_modules
        import_model_files()
        return next((m for m in MODEL_FILES if is_model_in_modules(self.name, [m])), None)

    def create(self, file):
        """Build the model as the call does, from `file` instead of the overlay's (the file is
        checked under its temporary name before it is renamed into place)."""
        import timm
        import_model_files()
        overlay = {**self.overlay, 'file': file}
        return timm.create_model(self.name, pretrained=True, pretrained_cfg_overlay=overlay, **self.kwargs)

    def __str__(self):
        overlay = ', '.join(f'{k}={v!r}' for k, v in self.overlay.items())
        kwargs = ''.join(f', {k}={v!r}' for k, v in self.kwargs.items())
        lines = ['import timm']
        if self.module:
            lines.append(f'import {self.module}  # registers {self.name} with timm (this repository)')
        lines.append(f'model = timm.create_model({self.name!r}, pretrained=True, '
                     f'pretrained_cfg_overlay=dict({overlay}){kwargs})')
        return '\n'.join(lines)


def overlay_for(name, file, num_classes):
    """The pretrained_cfg_overlay of the call: the file and the classes, and custom_load=False where
    timm's default weights of the name are JAX .npz files read by custom code (vit_tiny_patch16_224,
    ...): timm 1.0.12 keeps that flag when a file is given, and would read the file as .npz."""
    import timm
    overlay = dict(file=file, num_classes=num_classes)
    cfg = timm.get_pretrained_cfg(name)
    if cfg is not None and cfg.custom_load:
        overlay['custom_load'] = False
    return overlay


def pretrained_encoder(ckpt, path, name, input_size=None):
    """The encoder of a pre-training checkpoint of model `name` (its image size `input_size`, else
    the checkpoint's args'; its norm_pix_loss the args'). returns: ((timm name, keywords, classes),
    state dict, description)"""
    args = saved_args(ckpt)
    if args.get('model') not in (None, name):  # another model's run: its flags may not even build this one
        args = {}
    input_size = check_recorded_input_size(args, input_size, path, 'export.py writes')
    arch = {'img_size': input_size} if input_size else {}
    if args.get('norm_pix_loss') is not None:
        arch['norm_pix_loss'] = args['norm_pix_loss']
    model = create_pretrain_model(name, **arch)
    state = in_model_layout(model, dict(model_state_of(ckpt, path)), path)  # official layouts (SimMIM, HiViT)
    # an encoder-only release has no decoder; a run at another image size may not have recorded it
    load_weights(model, state, path, optional=PRETRAIN_ONLY_PREFIXES, advice=input_size_advice(model, state))
    timm_name, kwargs, weights = timm_encoder_of(model)
    return (timm_name, kwargs, 0), weights, f'the encoder of {name}'


def timm_encoder_of(model):
    """The encoder of a pre-training model as a timm model, by the function its model file
    registered. returns: (timm name, create_model keywords, state dict)"""
    export = next((_TIMM_ENCODERS[c] for c in type(model).__mro__ if c in _TIMM_ENCODERS), None)
    if export is None:
        raise UsageError(f'{type(model).__name__} has no timm form registered for its encoder')
    return export(model)


def fold_probe_head(state, head):
    """A linear probe's head (main_finetune --linprobe: BatchNorm1d without affine, then the linear
    layer) folded into one linear layer: the same logits in evaluation."""
    if f'{head}.0.running_mean' not in state:
        return state
    state = dict(state)
    mean, var = state.pop(f'{head}.0.running_mean'), state.pop(f'{head}.0.running_var')
    state.pop(f'{head}.0.num_batches_tracked', None)
    weight, bias = state.pop(f'{head}.1.weight'), state.pop(f'{head}.1.bias')
    scale = (var + 1e-6).rsqrt()  # main_finetune.add_probe_head's eps
    state[f'{head}.weight'], state[f'{head}.bias'] = weight * scale, bias - weight @ (mean * scale)
    return state


def finetuned_classifier(ckpt, path, name, input_size=None):
    """The classifier of a fine-tuning checkpoint, as timm model `name` with the checkpoint's
    classes and pooling, and its image size (`input_size`, else the checkpoint's args').
    returns: ((timm name, keywords, classes), state dict, description)"""
    import timm
    args = saved_args(ckpt)
    cfg = timm.get_pretrained_cfg(name)
    head = cfg.classifier if cfg is not None and isinstance(cfg.classifier, str) else 'head'
    state = fold_probe_head(dict(model_state_of(ckpt, path)), head)
    if f'{head}.weight' not in state:
        raise UsageError(f'{path!r} holds no classifier {head!r} of {name}: pass the --model that wrote it '
                         f'(a pre-training model or the timm classifier it fine-tunes)')
    kwargs = {}
    input_size = check_recorded_input_size(args, input_size, path, 'export.py writes')
    if input_size and input_size != native_input_size(name):
        kwargs['img_size'] = input_size
    if args.get('global_pool') is False:  # main_finetune's --cls_token / --linprobe
        kwargs['global_pool'] = 'token'
    num_classes = state[f'{head}.weight'].shape[0]
    model, kwargs = create_classifier_and_keywords(name, num_classes=num_classes, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != 'num_classes'}  # the call's own argument
    state = in_model_layout(model, state, path)
    load_weights(model, state, path, advice=input_size_advice(model, state))
    return (name, kwargs, num_classes), model.state_dict(), f'the {num_classes}-class classifier'


def save_safetensors(state, path, check):
    """Write `state` with safetensors to a temporary file beside `path`, call check(temporary
    path), then rename it over `path`: a failed write or check leaves no file behind."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    tmp = f'{path[:-len(".safetensors")]}.tmp-{os.getpid()}.safetensors'  # timm reads files by their suffix
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(tmp, 'wb').close()  # an unwritable folder as the OSError's own words, not the Rust writer's
        # contiguous tensors that share no memory, as safetensors requires
        save_file({k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}, tmp)
        check(tmp)
        # safetensors 0.8 makes its files readable by their owner alone, whatever the umask
        # (safetensors/safetensors#782): weights meant to be shared get the mode of any new file
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise UsageError(f'cannot write {path} ({getattr(e, "strerror", None) or first_line(e)}): choose another '
                         f'--output') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_checkpoint(path, output, model=None, ema=False, input_size=None):
    """Export checkpoint `path` to the safetensors file `output`: the encoder of a pre-training
    checkpoint (`model`, else the model its args or its layout name), or the classifier of a
    fine-tuning one (`model`, else its args' model; its EMA weights with `ema`), for images of
    `input_size` px (else its args' size, else the model's). The file is checked by loading it
    with the call before it is renamed into place.
    returns: (TimmCall, description, number of parameters)"""
    import timm
    import_model_files()
    if not output.endswith('.safetensors'):
        raise UsageError(f'--output {output!r} must end in .safetensors (timm reads the format by the suffix)')
    if os.path.basename(output) == '.safetensors':  # a hidden file of no name, likely a folder meant
        raise UsageError(f'--output {output!r} has no name before .safetensors: give a file name, e.g. '
                         f'{os.path.join(os.path.dirname(output), "encoder.safetensors")}')
    ckpt = load(path)
    if ema:  # the run's average in place of its weights: the same classifier
        ckpt = {**ckpt, 'model': ema_weights(ckpt, path)}
    recorded = pretraining_of(ckpt)[0] or saved_args(ckpt).get('model')
    name = model or recorded
    if not name:
        raise UsageError(f'{path!r} does not say which model wrote it: pass --model, a pre-training model '
                         f'(mae_vit_base, simmim_swin_base, ...) or the timm classifier it fine-tunes')
    pretraining = name in pretrain_model_names()
    if not pretraining and not timm.is_model(name):
        raise _unknown('model', name, pretrain_model_names() + timm.list_models())
    export = pretrained_encoder if pretraining else finetuned_classifier
    try:
        (timm_name, kwargs, num_classes), state, description = export(ckpt, path, name, input_size)
    except WeightsDoNotFit as e:  # --model of another size than the run's, say
        raise WeightsDoNotFit(f'{e}{written_by_advice(model, recorded)}') from None
    # the printed call loads the file from any working directory
    call = TimmCall(timm_name, kwargs, overlay_for(timm_name, os.path.abspath(output), num_classes))

    def check(file):
        try:
            call.create(file=file)
        except (RuntimeError, KeyError, ValueError, TypeError, AssertionError) as e:
            raise UsageError(f'the weights of {path!r} do not load into {call.name} {call.kwargs}: '
                             f'{first_line(e)}') from None
    save_safetensors(state, output, check)
    return call, description, sum(math.prod(v.shape) for v in state.values())
