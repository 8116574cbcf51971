"""The one place that knows the model files and finds a model by name.

Pre-training models: each model file decorates its factories with `register_pretrain_model`,
which also records the published recipes of the model (the defaults of the entry points and of
the ModelZoo scripts); `create_pretrain_model` imports the model files (so the decorators run)
and builds a model by its official name or an alias. Classifiers are timm models: the model files register theirs
with timm (their pretrained cfgs made by `file_only_cfg`), and `create_classifier` builds any timm
model by name. An unknown name is a `UsageError` that lists the closest known names.
"""
import difflib
import importlib

from util.errors import UsageError, first_line

# The flat model files at the top of the repository; a new method adds its file here.
MODEL_FILES = {'models_mae': 'MAE', 'models_vit': 'ViT', 'models_simmim': 'SimMIM', 'models_maskfeat': 'MaskFeat',
               'models_hivit': 'HiViT'}  # file: the method, for --help

_PRETRAIN_MODELS = {}
_RECIPES = {}
_SUPERVISED_RECIPES = {}
_CHECKPOINT_IDENTIFIERS = []


def register_pretrain_model(*aliases, recipes=()):
    """Register a factory under its own name and under each alias, with its published recipes:
    dicts of flag defaults, the first one the default, each with its 'epochs' (a model published
    with a 100- and an 800-epoch schedule has two); a recipe's 'finetune' entry holds the
    defaults of fine-tuning from the model's checkpoints."""
    def register(factory):
        for name in (factory.__name__, *aliases):
            if name in _PRETRAIN_MODELS and _PRETRAIN_MODELS[name] is not factory:
                raise ValueError(f'model name {name!r} is registered twice')
            _PRETRAIN_MODELS[name] = factory
            _RECIPES[name] = tuple(recipes)
        return factory
    return register


def pretrain_recipe(name, epochs=None):
    """The published recipe of a pre-training model: the one of `epochs` epochs when there is
    one, else the default one (a copy; {} for a model without a recipe or an unknown name)."""
    import_model_files()
    if name not in _RECIPES:
        raise _unknown_pretrain_model(name)
    recipes = _RECIPES[name]
    chosen = next((r for r in recipes if r.get('epochs') == epochs), recipes[0] if recipes else {})
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in chosen.items()}


def supervised_recipe(recipe):
    """Decorator for a timm classifier factory of a model file: its published recipe of supervised
    training from scratch (flag defaults of main_finetune.py without --finetune, with the
    per-device 'batch_size' and the 'effective_batch' of the ModelZoo scripts)."""
    def register(factory):
        _SUPERVISED_RECIPES[factory.__name__] = dict(recipe)
        return factory
    return register


def supervised_recipe_of(name):
    """The published from-scratch recipe of a classifier (a copy; {} when none is published)."""
    import_model_files()
    return dict(_SUPERVISED_RECIPES.get(name, {}))


def file_only_cfg(img_size=224, classifier='head'):
    """The timm pretrained cfg of a classifier of a model file. There are no weights to download:
    `pretrained=True` needs a file (pretrained_cfg_overlay=dict(file=...)). The input size is the
    image size the classifier is built for (main_finetune.py's default --input_size)."""
    return dict(num_classes=1000, input_size=(3, img_size, img_size), first_conv='patch_embed.proj',
                classifier=classifier)


def register_checkpoint_identifier(identify):
    """Decorator: identify(checkpoint) -> (pre-training model name, epochs) or None, for the
    checkpoints of official code that do not record this project's `args`."""
    _CHECKPOINT_IDENTIFIERS.append(identify)
    return identify


def pretraining_of(ckpt):
    """(model name, epochs) of the pre-training that wrote a loaded checkpoint: its `args` (this
    project's, the official MAE's), else what a model file recognises; (None, None) if unknown."""
    from util.checkpoint import saved_args  # util.checkpoint imports torch: only when a checkpoint is read
    pretrain_model_names()
    args = saved_args(ckpt)
    if args.get('model') in _RECIPES:
        return args['model'], args.get('epochs')
    from util import mmpretrain
    for identify in (*_CHECKPOINT_IDENTIFIERS, mmpretrain.pretraining_of):
        found = identify(ckpt)
        if found:
            return found
    return None, None


def finetune_recipe_of(ckpt):
    """The published fine-tuning recipe that goes with the pre-training of a loaded checkpoint.
    returns: (pre-training model name or None, recipe dict, {} when none is published)"""
    name, epochs = pretraining_of(ckpt)
    return name, (pretrain_recipe(name, epochs).get('finetune', {}) if name else {})


def import_model_files():
    """Import the model files, so that what they register (models, recipes, layer ids, loading
    filters) is known."""
    for module in MODEL_FILES:
        importlib.import_module(module)


def pretrain_model_names():
    import_model_files()
    return sorted(_PRETRAIN_MODELS)


