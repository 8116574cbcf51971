"""Optimizer construction: parameter groups without weight decay where decay does harm, and
AdamW in its fastest available form."""
import torch
from timm.optim import param_groups_weight_decay


def no_weight_decay_names(model):
    """Names the model asks to exempt from decay (tokens, position tables)."""
    return set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()


def param_groups(model, weight_decay):
    """Two groups: decay for weight matrices; none for 1-D parameters (norms), biases and the
    names in model.no_weight_decay(). Frozen parameters are left out."""
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))


def build_adamw(groups, lr, betas, device):
    """AdamW, fused into one kernel where the device has one (CUDA, CPU), else torch's default
    (multi-tensor where the device supports it)."""
    fused = True if device.supports_fused_adamw() else None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
