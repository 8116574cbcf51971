"""Optimizer construction: parameter groups without weight decay where decay does harm, and
AdamW in its fastest available form."""
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay


def no_weight_decay_names(model):
    """Names the model asks to exempt from decay (tokens, position tables)."""
    return set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()


# Model classes whose layer ids for layer-wise lr decay are a published recipe's, not timm's
# group_matcher's: {class: function(model) -> (function(parameter name) -> layer id)}.
_LAYER_ID_RULES = {}


def register_layer_ids(model_class):
    """Decorator: the layer ids of `model_class` (and its subclasses) come from this function."""
    def register(rule):
        _LAYER_ID_RULES[model_class] = rule
        return rule
    return register


class _WithLayerIds:
    """The model as timm's param_groups_layer_decay sees it, its group_matcher giving the
    registered layer ids."""

    def __init__(self, model, layer_id):
        self.named_parameters = model.named_parameters
        self.group_matcher = lambda coarse=False: layer_id


def param_groups(model, weight_decay, layer_decay=None):
    """Decay for weight matrices; none for 1-D parameters (norms), biases and the names in
    model.no_weight_decay(). Frozen parameters are left out.

    layer_decay: fine-tuning's layer-wise lr decay: a parameter of layer i (0 = embeddings,
    1..depth = blocks, depth + 1 = the head) gets lr_scale = layer_decay ** (depth + 1 - i).
    timm finds the layers from the model's group_matcher (ViT, BEiT, HiViT, ...), or from a rule
    registered for its class (Swin: SimMIM's ids, in models_simmim.py).
    """
    no_decay = no_weight_decay_names(model)
    if layer_decay is None:
        return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    from util.registry import import_model_files  # the model files register their rules
    import_model_files()
    rule = next((rule for cls, rule in _LAYER_ID_RULES.items() if isinstance(model, cls)), None)
    grouped = _WithLayerIds(model, rule(model)) if rule else model
    return param_groups_layer_decay(grouped, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)


def build_adamw(groups, lr, betas, device):
    """AdamW, fused into one kernel where the device has one (CUDA, CPU), else torch's default
    (multi-tensor where the device supports it)."""
    fused = True if device.supports_fused_adamw() else None
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def build_lars(model, lr, weight_decay):
    """LARS for linear probing (MAE's protocol): SGD with momentum 0.9 whose weight matrices get
    the layer-wise trust ratio 0.001 * |w| / |g| (and the weight decay); biases and other 1-D
    parameters take plain momentum steps. timm's Lars does the arithmetic. With a weight decay
    (MAE's recipe has none) its ratio is 0.001 * |w| / (|g| + wd * |w|), where MAE's code takes
    0.001 * |w| / |g + wd * w|: the same at wd 0, a little smaller steps above it."""
    from timm.optim import Lars
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{'params': [p for p in trainable if p.ndim > 1], 'weight_decay': weight_decay, 'always_adapt': True},
              {'params': [p for p in trainable if p.ndim <= 1], 'weight_decay': 0.0, 'always_adapt': False}]
    return Lars([g for g in groups if g['params']], lr=lr, momentum=0.9, trust_coeff=0.001)
