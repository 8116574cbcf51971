"""Classification: fine-tuning a pre-trained encoder, linear probing, evaluation, and
supervised training from scratch.

    # fine-tune the released MAE ViT-B encoder (published recipe: 100 epochs, batch 1024)
    torchrun --nproc_per_node 8 main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \\
        --data_path /imagenet --batch_size 32 --accum_iter 4
    # linear probing (frozen encoder, BatchNorm + linear head on the cls token, LARS)
    torchrun --nproc_per_node 8 main_finetune.py --linprobe --model vit_base_patch16 \\
        --finetune mae_pretrain_vit_base.pth --data_path /imagenet --batch_size 512 --accum_iter 4
    # evaluate a fine-tuned checkpoint
    python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --data_path /imagenet
    # what the frozen features are worth: k-NN and a linear probe trained to convergence (minutes, no schedule)
    torchrun --nproc_per_node 8 main_finetune.py --knn --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth \
        --data_path /imagenet
    # supervised from scratch (no --finetune): the DeiT recipe, any timm model
    torchrun --nproc_per_node 8 main_finetune.py --model vit_base_patch16 --data_path /imagenet

The defaults are the published recipe of the mode (RECIPES below): MAE's fine-tuning recipe
with --finetune, or the one published with the checkpoint's pre-training when it has one
(SimMIM's, kept in models_simmim.py), MAE's linear-probing recipe with --linprobe, DeiT's
without either. This file parses arguments and wires the parts together; the loop is
util/engine.py.
"""
import argparse
import os
import time
from functools import partial

import torch
import timm
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from util import checkpoint, dist
from util.datasets import (MixupCollate, SeededSamples, build_eval_loader, build_finetune_train_folder,
                           build_image_folder, build_loader, class_differences, eval_transform, number_of_classes,
                           training_classes)
from util.engine import evaluate, train
from util.feature_eval import add_knn_k_argument, feature_loaders, frozen_feature_accuracy, print_results
from util.errors import UsageError, run_command
from util.flops import FlopRate, example_batch
from util.images import BadImages
from util.compiling import compile_and_wrap
from util.flags import (BOUND_FORMS, SCHEDULE_DEFAULTS, add_run_args, add_schedule_args, apply_recipe, merge_recipes,
                        set_learning_rate)
from util.launch import print_outputs, resume_training, start_run
from util.logger import RunLogger, counted, named_briefly, read_json_lines
from util.lr_sched import LAYER_LR_BOUNDS
from util.optim import build_adamw, build_lars, param_groups
from util.registry import (create_classifier, finetune_recipe_of, model_names_by_method, native_input_size,
                           pretrain_model_names, supervised_recipe_of)

AA_DEFAULT = 'rand-m9-mstd0.5-inc1'
# The published recipes; None in a flag's default means "the recipe of the mode decides".
COMMON = dict(model='vit_base_patch16', batch_size=64, opt_betas=(0.9, 0.999), layer_lr_bounds='scaled',
              head_init_bias=0.0)
RECIPES = {
    # MAE fine-tuning, ViT-B/16: 83.6 top-1 (batch 1024; ViT-L/H: layer decay 0.75, drop path 0.2/0.3, 50 epochs)
    'finetune': dict(COMMON, epochs=100, blr=5e-4, weight_decay=0.05, min_lr=1e-6, warmup_epochs=5, layer_decay=0.65,
                     drop_path=0.1, aa=AA_DEFAULT, reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
                     global_pool=True, head_init_std=2e-5),
    # MAE linear probing, ViT-B/16: 68.0 top-1 (batch 16384, LARS)
    'linprobe': dict(COMMON, epochs=90, blr=0.1, weight_decay=0.0, min_lr=0.0, warmup_epochs=10, layer_decay=None,
                     drop_path=0.0, aa=None, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0,
                     global_pool=False, head_init_std=0.01),
    # DeiT, supervised from scratch: 300 epochs, lr 5e-4 per 512 images (batch 1024), a warm-up from 1e-6 and
    # a half-cosine over the whole run to 1e-5 (timm's scheduler in DeiT's code, stepped there once an epoch)
    'scratch': dict(COMMON, epochs=300, blr=2.5e-4, weight_decay=0.05, min_lr=1e-5, warmup_epochs=5, warmup_lr=1e-6,
                    lr_schedule='cosine_whole_run', layer_decay=None,
                    drop_path=0.1, aa=AA_DEFAULT, reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
                    global_pool=True, head_init_std=None),
}
# MAE fine-tunes its larger encoders differently: ViT-L 85.9, ViT-H 86.9 top-1 with these.
FINETUNE_BY_MODEL = {'vit_large_patch16': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
                     'vit_huge_patch14': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3)}
