"""The one place that knows the model files and finds a model by name.

Pre-training models: each model file decorates its factories with `register_pretrain_model`;
`create_pretrain_model` imports the model files (so the decorators run) and builds a model by
its official name or an alias. Classifiers are timm models: the model files register theirs
with timm, and `create_classifier` builds any timm model by name. An unknown name is a
`UsageError` that lists the closest known names.
"""
import difflib
import importlib

from util.errors import UsageError, first_line

# The flat model files at the top of the repository; a new method adds its file here.
MODEL_FILES = ('models_mae', 'models_vit')

_PRETRAIN_MODELS = {}


def register_pretrain_model(*aliases):
    """Register a factory under its own name and under each alias."""
    def register(factory):
        for name in (factory.__name__, *aliases):
            if name in _PRETRAIN_MODELS and _PRETRAIN_MODELS[name] is not factory:
                raise ValueError(f'model name {name!r} is registered twice')
            _PRETRAIN_MODELS[name] = factory
        return factory
    return register


def pretrain_model_names():
    for module in MODEL_FILES:
        importlib.import_module(module)
    return sorted(_PRETRAIN_MODELS)


def _unknown(kind, name, names):
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    hint = f'closest: {", ".join(close)}' if close else f'known: {", ".join(names[:20])}, ...'
    return UsageError(f'unknown {kind} {name!r} ({hint})')


def create_classifier(name, img_size=None, **kwargs):
    """Build a classification model by its timm name (this project's registered ones included),
    e.g. create_classifier('vit_base_patch16', img_size=224, num_classes=1000, drop_path_rate=0.1).

    img_size goes to the models whose shape depends on it (vision transformers: the position
    table); a model that takes no img_size (a convolutional network) is built without it.
    """
    import timm
    for module in MODEL_FILES:
        importlib.import_module(module)
    if not timm.is_model(name):
        raise _unknown('model', name, timm.list_models())
    sized = {**kwargs, 'img_size': img_size} if img_size is not None else kwargs
    try:
        try:
            return timm.create_model(name, **sized)
        except TypeError as e:
            if 'img_size' not in str(e) or sized is kwargs:
                raise
            return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise UsageError(f'cannot build {name} with {sized}: {first_line(e)}') from None


def create_pretrain_model(name, **kwargs):
    """Build a pre-training model (forward returns (loss, pred, mask)) by name."""
    names = pretrain_model_names()
    if name not in _PRETRAIN_MODELS:
        raise _unknown('pre-training model', name, names)
    try:
        return _PRETRAIN_MODELS[name](**kwargs)
    except (TypeError, ValueError) as e:  # e.g. an image size the patch size does not divide
        raise UsageError(f'cannot build {name} with {kwargs}: {e}') from None