def same_model(name, other):
    """Whether two --model names build the same model: equal, or a pre-training model's official
    name and its alias (mae_vit_tiny_patch8 and mae_vit_tiny)."""
    import_model_files()
    return name == other or (name in _PRETRAIN_MODELS and _PRETRAIN_MODELS.get(name) is _PRETRAIN_MODELS.get(other))


def model_names_by_method(pretraining=True):
    """For --help: the registered pre-training models (or this project's timm classifiers), one
    'Method: name, name, ...' line a model file, in MODEL_FILES' order."""
    import_model_files()
    if pretraining:
        by_file = {m: [n for n, f in _PRETRAIN_MODELS.items() if f.__module__ == m] for m in MODEL_FILES}
    else:
        import timm
        by_file = {m: timm.list_models(module=m) for m in MODEL_FILES}
    return '; '.join(f'{MODEL_FILES[m]}: {", ".join(names)}' for m, names in by_file.items() if names)


def _unknown_pretrain_model(name):
    import timm
    names = pretrain_model_names()
    if timm.is_model(name):  # a classifier given to main_pretrain.py
        return UsageError(f'{name} is a classifier, for main_finetune.py ({_hint(name, names, " pre-training models")})')
    return _unknown('pre-training model', name, names)


def _unknown(kind, name, names):
    return UsageError(f'unknown {kind} {name!r} ({_hint(name, names)})')


def _hint(name, names, kind=''):
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    if close:
        return f'closest{kind}: {", ".join(close)}'
    if len(names) <= 40:
        return f'known{kind}: {", ".join(names)}'
    # timm's thousand names: the first twenty in the alphabet would say nothing useful
    return f'none of the {len(names)} known is close; timm.list_models(\'*vit*\') lists those with vit in the name'


def native_input_size(name):
    """The image size a timm classifier is built for (its pretrained cfg; 224 when it has none)."""
    import timm
    import_model_files()  # this project's classifiers register their sizes there
    cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    return cfg.input_size[-1] if cfg is not None and cfg.input_size else 224


def create_classifier(name, img_size=None, **kwargs):
    """Build a classification model by its timm name (this project's registered ones included),
    e.g. create_classifier('vit_base_patch16', img_size=224, num_classes=1000, drop_path_rate=0.1).

    img_size goes to the models whose shape depends on it (vision transformers: the position
    table); a model that takes no img_size (a convolutional network) is built without it.
    """
    return create_classifier_and_keywords(name, img_size, **kwargs)[0]


def create_classifier_and_keywords(name, img_size=None, **kwargs):
    """create_classifier, and the keywords timm built it with (img_size only where the model took
    it): the call that rebuilds it. returns: (model, keywords)"""
    import timm
    import torch
    import_model_files()
    if name in _PRETRAIN_MODELS:
        classifier = pretrain_recipe(name).get('finetune', {}).get('model')
        raise UsageError(f'{name} is a pre-training model, for main_pretrain.py: its checkpoints fine-tune as '
                         f'--model {classifier} --finetune <checkpoint>')
    if not timm.is_model(name):
        raise _unknown('model', name, timm.list_models())
    sized = {**kwargs, 'img_size': img_size} if img_size is not None else kwargs
    try:
        try:
            model, used = timm.create_model(name, **sized), sized
        except TypeError as e:
            if 'img_size' not in str(e) or sized is kwargs:
                raise
            model, used = timm.create_model(name, **kwargs), kwargs
    except (TypeError, ValueError, AssertionError) as e:
        raise UsageError(f'cannot build {name} with {sized}: {first_line(e)}') from None
    grid = getattr(getattr(model, 'patch_embed', None), 'grid_size', None)
    if grid is not None and min(grid) < 1:  # timm builds it, and its first convolution fails on any image
        raise UsageError(f'cannot build {name} at {img_size} px: the image is smaller than one patch '
                         f'({model.patch_embed.patch_size[0]} px)')
    proj = getattr(getattr(model, 'patch_embed', None), 'proj', None)
    if 'img_size' in used and isinstance(proj, torch.nn.Conv2d) and img_size != native_input_size(name):
        (kernel, _), (stride, _) = proj.kernel_size, proj.stride
        if (img_size - kernel) % stride:  # the last pixels would be cut silently (published sizes may: SigLIP's 384)
            below = img_size - (img_size - kernel) % stride
            raise UsageError(f'cannot build {name} at {img_size} px: its patches of {kernel} px every {stride} px '
                             f'leave the last pixels out; give an --input_size that fits, e.g. {below} or '
                             f'{below + stride}')
    return model, used


def create_pretrain_model(name, **kwargs):
    """Build a pre-training model (forward returns (loss, pred, mask)) by name."""
    import_model_files()
    if name not in _PRETRAIN_MODELS:
        raise _unknown_pretrain_model(name)
    try:
        return _PRETRAIN_MODELS[name](**kwargs)
    except (TypeError, ValueError) as e:  # e.g. an image size the patch size does not divide
        raise UsageError(f'cannot build {name} with {kwargs}: {e}') from None