BY_MODE = 'default by mode, fine-tune / --linprobe / from scratch: {}'


def recipe_note(key):
    values = [RECIPES[m].get(key) for m in ('finetune', 'linprobe', 'scratch')]
    if all(v is None for v in values):
        return 'default: the recipe of the mode'
    return BY_MODE.format(' / '.join('off' if v is None else str(v) for v in values))


def get_args_parser():
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        description='Fine-tuning, linear probing, evaluation and supervised training of classifiers. Flags left out '
                    'take the recipe of the mode; with --finetune, the fine-tuning recipe published with the '
                    'checkpoint\'s pre-training where it has one (SimMIM\'s, MaskFeat\'s, MAE-HiViT\'s) wins.')
    add_schedule_args(parser, recipe_note)
    parser.add_argument('--layer_decay', type=layer_decay_value, default=None,
                        help='layer-wise lr decay; ' + recipe_note('layer_decay') + ' (1 or none: off)')
    parser.add_argument('--layer_lr_bounds', default=None, choices=tuple(LAYER_LR_BOUNDS),
                        help='under layer decay, whether the lr the warm-up starts from and the floor (min lr) are '
                             'times each layer\'s scale too: scaled (MAE, MAE-HiViT), shared (SimMIM: both the same '
                             'in every layer, as timm\'s schedulers) or warmup_scaled (MaskFeat: as mmpretrain\'s '
                             'LinearLR and CosineAnnealingLR); default: the recipe\'s, scaled for MAE\'s')

    parser.add_argument('--model', default=None, type=str,
                        help='any timm model name, e.g. vit_base_patch16, swin_base_patch4_window7_224, '
                             'beit_base_patch16_224, seresnet50 (default: vit_base_patch16, or the classifier of the '
                             'checkpoint\'s pre-training, e.g. vit_large_patch16 for MAE ViT-L, '
                             'swin_base_patch4_window7_224 for SimMIM Swin-B, or '
                             'with --eval (or a resumed run) the model its checkpoint records, with its --input_size, '
                             'pooling, probe head and --nb_classes; fine-tuning vit_large_patch16/'
                             'vit_huge_patch14 defaults to MAE\'s ViT-L/H recipe: 50 epochs, blr 1e-3, layer decay '
                             f'0.75, drop path 0.2/0.3). This project\'s own: {model_names_by_method(pretraining=False)}')
    parser.add_argument('--input_size', default=None, type=int,
                        help='image size in pixels (default: the size the model is built for, 224 for most; with '
                             '--eval the size its checkpoint records, and no other)')
    parser.add_argument('--head_init_std', default=None, type=float,
                        help='std of the normal the new head is drawn from; ' + recipe_note('head_init_std'))
    parser.add_argument('--head_init_bias', default=None, type=float,
                        help='value the new head\'s bias starts at (default: the recipe\'s: 0, MaskFeat\'s 2e-5)')
    parser.add_argument('--drop_path', type=float, default=None, help='stochastic depth; ' + recipe_note('drop_path'))
    parser.add_argument('--nb_classes', default=None, type=int,
                        help='classes of the head (default: the number of class folders in train/)')
    parser.add_argument('--global_pool', action='store_true', default=None,
                        help='classify the average of the patch tokens (default except with --linprobe)')
    parser.add_argument('--cls_token', action='store_false', dest='global_pool',
                        help='classify the cls token instead (default with --linprobe)')

    parser.add_argument('--finetune', type=os.path.expanduser, default='',
                        help='pre-trained checkpoint to start from (weights only)')
    parser.add_argument('--linprobe', action='store_true',
                        help='linear probing: freeze the encoder, train BatchNorm (no affine) + a linear head, LARS')
    parser.add_argument('--eval', action='store_true',
                        help='only evaluate the weights of --resume (or <output_dir>/checkpoint-last.pth)')
    parser.add_argument('--knn', action='store_true',
                        help='only evaluate the frozen features of --finetune\'s encoder (random weights without it): '
                             'the model\'s pooled features (--global_pool, or --cls_token) of train/ and val/ under '
                             'the evaluation transform, classified by k-NN (DINO\'s: cosine similarity, votes '
                             'weighted by exp(cos / 0.07), and a majority vote) and by a linear probe trained to '
                             'convergence on the cached features (logistic regression, L-BFGS). Seconds on small '
                             'sets, a feature pass over the data set on ImageNet; where --linprobe\'s 90-epoch '
                             'ImageNet recipe is too long to converge, this says what the features are worth')
    add_knn_k_argument(parser)
    parser.add_argument('--dist_eval', default=True, action=argparse.BooleanOptionalAction,
                        help='each process evaluates its own share of the validation images (exact: no padding; '
                             'default: on)')
    parser.add_argument('--model_ema', action='store_true',
                        help='keep an exponential moving average of the weights (with --eval: evaluate the '
                             'checkpoint\'s)')
    parser.add_argument('--model_ema_decay', type=float, default=0.99996,
                        help='decay of --model_ema per step (default: 0.99996)')

    # augmentation (timm), MAE's names
    parser.add_argument('--crop_min', type=float, default=0.08,
                        help='smallest area of the random crop, as a fraction of the image (fine-tuning and probing; '
                             'default: 0.08)')
    parser.add_argument('--color_jitter', type=float, default=None,
                        help='colour jitter of brightness, contrast and saturation, after RandAugment when --aa is on '
                             '(default: off; the recipe\'s: MaskFeat\'s 0.4)')
    parser.add_argument('--aa', type=str, default=None,
                        help=f'RandAugment policy, "none" for none; {recipe_note("aa")}')
    parser.add_argument('--smoothing', type=float, default=None, help='label smoothing; ' + recipe_note('smoothing'))
    parser.add_argument('--reprob', type=float, default=None, help='random erasing probability; ' + recipe_note('reprob'))
    parser.add_argument('--remode', type=str, default='pixel', choices=('pixel', 'rand', 'const'),
                        help='random erasing fills with per-pixel noise, per-area noise or zeros')
    parser.add_argument('--recount', type=int, default=1, help='boxes random erasing draws in an image (default: 1)')
    parser.add_argument('--resplit', action='store_true', default=False,
                        help='accepted for compatibility with MAE; has no effect (no augmentation splits)')
    parser.add_argument('--mixup', type=float, default=None, help='mixup alpha; ' + recipe_note('mixup'))
    parser.add_argument('--cutmix', type=float, default=None, help='cutmix alpha; ' + recipe_note('cutmix'))
    parser.add_argument('--cutmix_minmax', type=float, nargs=2, default=None,
                        help='cutmix box ratio range (overrides --cutmix alpha)')
    parser.add_argument('--mixup_prob', type=float, default=1.0, help='probability of mixing a batch (default: 1.0)')
    parser.add_argument('--mixup_switch_prob', type=float, default=0.5,
                        help='probability of cutmix instead of mixup when both are on (default: 0.5)')
    parser.add_argument('--mixup_mode', type=str, default='batch', choices=('batch', 'pair', 'elem'),
                        help='one mix per batch, per pair or per image')
    add_run_args(parser)
    return parser


def layer_decay_value(text):
    """--layer_decay: a number, or none (off: as 1, since no value means the recipe's)."""
    if text.lower() == 'none':
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'a number, or none (off), got {text!r}') from None


def fill_recipe(args):
    """Set every flag left at None to the recipe of the mode: with --finetune, the fine-tuning
    recipe published with the checkpoint's pre-training (SimMIM's, MaskFeat's, MAE-HiViT's), else
    MAE's; from scratch, the model's own supervised recipe (HiViT's), else DeiT's. returns: the mode."""
    if not trains_weights(args):
        say_which_training_flags_are_ignored(args)
    recorded = {}  # the classifier of the checkpoint evaluated or resumed, shaped as it was trained
    if args.eval:
        recorded = classifier_of_checkpoint(checkpoint.resume_path(args.resume, args.output_dir))
        recorded = recorded if args.model in (None, recorded.get('model')) else {}
    elif args.model is None and trains_weights(args):
        recorded = resumed_classifier(args)
    for key, value in recorded.items():
        if getattr(args, key) is None or (key == 'linprobe' and value):
            setattr(args, key, value)
    mode = 'linprobe' if args.linprobe else 'finetune' if args.finetune else 'scratch'
    recipe, published, args.recipe_source = dict(RECIPES[mode]), {}, None
    if mode != 'scratch' and os.path.isfile(args.finetune):  # a missing file is reported where it is loaded
        source, published = checkpoint_recipe(checkpoint.load(args.finetune, mmap=True), args.finetune)
        if mode == 'linprobe':  # MAE's probe whatever the pre-training, on the classifier of its encoder
            published = {k: v for k, v in published.items() if k == 'model'}
        if own_recipe(published):
            args.recipe_source = f'the fine-tuning recipe published for {source} checkpoints'
    elif mode == 'scratch':
        published = supervised_recipe_of(args.model or recipe['model'])
        if published:
            args.recipe_source = f'the supervised recipe published for {args.model}'
    recipe = merge_recipes(recipe, published)
    args.model_by_default = args.model is None and 'model' not in published  # for the advice of a mismatch
    if mode == 'finetune' and not own_recipe(published):
        recipe.update(FINETUNE_BY_MODEL.get(args.model or recipe['model'], {}))
    apply_recipe(args, recipe, trains=trains_weights(args))
    if args.input_size is None:
        args.input_size = native_input_size(args.model)
    if isinstance(args.aa, str) and args.aa.lower() == 'none':
        args.aa = None
    if args.layer_decay == 1.0:
        args.layer_decay = None
    return mode


# Flags outside the recipes that only training reads (its steps, checkpoints and augmentation).
TRAINING_ONLY_FLAGS = ('accum_iter', 'grad_ckpt', 'max_steps', 'start_epoch', 'save_freq', 'save_every_steps',
                       'sync_checkpoints', 'log_freq', 'peak_tflops', 'model_ema_decay', 'crop_min', 'color_jitter',
                       'remode', 'recount', 'resplit', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob',
                       'mixup_mode')


def recipe_training_flags():
    """The flags a recipe fills that only training reads (its model, batch and pooling are the
    evaluation's too)."""
    return set().union(*RECIPES.values(), SCHEDULE_DEFAULTS, *BOUND_FORMS, {'lr'}) - {'model', 'batch_size',
                                                                                       'global_pool'}


def say_which_training_flags_are_ignored(args):
    """--eval and --knn train nothing: the flags of a training recipe given to them (a fine-tuning
    command with --eval added, say) are named in a warning, not ignored without a word."""
    given = [f'--{key}' for key in sorted(recipe_training_flags()) if getattr(args, key) is not None]
    defaults = get_args_parser()
    given += [f'--{key}' for key in TRAINING_ONLY_FLAGS if getattr(args, key) != defaults.get_default(key)]
    if args.knn and args.model_ema:
        given.append('--model_ema')
    if given:
        print(f'warning: {named_briefly(given, 5)} shape{"s" if len(given) == 1 else ""} training, which '
              f'{"--eval" if args.eval else "--knn"} does not do: ignored')


def checkpoint_recipe(ckpt, path):
    """The fine-tuning recipe published with a checkpoint's pre-training; for a fine-tuned classifier
    (trained on, or its features measured), only the classifier it records.
    returns: (pre-training model name or None, recipe dict)"""
    source, published = finetune_recipe_of(ckpt)
    if source is None:
        model = recorded_classifier(ckpt, path).get('model')
        published = {'model': model} if model and timm.is_model(model) else {}
    return source, published


def own_recipe(published):
    """Whether a pre-training's fine-tuning entry is a recipe of its own (SimMIM's, MaskFeat's, HiViT's)
    rather than only the classifier to build (MAE's, whose recipe is RECIPES['finetune'])."""
    return bool(published.keys() - {'model'})


def flags_text(values):
    """{'input_size': 32, 'global_pool': False, 'linprobe': False} -> '--input_size 32, --cls_token, no --linprobe'"""
    def flag(key, value):
        if key == 'global_pool':
            return '--global_pool' if value else '--cls_token'
        return f'--{key}' if value is True else f'no --{key}' if value is False else f'--{key} {value}'
    return ', '.join(flag(k, v) for k, v in values.items())


def classifier_of_checkpoint(path):
    """recorded_classifier of the checkpoint at `path` ({} where none is given), its header read alone;
    a missing file is reported here, before a model is built for it."""
    if not path:
        return {}
    return recorded_classifier(checkpoint.load(path, mmap=True), path)


def recorded_classifier(ckpt, path):
    """The flags that shape the classifier a fine-tuning checkpoint records (--model, --input_size,
    --global_pool, --linprobe, --nb_classes where one was given; {} for a file without them), so that
    --eval --resume needs none of them."""
    saved = checkpoint.saved_args(ckpt)
    model = saved.get('model')
    if model in pretrain_model_names():
        raise UsageError(f'{path!r} is a pre-training checkpoint ({model}) and --eval measures a classifier: '
                         f'fine-tune it first (--finetune {path}), or give a fine-tuned checkpoint')
    if not isinstance(model, str):
        return {}
    return {k: saved[k] for k in ('model', 'input_size', 'global_pool', 'linprobe', 'nb_classes')
            if saved.get(k) is not None}


def resumed_classifier(args):
    """The flags that shape the classifier of the fine-tuning run a training run resumes (--resume, or
    its folder's checkpoint-last.pth); {} where it resumes none (a file that cannot be read, or
    another kind of run's, is reported where it is loaded). Its mode (--linprobe) is not taken: a
    probe resumed as fine-tuning is refused."""
    path, ckpt = checkpoint.resumed_header(args)
    if not checkpoint.of_finetuning(checkpoint.saved_args(ckpt)):
        return {}
    return {k: v for k, v in recorded_classifier(ckpt, path).items() if k != 'linprobe'}


def default_model_advice(args):
    """What to add to a mismatch of weights that name no model: the classifier they met, and what to give."""
    if not args.model_by_default:
        return ''
    return (f'; the checkpoint names no model timm knows, so it was built as {args.model} (the default): give the '
            f'--model its weights are of')


def finetune_model_advice(args):
    """What to add to a mismatch of --finetune's weights: default_model_advice, or, where --model
    differs from the classifier the checkpoint fine-tunes as (its pre-training's, or the one a
    fine-tuned checkpoint records), to leave --model out."""
    advice = default_model_advice(args)
    if advice or not os.path.isfile(args.finetune):
        return advice
    classifier = checkpoint_recipe(checkpoint.load(args.finetune, mmap=True), args.finetune)[1].get('model')
    if classifier and classifier != args.model:
        return f'; it fine-tunes as --model {classifier}: leave --model out'
    return ''


def trains_weights(args):
    """Whether the run trains (fine-tuning, probing, from scratch), not only measures (--eval, --knn)."""
    return not (args.eval or args.knn)


def check_mode(args):
    """Flags of two modes at once, refused before the recipe of either is filled in."""
    if args.finetune and args.eval:
        raise UsageError('--eval evaluates a fine-tuned checkpoint given with --resume (a fine-tuning run\'s '
                         'checkpoint-best.pth, say), not the pre-trained weights of --finetune')
    if args.knn and (args.eval or args.linprobe):
        raise UsageError('--knn evaluates the frozen features of --finetune\'s encoder by itself: leave out '
                         f'{"--eval" if args.eval else "--linprobe"}')
    if args.knn and args.resume:  # it measured random weights without a word
        raise UsageError(f'--knn measures the weights of --finetune (a pre-training or fine-tuning checkpoint), not '
                         f'--resume: give --finetune {args.resume}')


def keep_the_resumed_runs_start(args):
    """A resumed fine-tuning run goes on from its checkpoint's weights, so it keeps the weights it
    started from (its --finetune, whose recipe it trains with): left out, --finetune is the run's;
    another file is refused, as its weights would not be loaded (and the run's checkpoints would
    then name it as their start)."""
    if not trains_weights(args):
        return
    path, ckpt = checkpoint.resumed_header(args)
    run = ckpt.get('args') if isinstance(ckpt, dict) else None
    # this project's fine-tuning runs (an official checkpoint's args name paths of another machine)
    if not (isinstance(run, dict) and checkpoint.of_finetuning(run) and isinstance(run['finetune'], str)):
        return
    if not args.finetune:
        args.finetune = run['finetune']
    elif not checkpoint.same_file(args.finetune, run['finetune']):
        started = f'from --finetune {run["finetune"]}' if run['finetune'] else 'from scratch (without --finetune)'
        instead = 'leave out --resume' if args.resume else 'give another --output_dir'
        raise UsageError(f'{path!r} is of a run that started {started}, and a resumed run goes on from its checkpoint: '
                         f'the weights of --finetune {args.finetune} would not be loaded. To resume the run, leave '
                         f'--finetune out; to start from {args.finetune}, {instead}')


def check_args(args):
    if trains_weights(args) and mixup_active(args) and args.batch_size % 2:
        raise UsageError(f'mixup/cutmix pairs images within a batch: --batch_size must be even, got '
                         f'{args.batch_size} (or turn mixing off with --mixup 0 --cutmix 0)')
    if args.linprobe and args.layer_decay is not None:  # the probe's recipe has none: given on the command line
        print('note: --layer_decay does nothing with --linprobe, which trains the head alone: left off')
        args.layer_decay = None
    if args.linprobe and args.grad_ckpt:  # and its warning about BatchNorm, of the probe's head, was false
        print('note: --grad_ckpt saves nothing with --linprobe, whose frozen encoder keeps no activations for a '
              'backward pass: left off')
        args.grad_ckpt = False
    if args.recount < 1:  # timm reads 0 as 1, and fails on fewer in a data-loader worker
        raise UsageError(f'--recount (the boxes random erasing draws in an image) must be at least 1, got '
                         f'{args.recount}: --reprob 0 turns random erasing off')


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args, num_classes):
    if not mixup_active(args):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def build_criterion(args):
    """Soft-target cross-entropy with mixing (the targets are already smoothed), else
    cross-entropy with label smoothing when it is on."""
    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def classification_loss(model, batch, criterion):
    images, targets = batch
    return criterion(model(images), targets)


def add_probe_head(model):
    """MAE's linear probe: the classifier becomes BatchNorm1d (no affine, eps 1e-6) then the
    linear layer, and only the linear layer is trained."""
    head = model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise UsageError(f'--linprobe needs a model whose classifier is one linear layer, not {type(head).__name__}')
    parent_name, _, attr = next(name for name, m in model.named_modules() if m is head).rpartition('.')
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, torch.nn.Sequential(torch.nn.BatchNorm1d(head.in_features, affine=False, eps=1e-6), head))
    for p in model.parameters():
        p.requires_grad = False
    for p in head.parameters():
        p.requires_grad = True


def grouped_keys(keys, most=6):
    """State-dict keys for a line of the loading report: as they are when there are at most `most`,
    else grouped by their first name ('decoder_blocks.* (96)'): ViT-L's decoder is hundreds of keys."""
    if len(keys) <= most:
        return list(keys)
    groups = {}
    for key in keys:
        groups.setdefault(key.split('.')[0], []).append(key)
    return [members[0] if len(members) == 1 else f'{name}.* ({len(members)})' for name, members in groups.items()]


def build_model(args, num_classes, resuming):
    """The classifier, initialised from --finetune unless a training checkpoint will overwrite it."""
    pool = 'avg' if args.global_pool else 'token'
    try:
        model = create_classifier(args.model, img_size=args.input_size, num_classes=num_classes,
                                  drop_path_rate=args.drop_path, global_pool=pool)
    except UsageError as e:  # timm's CNNs and Swin have no cls token: 'Invalid pool type: token'
        if pool == 'token' and 'pool type' in str(e):
            flag = '--linprobe' if args.linprobe else '--cls_token'
            raise UsageError(f'{args.model} has no cls token for {flag} to classify: give --global_pool to classify '
                             f'the average of its features') from None
        raise
    if args.finetune and not resuming:
        try:
            report = checkpoint.load_pretrained(model, args.finetune, head_init_std=args.head_init_std,
                                                head_init_bias=args.head_init_bias)
        except checkpoint.WeightsDoNotFit as e:
            raise checkpoint.WeightsDoNotFit(f'{e}{finetune_model_advice(args)}') from None
        print(f"loaded {report['loaded']} tensors from {args.finetune}")
        for key in ('missing', 'unexpected', 'dropped', 'resized', 'started at zero'):
            if report[key]:
                print(f'  {key}: {", ".join(report[key] if key == "resized" else grouped_keys(report[key]))}')
    elif not args.finetune and not args.eval and not resuming:
        print(f'no --finetune: {args.model} from random initialisation' + (' (its features)' if args.knn else ''))
    if args.linprobe:
        add_probe_head(model)
    return model


def build_optimizer(args, model, device):
    if args.linprobe:
        return build_lars(model, args.lr, args.weight_decay)
    return build_adamw(param_groups(model, args.weight_decay, args.layer_decay), args.lr, tuple(args.opt_betas),
                       device)


def best_accuracy_so_far(output_dir):
    """The best top-1 of earlier epochs of this run (from its log.txt), when resuming."""
    records = read_json_lines(os.path.join(output_dir, 'log.txt')) if output_dir else []
    return max((r['test_acc1'] for r in records if 'test_acc1' in r), default=float('-inf'))


class EpochEvaluation:
    """After each epoch: evaluate (and the EMA weights with --model_ema), keep checkpoint-best.pth."""

    def __init__(self, model, ema, loader, device, precision, args, resuming):
        self.model, self.ema, self.loader = model, ema, loader
        self.device, self.precision, self.args = device, precision, args
        # a fresh run in a folder with an old log.txt does not inherit its best accuracy
        self.best = best_accuracy_so_far(args.output_dir) if resuming else float('-inf')

    def __call__(self, epoch, stats):
        # the EMA's line first, labelled: log readers take the last `* Acc@1` line as the model's
        ema = {} if self.ema is None else self.evaluate(self.ema.module, label='EMA weights')
        results = {f'test_{k}': v for k, v in self.evaluate(self.model).items() if k != 'images'}
        results.update({f'test_ema_{k}': v for k, v in ema.items() if k != 'images'})
        if results['test_acc1'] > self.best:
            self.best = results['test_acc1']
            if self.args.output_dir:  # written with the epoch's checkpoint, from the same copy of the weights
                results['checkpoint_files'] = {os.path.join(self.args.output_dir, checkpoint.BEST): {
                    'model': self.model.state_dict(), 'epoch': epoch, 'acc1': self.best,
                    'args': checkpoint.plain_args(self.args)}}
        print(f"top-1 accuracy of epoch {epoch}: {results['test_acc1']:.2f}%; best so far: {self.best:.2f}%")
        return results

    def evaluate(self, model, label=None):
        return evaluate(model, self.loader, self.device, self.precision, sum_over_ranks=self.args.dist_eval,
                        label=label, stoppable=True)


def run_eval(args, model, loader, val_classes, device, precision):
    """--eval: the accuracy of the weights in --resume (a fine-tuned checkpoint of this project or
    an official MAE or SimMIM release, whose layout is converted) on val/, whose class folders must
    be those the checkpoint records (or as many as its classifier has outputs)."""
    path = checkpoint.resume_path(args.resume, args.output_dir)
    if not path:
        raise UsageError('--eval needs weights: --resume <fine-tuned checkpoint> (or a run in --output_dir)')
    ckpt = checkpoint.load(path)
    trained = {k: v for k, v in recorded_classifier(ckpt, path).items() if v != getattr(args, k)}
    trained_advice = f'; it was trained with {flags_text(trained)}: evaluate it so (leave these flags out and the ' \
        f'checkpoint gives them)'
    if 'input_size' in trained:  # a Swin's or HiViT's tables would be resampled and load, a ViT's would not
        raise UsageError(f'{path} is measured at the size it was trained at{trained_advice}')
    check_trained_classes(checkpoint.saved_args(ckpt).get('classes'), val_classes, path)
    state = checkpoint.ema_weights(ckpt, path) if args.model_ema else checkpoint.model_state_of(ckpt, path)
    state = checkpoint.in_model_layout(model, state, path)
    head = classifier_prefix(model)
    if not any(key.startswith(head) for key in state):
        raise UsageError(f'{path} holds no classifier ({head}*): an encoder, or a pre-training checkpoint, which '
                         f'--eval cannot measure: fine-tune it first (--finetune {path}), or give a fine-tuned one')
    advice = trained_advice if trained else (classifier_advice(model, state, len(val_classes)) or
                                             checkpoint.input_size_advice(model, state) or default_model_advice(args))
    checkpoint.load_weights(model, state, path, advice=advice)
    stats = evaluate(model, loader, device, precision, sum_over_ranks=args.dist_eval)
    print(f"accuracy of {path}{' (its EMA weights)' if args.model_ema else ''} on the {stats['images']} validation "
          f"images: top-1 {stats['acc1']:.2f}%, top-5 {stats['acc5']:.2f}%")
    return stats


def check_trained_classes(trained_classes, val_classes, path):
    """val/ must hold the class folders the checkpoint was trained on (recorded by this project's
    fine-tuning runs), in the same order: its outputs are those classes."""
    if trained_classes is not None and list(trained_classes) != list(val_classes):
        differences = class_differences(trained_classes, 'its training data', val_classes, 'val/')
        raise UsageError(f'{path} was trained on other classes than the class folders of val/ ({differences}): the '
                         f'labels would not mean its outputs; evaluate it on a val/ of the classes it was trained on')


def classifier_prefix(model):
    """'head.': where a timm model's classifier weights are (a linear probe's too: head.1.)."""
    name = getattr(model, 'default_cfg', {}).get('classifier', 'head')
    return f'{name[0] if isinstance(name, (tuple, list)) else name}.'  # a distilled DeiT's: (head, head_dist)


def classifier_advice(model, state, val_class_count):
    """What to add to a mismatch of weights whose classifier has another number of outputs than
    val/ has class folders ('' when it has as many, or none: another mismatch)."""
    head = classifier_prefix(model)
    outputs = state.get(f'{head}weight', state.get(f'{head}1.weight'))
    if outputs is None or outputs.shape[0] == val_class_count:
        return ''
    return (f'; its classifier has {outputs.shape[0]} outputs and val/ {val_class_count} class folders: evaluate it on '
            f'the classes it was trained for')


def run_knn(args, world, device, precision, pin_memory):
    """--knn: the frozen features' k-NN and linear-probe accuracy (util.feature_eval), printed
    and appended to log.txt. returns: the results"""
    train_loader, val_loader, num_classes = feature_loaders(args, world, pin_memory)
    torch.manual_seed(args.seed)  # without --finetune: the same random encoder on every rank, in every run
    model = build_model(args, num_classes=0, resuming=False).to(device.torch_device)
    results = frozen_feature_accuracy(model, train_loader, val_loader, device, precision, num_classes, args.knn_k)
    print_results(results, args.knn_k)
    RunLogger(args.output_dir, None, enabled=dist.is_main_process()).log_evaluation(
        {**results, 'model': args.model, 'weights': args.finetune or 'random initialisation'})
    if args.output_dir:
        print(f'appended to {os.path.join(args.output_dir, "log.txt")}')
    return results


def main(args):
    check_mode(args)
    keep_the_resumed_runs_start(args)
    mode = fill_recipe(args)
    if trains_weights(args):
        checkpoint.check_resumed_checkpoint(args)
    check_args(args)
    # an evaluation's printed arguments leave out the training recipe it fills but never reads
    unused = () if trains_weights(args) else recipe_training_flags() | {*TRAINING_ONLY_FLAGS, 'recipe_source'}
    world, device, precision = start_run(args, unused_flags=unused, writes=not args.eval)
    print(f'mode: {"evaluation" if args.eval else "frozen features (--knn)" if args.knn else mode}' +
          (f', with {args.recipe_source}' if args.recipe_source and trains_weights(args) else ''))
    pin_memory = args.pin_mem and device.type != 'cpu'
    if args.knn:
        results = run_knn(args, world, device, precision, pin_memory)
        dist.destroy_process_group()
        return results

    train_folder = None if args.eval else build_finetune_train_folder(args)  # --eval reads val/ alone
    val_folder = build_image_folder(args.data_path, 'val', eval_transform(args.input_size))
    train_classes = training_classes(val_folder) if args.eval else train_folder.classes
    num_classes = number_of_classes(train_classes, val_folder.classes, args.nb_classes)
    val_loader = build_eval_loader(SeededSamples(val_folder, args.seed), world, args, pin_memory, args.dist_eval)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    resuming = checkpoint.resume_path(args.resume, args.output_dir) is not None
    model = build_model(args, num_classes, resuming).to(device.torch_device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained = '' if not trains_weights(args) else \
        f'{f"{trainable / 1e6:.2f} M" if trainable >= 10 ** 4 else f"{trainable:,}"} trained, '
    print(f'model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {trained}'
          f'{num_classes} classes')
    if args.eval:
        stats = run_eval(args, model, val_loader, val_folder.classes, device, precision)
        dist.destroy_process_group()
        return stats

    mixup = build_mixup(args, num_classes)
    dataset = SeededSamples(train_folder, args.seed, batch_seeds=mixup is not None,
                            bad_images=BadImages.of_run(args.output_dir, world.rank))
    loader = build_loader(dataset, world, args, pin_memory, collate_fn=MixupCollate(mixup) if mixup else None)
    print(f'{counted(len(dataset), "training image")}, {counted(len(val_folder), "validation image")}, '
          f'{counted(len(loader), "batch", "batches")} of {args.batch_size} per process')

    args.classes = train_folder.classes  # in its checkpoints: --eval checks that val/ holds them
    set_learning_rate(args)
    optimizer = build_optimizer(args, model, device)
    scaler = device.grad_scaler(precision)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    start_epoch, start_iter, progress = resume_training(args, model, optimizer, scaler, len(dataset), ema=ema)

    loss_fn = partial(classification_loss, criterion=build_criterion(args))
    # counted before compile_and_wrap: --grad_ckpt's recomputation is not model FLOPs
    flop_rate = FlopRate.of_run(model, loss_fn, example_batch(2, args.input_size, num_classes=num_classes,
                                                              soft_targets=mixup is not None),
                                device, precision, world.world_size, args.peak_tflops)
    model_ddp = compile_and_wrap(model, device, args)
    logger = RunLogger(args.output_dir, args.log_dir, enabled=dist.is_main_process())
    evaluation = EpochEvaluation(model, ema, val_loader, device, precision, args, resuming)
    start_time = time.time()
    stats = train(model_ddp, model, loss_fn, loader, optimizer, scaler, device, precision, args, logger,
                  start_epoch=start_epoch, start_iter=start_iter, progress=progress, after_epoch=evaluation, ema=ema,
                  flop_rate=flop_rate)
    logger.close()
    print_outputs(args, stats, time.time() - start_time, dataset.bad_images)
    if stats:
        print(f"final top-1 accuracy {stats['test_acc1']:.2f}%, best {evaluation.best:.2f}% "
              f"({os.path.join(args.output_dir, checkpoint.BEST) if args.output_dir else 'not saved'})")
    dist.destroy_process_group()


if __name__ == '__main__':
    run_command(main, get_args_parser)
