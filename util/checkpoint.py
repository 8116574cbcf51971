"""Checkpoints: written atomically, loaded as data, found again for automatic resumption.

A training checkpoint is the MAE layout (`model`, `optimizer`, `scaler`, `epoch`, `args`) plus
what exact resumption needs: `step` (optimizer steps so far), `epoch_samples` (the samples of
the epoch after `epoch` that all processes together consumed when a run stopped part-way
through it) and `effective_batch`. `epoch` is the last completed epoch, -1 when none is, so a
run resumes at epoch + 1.
"""
import argparse
import collections
import math
import operator
import os
import pickle
import re
import zipfile

import torch

from util import dist, mmpretrain
from util.errors import UsageError, first_line
from util.logger import named_briefly
from util.pos_embed import table_image_size
from util.registry import same_model

LAST = 'checkpoint-last.pth'
BEST = 'checkpoint-best.pth'  # fine-tuning: the weights of the epoch with the best top-1


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename it over `path`: a crash or a full
    disk mid-write leaves the previous file intact. A failed write is a UsageError."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
        raise UsageError(f'cannot write {path} ({first_line(e)}); the previous file is intact: free disk space '
                         f'or choose another --output_dir, then run again to resume') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class ConfigAsData(dict):
    """Stands in for yacs' CfgNode, in which the official SimMIM code stores its configuration:
    the node is read as a plain (ordered) dict of its values, and no yacs code runs."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


class WeightsDoNotFit(UsageError):
    """A checkpoint read whole whose weights do not fit the model built for them: the callers that
    know which model the checkpoint names add what to give instead."""


EMA_ENTRIES = ('model_ema', 'state_dict_ema')  # this project's fine-tuning; timm's train.py


def ema_weights(ckpt, path):
    """The EMA weights of a fine-tuning checkpoint whose run had --model_ema, or of a checkpoint of
    timm's train.py with --model-ema (--eval and export.py with --model_ema), in model_state_of's
    form."""
    key = next((k for k in EMA_ENTRIES if isinstance(ckpt, dict) and isinstance(ckpt.get(k), dict)), None)
    if key is None:
        why = (': its run had --model_ema, but this file keeps the best epoch\'s model weights only; leave --model_ema '
               'out to use them, or give checkpoint-last.pth or an epoch\'s checkpoint, which hold the EMA weights too'
               if saved_args(ckpt).get('model_ema') else  # checkpoint-best.pth of an EMA run
               ' (its run had no --model_ema): leave --model_ema out to use its weights')
        raise UsageError(f'{path!r} holds no EMA weights{why}')
    return model_state_of(ckpt[key], path)


def written_by_advice(given_model, recorded_model):
    """What to add to WeightsDoNotFit where --model differs from the model the checkpoint records."""
    if given_model and recorded_model and given_model != recorded_model:
        return f'; it was written by --model {recorded_model}: leave --model out'
    return ''


def check_recorded_input_size(saved, input_size, path, tool):
    """A trained model is read at the image size its run recorded (saved args'), whatever its family:
    --input_size of another size would not load a ViT's position table, and would resample a Swin's,
    BEiT's or HiViT's relative position tables without a word (timm's filters), so it is refused for
    all. `tool` says what reads it ('export.py writes'); nothing is checked where no size is recorded.
    returns: the size to read it at, given or recorded (None where neither)"""
    trained_at = saved.get('input_size')
    if input_size is not None and trained_at is not None and input_size != trained_at:
        raise UsageError(f'--input_size {input_size}: {path!r} was trained at {trained_at} px (its run\'s '
                         f'--input_size), and {tool} it at that size: leave --input_size out')
    return input_size or trained_at


def input_size_advice(model, state):
    """What to add to WeightsDoNotFit where the position table of `state` is for another image size
    than `model`'s: the size to give."""
    trained_at = table_image_size(model, state)
    return f'; its position table is for {trained_at} px images: give --input_size {trained_at}' if trained_at else ''


def load(path, mmap=False):
    """Load a checkpoint as data (weights_only: no code runs) onto the CPU. Besides tensors and
    containers, argparse.Namespace is allowed (the official MAE code stores its args as one), and
    a yacs configuration (the official SimMIM code's) is read as nested dicts.
    mmap: map the tensors of a zip checkpoint instead of reading them, for a look at its args or
    key names alone (a ViT-L checkpoint with its optimizer state is gigabytes); an older pickle
    checkpoint, which cannot be mapped, is read whole."""
    if os.path.isdir(path):
        raise UsageError(f'checkpoint {path!r} is a folder: give the .pth file in it')
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist')
    with open(path, 'rb') as f:
        start = f.read(9)
    if is_safetensors(start):
        return load_safetensors(path)
    start = start[:4]
    if not start.startswith(CHECKPOINT_STARTS):
        raise UsageError(not_a_checkpoint(path, start))
    if start.startswith(b'\x80') and len(start) > 1 and start[1] > 2:  # torch.save's own pickles are protocol 2
        raise UsageError(f'{path!r} is a pickle (protocol {start[1]}) that torch.save did not write, and checkpoints '
                         f'are loaded as data: read it with pickle, then save its weights as tensors with torch.save '
                         f'and give that file')
    if start == CHECKPOINT_STARTS[0]:
        other_zip = other_zip_archive(path)
        if other_zip:
            raise UsageError(f'{path!r} {other_zip}')
    mmap = mmap and start == CHECKPOINT_STARTS[0]
    try:
        return load_as_data(path, mmap=mmap)
    except pickle.UnpicklingError as e:
        if 'Unsupported global' not in str(e):
            raise unloadable(path, e) from None
        stand_ins, objects = mmpretrain.training_state_stand_ins(path)
        if not objects:  # mmengine's epoch_N.pth: its logger's objects are not needed, stand-ins take their place
            return load_as_data(path, stand_ins, mmap)
        # torch's own advice (weights_only=False) would run code from the file: not given here
        kind = 'a whole model saved as an object' if any(name.startswith('torch.nn.modules.') for name in objects) \
            else 'a Python object'
        raise UsageError(f'{path!r} holds {kind} ({named_briefly(objects)}), not only tensors and plain '
                         f'containers, and checkpoints are loaded as data: save the weights alone (torch.save('
                         f'model.state_dict(), ...)) and give that file') from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError) as e:
        raise unloadable(path, e) from None


def load_as_data(path, stand_ins=(), mmap=False):
    """torch.load with weights_only, allowing argparse.Namespace, yacs' CfgNode read as a dict, and
    `stand_ins`: [(harmless callable, 'module.name' it replaces)]."""
    with torch.serialization.safe_globals([argparse.Namespace, (ConfigAsData, 'yacs.config.CfgNode'), *stand_ins]):
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)


# What a checkpoint file begins with: a zip archive (torch.save since 1.6), or a pickle (older).
CHECKPOINT_STARTS = (b'PK\x03\x04', b'\x80')
# What a file given as a checkpoint often is instead: a compressed download, or a web page saved
# in place of the file (a link to a hosting site's page, a download that needed a login).
OTHER_STARTS = ((b'\x1f\x8b', 'is gzip-compressed, not a PyTorch checkpoint: gunzip it and give the file it holds'),
                (b'<', 'is a web page, not a PyTorch checkpoint: download the file that the page links to'))


def not_a_checkpoint(path, start):
    """The error for a file that begins with `start` (4 bytes) and is no checkpoint: what it is,
    where that shows, and what to give instead."""
    if not start:
        return f'{path!r} is empty (0 bytes): a copy or download cut short? Give the whole file'
    for magic, what in OTHER_STARTS:
        if start.lstrip().startswith(magic):
            return f'{path!r} {what}'
    return (f'{path!r} is not a PyTorch checkpoint (it starts with {start!r}, not a zip archive, a pickle or '
            f'safetensors): give the .pth file a training run or a release wrote{older_checkpoint_hint(path)}')


def other_zip_archive(path):
    """What a zip archive that torch.save did not write is, and what to give instead; None for a
    checkpoint's archive (its data.pkl) or one zipfile cannot read (cut short: torch.load says so)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    if any(name.split('/')[-1] == 'constants.pkl' for name in names):  # torch.jit.save's, beside its code/
        return ('is a TorchScript model (torch.jit.save), not a checkpoint of weights: save its weights with '
                'torch.save(model.state_dict(), ...) and give that file')
    if any(name.split('/')[-1] == 'data.pkl' for name in names):
        return None
    if names and all(name.endswith('.npy') for name in names):
        return ('is a NumPy archive (.npz: JAX or TensorFlow weights, say), not a PyTorch checkpoint: convert its '
                'arrays to a state dict of tensors in this model\'s key names and save that with torch.save')
    return 'is a zip archive without the data.pkl of a PyTorch checkpoint: give the .pth file a training run or a ' \
           'release wrote (or unzip this one, if it holds it)'


def is_safetensors(start):
    """Whether a file that begins with `start` (9 bytes) is safetensors: the length of a JSON header
    (8 bytes, little-endian; the format allows 100 MB at most), then the header's opening brace."""
    return len(start) == 9 and start[8:] == b'{' and int.from_bytes(start[:8], 'little') <= 100_000_000


def load_safetensors(path):
    """A safetensors file (timm's weights on the Hugging Face hub, export.py's files) as a state
    dict on the CPU; the format holds tensors alone, so it is data by construction."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f'cannot load {path!r} as a safetensors file ({first_line(e)}); is it complete?') from None


def unloadable(path, error):
    # the first sentence of torch's reason: what follows (miniz's "This is an internal miniz error. If
    # you are seeing this error, ...") is what the question below asks in a line
    reason = first_line(error).split('. ')[0].rstrip('.')
    return UsageError(f'cannot load {path!r} as a checkpoint ({reason}): is it a complete PyTorch checkpoint '
                      f'file (not a copy or download cut short)?{older_checkpoint_hint(path)}')


def older_checkpoint_hint(path):
    """For a damaged checkpoint-last.pth: the newest epoch checkpoint beside it, to resume from."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) != LAST or not os.path.isdir(folder):
        return ''
    names = [re.fullmatch(r'checkpoint-(\d+)\.pth', name) for name in os.listdir(folder)]
    epochs = sorted((int(m[1]), m[0]) for m in names if m)
    if not epochs:
        return ' Remove it to start the run afresh.'
    return (f' Resume from the newest epoch checkpoint instead: --resume {os.path.join(folder, epochs[-1][1])} '
            f'(or remove the damaged file)')


def resume_path(resume, output_dir):
    """--resume when given, else <output_dir>/checkpoint-last.pth when a run left one there."""
    if resume:
        return resume
    last = os.path.join(output_dir, LAST) if output_dir else None
    return last if last and os.path.isfile(last) else None


def training_resume_path(args):
    """resume_path for a training run. Where --resume names a checkpoint outside --output_dir and the
    folder's checkpoint-last.pth continues it (its run resumed that file: the same command launched
    again after an interruption, as the README asks), the folder's newer checkpoint: resuming the
    named file again would throw away what the run has trained since."""
    path, last = resume_path(args.resume, args.output_dir), resume_path(None, args.output_dir)
    if not args.resume or not last or in_folder(path, args.output_dir):
        return path  # one of the folder's own checkpoints: an earlier epoch's, to go back to it
    try:
        resumed_by_last = saved_args(load(last, mmap=True)).get('resume')
    except UsageError:  # a damaged checkpoint-last.pth: not what the command names
        return path
    return last if isinstance(resumed_by_last, str) and same_file(resumed_by_last, args.resume) else path


def in_folder(path, folder):
    """Whether the file `path` lies in the existing `folder` itself (not in a folder below it)."""
    return os.path.samefile(os.path.dirname(os.path.abspath(path)), folder)


def same_file(path, other):
    return path == other or (os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other))


def saved_args(ckpt):
    """The arguments of the run that wrote a loaded checkpoint, as a dict: this project's (a dict),
    the official MAE code's (an argparse.Namespace), timm's train.py's (a Namespace, in the names
    of timm_run_args); {} when it has none."""
    args = ckpt.get('args') if isinstance(ckpt, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    args = args if isinstance(args, dict) else {}
    return timm_run_args(args, ckpt['arch']) if isinstance(ckpt, dict) and isinstance(ckpt.get('arch'), str) else args


def timm_run_args(args, arch):
    """The arguments of a checkpoint of timm's train.py (its CheckpointSaver records 'arch'), in
    this project's meaning: the model from 'arch' where the args lack one (it is the model's class
    name without them: kept only where timm knows the name); --input_size as one number of pixels
    (timm's is (channels, height, width), or img_size), dropped where it is not square."""
    import timm
    args = dict(args)
    if 'model' not in args and timm.is_model(arch):
        args['model'] = arch
    size = args.get('input_size')
    if isinstance(size, (list, tuple)):
        args['input_size'] = size[-1] if len(size) == 3 and size[1] == size[2] else None
    if args.get('input_size') is None and isinstance(args.get('img_size'), int):
        args['input_size'] = args['img_size']
    return args


def of_finetuning(run_args):
    """Whether a run's arguments (a dict: a checkpoint's, or vars(args)) are main_finetune.py's, the
    only entry point with --finetune."""
    return 'finetune' in run_args


def plain_args(args):
    """The run's arguments as a dict of plain values, so that a checkpoint loads as data."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}


def training_state(model, optimizer, scaler, epoch, step, args, epoch_samples=0, ema=None, logged_losses=None):
    """What a training checkpoint holds; `args` as a plain dict so it loads as data; the EMA of
    the weights (fine-tuning's --model_ema) as `model_ema`. `epoch_samples`: the samples of the
    unfinished epoch `epoch + 1` consumed by all processes together; `effective_batch`: the
    images of one optimizer step, all processes together; `logged_losses`, for an unfinished epoch:
    {'epoch_loss': its logged losses so far, (sum of loss x images, images), 'interval_loss': the
    logged part of a --log_freq interval cut by a stop, (sum of loss x steps, steps)}."""
    state = {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'epoch': epoch,
        'epoch_samples': epoch_samples,
        'effective_batch': dist.effective_batch_size(args),
        'step': step,
        'args': plain_args(args),
    }
    if ema is not None:
        state['model_ema'] = ema.module.state_dict()
    state.update({key: list(sums) for key, sums in (logged_losses or {}).items()})
    return state


def resumed_epoch_samples(ckpt, path, args):
    """The samples of the unfinished epoch that a checkpoint's run consumed, all processes
    together, checked against this run's effective batch: another split of the same effective
    batch (processes x --batch_size x --accum_iter) continues exactly; another effective batch
    would change the lr and the steps, and is refused."""
    effective = dist.effective_batch_size(args)
    if 'epoch_samples' not in ckpt:  # older checkpoints count one rank's micro-batches, on this cluster
        return ckpt.get('epoch_iters', 0) * dist.micro_batch_images(args)
    saved = ckpt.get('effective_batch')
    if saved is not None and saved != effective:
        raise UsageError(f'{path!r} was written by a run with an effective batch of {saved} images (processes x '
                         f'--batch_size x --accum_iter), this run has {effective}: the lr and the schedule would '
                         f'change. Resume with processes x --batch_size x --accum_iter = {saved}, or start a new run '
                         f'in another --output_dir')
    return ckpt['epoch_samples']


def say_which_draws_change(ckpt, args, epoch_samples):
    """A resumption that draws otherwise than the run it continues: another --seed in the middle of
    an epoch (its rest in another order), another split of the batch in fine-tuning (other mixes
    and drops). Allowed, and said."""
    saved = saved_args(ckpt)
    if epoch_samples and saved.get('seed') not in (None, args.seed):
        print(f'warning: --seed {args.seed} is not the seed {saved["seed"]} of the run this resumes in the middle '
              f'of an epoch: the rest of the epoch is drawn in another order, so some of its images are seen twice and '
              f'others not at all (resume with --seed {saved["seed"]})')
    if of_finetuning(saved) and any(saved.get(key) not in (None, getattr(args, key)) for key in ('batch_size',
                                                                                                  'accum_iter')):
        print('note: resumed with another split of the same effective batch: mixup/cutmix pair the images of a '
              'micro-batch and drop path draws per micro-batch, so with them the losses from here differ slightly '
              'from an uninterrupted run\'s (the same split resumes exactly)')


# The flags of the optimization that a resumed run takes from its command: the lr schedule and
# clipping (read at every step), and the hyperparameters of the optimizer's parameter groups.
OPTIMIZATION_FLAGS = ('lr', 'min_lr', 'warmup_lr', 'warmup_epochs', 'epochs', 'lr_schedule', 'lr_milestones',
                      'lr_gamma', 'clip_grad', 'weight_decay', 'opt_betas', 'layer_decay')


def say_which_optimization_flags_change(ckpt, args):
    """A resumption given other optimization flags than the run it continues (often a flag left out
    of the command, whose default is another recipe's): allowed, since a longer --epochs is how a
    run is extended, but said."""
    saved = saved_args(ckpt)
    changed = [(key, saved[key], getattr(args, key)) for key in OPTIMIZATION_FLAGS
               if key in saved and hasattr(args, key) and not same_value(saved[key], getattr(args, key))]
    if changed:
        print(f'warning: resumed with other flags than the run\'s: '
              f'{", ".join(f"{flag_name(k)} {show(now)} (the run had {show(then)})" for k, then, now in changed)}; '
              f'they apply from here: give the run\'s flags to continue it exactly (a longer --epochs alone is how a '
              f'run is extended)')


def flag_name(key):
    return 'the lr (--blr x effective batch / 256)' if key == 'lr' else f'--{key}'


def show(value):
    """A flag's value as it is typed."""
    if isinstance(value, float):
        return f'{value:.4g}'
    if isinstance(value, (list, tuple)):
        return ' '.join(map(show, value))
    return str(value)


def same_value(a, b):
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def check_same_kind_of_run(ckpt, path, args):
    """A training checkpoint resumes the run that wrote it: the same --model, and in fine-tuning
    the same mode (a linear probe is not resumed as fine-tuning)."""
    saved = ckpt.get('args') or {}
    if not isinstance(saved, dict) or 'optimizer' not in ckpt:
        return
    finetuning = of_finetuning(vars(args))
    if of_finetuning(saved) and not finetuning:
        advice = 'give a pre-training checkpoint to --resume, or leave it out' if args.resume else \
            'start a new run in another --output_dir (or remove its checkpoint-last.pth)'
        raise UsageError(f'{path!r} is a checkpoint of main_finetune.py (--model {saved.get("model")}), which '
                         f'pre-training cannot resume: {advice}')
    if not of_finetuning(saved) and 'model' in saved and finetuning:
        if args.finetune and not args.resume:  # --output_dir is the pre-training's own folder
            raise UsageError(f'--output_dir {args.output_dir} holds a pre-training run ({path}, --model '
                             f'{saved["model"]}), which fine-tuning would resume: give the fine-tuning another '
                             f'--output_dir')
        advice = 'leave out --resume: --finetune gives the weights to start from' if args.finetune else \
            'start from its weights with --finetune, or use another --output_dir'
        raise UsageError(f'{path!r} is a pre-training checkpoint (--model {saved["model"]}), which fine-tuning '
                         f'cannot resume: {advice}')
    for flag in ('model', 'linprobe'):
        same = same_model if flag == 'model' else operator.eq
        if flag in saved and hasattr(args, flag) and not same(saved[flag], getattr(args, flag)):
            raise UsageError(f'{path!r} was written by a run with --{flag} {saved[flag]}, this run has '
                             f'{getattr(args, flag)}: resume it with the same flags{other_run_advice(args)}')
    before, now = saved.get('train_images'), getattr(args, 'train_images', None)
    if before and now and before != now:  # a copy of the data cut short, another split: allowed, but said
        print(f'warning: {path} was written by a run over {before:,} training images, and --data_path now holds '
              f'{now:,}: the epochs change length (is it the same data set, copied whole?)')


def resumed_header(args):
    """(path, checkpoint) of what a training run resumes (training_resume_path),
    its tensors mapped rather than read, for a look at its args before a model is built;
    (None, None) where it resumes nothing, or the file cannot be read (said where the run loads it)."""
    path = training_resume_path(args)
    try:
        return (path, load(path, mmap=True)) if path else (None, None)
    except UsageError:
        return None, None


def check_resumed_checkpoint(args):
    """check_same_kind_of_run on the header of the checkpoint a training run will resume, before a
    model is built for it (a ViT-L, for a checkpoint it cannot resume)."""
    path, ckpt = resumed_header(args)
    if isinstance(ckpt, dict):
        check_same_kind_of_run(ckpt, path, args)


def resumed_model(args):
    """The pre-training model of the checkpoint a run resumes (util.registry.pretraining_of), for a
    resumption that leaves --model out; None where there is none, or it names none."""
    from util.registry import pretraining_of
    ckpt = resumed_header(args)[1]
    return pretraining_of(ckpt)[0] if ckpt is not None else None


def other_run_advice(args):
    """What else to do with a checkpoint of another run: fine-tuning can start from its weights
    (--finetune); pre-training has no such flag, so a new run goes to another folder."""
    if of_finetuning(vars(args)):
        return ', start from its weights with --finetune, or use another --output_dir'
    if args.resume:  # given by hand: another --resume is the choice, not the folder
        return ', or resume another checkpoint (or none) with these flags'
    return ', or start a new run in another --output_dir (or remove its checkpoint-last.pth)'


def restore_training_state(path, model, optimizer, scaler, args, ema=None):
    """Load a training checkpoint into model, optimizer, scaler (and the EMA of the weights).

    returns: (start_epoch, samples of start_epoch already consumed by all processes,
              {'step': steps done, and the unfinished epoch's logged losses: 'epoch_loss' and
               'interval_loss' (see training_state)}: the fields of a util.engine.Progress)
    """
    ckpt = load(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt:  # weights alone: a release (mmpretrain's, say)
        load_weights(model, in_model_layout(model, model_state_of(ckpt, path), path), path)
        return 0, 0, {}
    check_same_kind_of_run(ckpt, path, args)
    if 'acc1' in ckpt and 'optimizer' not in ckpt:  # a fine-tuning run's checkpoint-best.pth
        raise UsageError(f'{path} holds the weights of a run\'s best epoch, without the optimizer and the schedule '
                         f'to go on from: --resume that run\'s checkpoint-last.pth continues it, and --finetune {path} '
                         f'starts a new run from these weights')
    resumable = 'optimizer' in ckpt  # a run's own checkpoint, written with other flags (--input_size, say)
    weights = model_state_of(ckpt, path)  # a DDP model's `module.` prefix goes, for the model and an EMA started here
    written_at = saved_args(ckpt).get('input_size')
    size = f' (--input_size {written_at})' if written_at not in (None, getattr(args, 'input_size', None)) else ''
    load_weights(model, weights, path, advice=f'; resume it with the flags it was written with{size}'
                                              f'{other_run_advice(args)}' if resumable else '')
    if 'optimizer' not in ckpt or 'epoch' not in ckpt:
        # weights only (e.g. a released model): start training from them
        return 0, 0, {}
    commanded = [{key: value for key, value in group.items() if key != 'params'} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as e:  # other parameter groups: another model, mode or layer decay
        raise UsageError(f'{path!r} holds the optimizer of another kind of run ({first_line(e)}): resume it with '
                         f'the flags it was written with{other_run_advice(args)}') from None
    for group, hyperparameters in zip(optimizer.param_groups, commanded):
        # the state (moments, steps) is the run's; weight decay, betas and layer scales are this
        # command's, as its schedule is (loading put back the run's, whatever the flags said)
        group.update(hyperparameters)
    if ema is not None:
        load_weights(ema.module, ckpt.get('model_ema', weights), path)
        if 'model_ema' not in ckpt:
            print(f'note: {path} holds no EMA weights: --model_ema starts its average from the resumed weights')
    elif 'model_ema' in ckpt:
        print(f'note: {path} holds EMA weights, which this run without --model_ema does not carry on')
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    samples = resumed_epoch_samples(ckpt, path, args)
    say_which_draws_change(ckpt, args, samples)
    say_which_optimization_flags_change(ckpt, args)
    logged = {key: tuple(ckpt[key]) for key in ('epoch_loss', 'interval_loss') if samples and key in ckpt}
    return ckpt['epoch'] + 1, samples, {'step': ckpt.get('step', 0), **logged}


def load_weights(model, state, path, optional=(), advice=''):
    """Load a state dict exactly (every key, every shape; keys that start with one of `optional`
    may be absent) or say which keys do not fit, and then `advice`."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise WeightsDoNotFit(f'{path!r} does not fit this model: {str(e).splitlines()[1].strip().rstrip(".")}'
                              f'{advice}') from None
    missing = [k for k in missing if not k.startswith(optional)]
    if missing or unexpected:
        raise WeightsDoNotFit(f'{path!r} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}'
                              f'{advice}')


# Keys that belong to pre-training only (MAE's decoder and mask token), and the ones a
# classifier re-initialises.
PRETRAIN_ONLY_PREFIXES = ('decoder_', 'mask_token')
HEAD_PREFIXES = ('head.', 'fc_norm.', 'norm.')


# Where checkpoints keep their weights: this project and the official MAE, SimMIM and DeiT code
# ('model'), timm's and mmpretrain's training scripts ('state_dict'), DeepSpeed and BEiT ('module'),
# PySlowFast, the official MaskFeat code ('model_state').
WEIGHT_ENTRIES = ('model', 'state_dict', 'module', 'model_state')


def is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


# What wrappers put before every key of a model's state dict: DistributedDataParallel and
# torch.optim.swa_utils.AveragedModel ('module.'), torch.compile ('_orig_mod.'), nested either way.
WRAPPER_PREFIXES = ('module.', '_orig_mod.')


def without_wrapper_prefixes(state):
    """`state` with the prefixes of WRAPPER_PREFIXES that all its keys share removed, and
    AveragedModel's count of averaged models (n_averaged, not a weight) dropped."""
    if 'n_averaged' in state and all(k.startswith('module.') for k in state if k != 'n_averaged'):
        state = {k: v for k, v in state.items() if k != 'n_averaged'}
    while state and (prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def model_state_of(ckpt, path):
    """The weights inside a checkpoint: one of WEIGHT_ENTRIES, or a bare state dict. Keys that all
    start with a wrapper's prefix (DDP's `module.`, torch.compile's `_orig_mod.`) lose it;
    mmpretrain's layout (backbone.*, neck.*, head.*) comes back in the official one (util/mmpretrain.py)."""
    entries = [ckpt[key] for key in WEIGHT_ENTRIES if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict)]
    state = entries[0] if entries else ckpt
    ema = next((k for k in EMA_ENTRIES if isinstance(ckpt, dict) and is_state_dict(ckpt.get(k))), None)
    if not is_state_dict(state) and ema:
        raise UsageError(f'{path!r} holds EMA weights only (its {ema!r} entry): --eval and export.py read them with '
                         f'--model_ema; elsewhere, give a file with them as its \'model\' entry')
    if not is_state_dict(state):
        raise UsageError(f'{path!r} holds no model weights (expected a state dict of tensors, alone or as its '
                         f'{", ".join(repr(k) for k in WEIGHT_ENTRIES)} entry)')
    state = without_wrapper_prefixes(state)
    return mmpretrain.official_layout(state) if mmpretrain.is_mmpretrain(state) else state


def resize_pos_embed(pos_embed, model):
    """Resample a checkpoint's (1, prefix + H*W, D) position table to the model's grid."""
    from timm.layers import resample_abs_pos_embed
    num_prefix = getattr(model, 'num_prefix_tokens', 1)
    new_grid = list(model.patch_embed.grid_size)
    return resample_abs_pos_embed(pos_embed, new_size=new_grid, num_prefix_tokens=num_prefix)


# Classifier classes whose checkpoints need a conversion on loading (another layout, tables to
# resize): {class: filter(state_dict, model) -> state_dict}, registered by the model files.
_PRETRAINED_FILTERS = {}


def rebuilt_buffers(model, state):
    """The model's buffers that `state` lacks: tables a model computes itself (relative position
    indices, attention masks), which some layouts store and others (newer timm, the official
    supervised HiViT per block) do not. A checkpoint never needs to carry them."""
    parameters = dict(model.named_parameters())
    return {k: v for k, v in model.state_dict().items() if k not in state and k not in parameters}


def register_pretrained_filter(model_class):
    """Decorator: pre-trained weights loaded into a `model_class` (or a subclass) go through this
    filter, in timm's checkpoint_filter_fn(state_dict, model) convention."""
    def register(fn):
        _PRETRAINED_FILTERS[model_class] = fn
        return fn
    return register


def in_model_layout(model, state, path):
    """A state dict converted by the filter registered for the model's class, if any (SimMIM's Swin
    and BEiT: the official layout, the relative position tables resized to the model's windows)."""
    from util.registry import import_model_files  # the model files register their filters
    import_model_files()
    filter_fn = next((fn for cls, fn in _PRETRAINED_FILTERS.items() if isinstance(model, cls)), None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(state, model)
    except (AttributeError, KeyError, RuntimeError, ValueError) as e:  # weights of another architecture
        # the keys say what differs; the filter's own words only where they do not ('NoneType' object ...)
        differences = key_differences(state, model.state_dict()) or first_line(e)
        raise WeightsDoNotFit(f'{path!r} does not fit this model: {differences}') from None


def key_differences(state, own, wrong_shapes=(), optional=()):
    """The first three of each kind of difference between a checkpoint's weights and a model's:
    shapes, keys missing from the checkpoint (less those starting with `optional`), keys the model
    lacks; '' when there is none."""
    parts = [('shapes', list(wrong_shapes)),
             ('model keys not in the checkpoint', [k for k in own if k not in state and not k.startswith(optional)]),
             ('checkpoint keys not in the model', [k for k in state if k not in own])]
    return ', '.join(f'{name} {keys[:3]}' + (f' (and {len(keys) - 3} more)' if len(keys) > 3 else '')
                     for name, keys in parts if keys)


def encoder_of(state):
    """The encoder's weights of a pre-training checkpoint that wraps it as `encoder.*` beside a
    `decoder.*` (SimMIM); any other state as it is. returns: (state, dropped keys)"""
    if not any(k.startswith('encoder.') for k in state):
        return state, []
    return ({k[len('encoder.'):]: v for k, v in state.items() if k.startswith('encoder.')},
            sorted(k for k in state if not k.startswith('encoder.')))


def load_pretrained(model, path, head_init_std=2e-5, head_init_bias=0.0):
    """Initialise a classifier from a pre-trained (or fine-tuned) checkpoint for fine-tuning.

    Pre-training-only weights are dropped, the position table is resampled when the image size
    differs, a checkpoint of another layout goes through the filter registered for the model's
    class (SimMIM's Swin and BEiT: the official layout, relative position tables resized to the
    classifier's windows), the head is re-initialised: weights from a normal of std `head_init_std`
    (MAE: 2e-5), the bias `head_init_bias` (MAE: 0; MaskFeat's mmpretrain recipe: 2e-5).
    A checkpoint whose weights do not fit the model is a UsageError naming the first mismatching keys.
    returns: a report {'loaded', 'missing', 'unexpected', 'dropped', 'resized', 'started at zero'}
    """
    return load_pretrained_state(model, model_state_of(load(path), path), path, head_init_std, head_init_bias)


def filter_changes(state, before, params):
    """What a layout's filter did besides converting: the parameters it started at zero (HiViT's
    relative position tables, which MAE-HiViT pre-trains without), and the keys of `before` (the
    names going in, with their shapes) it left out, where it kept the other names (none are named
    after a filter that renames, SimMIM's official layout's), and the tensors it resampled.
    returns: (sorted zeroed keys, left-out keys, resized tensors as 'key (shape) -> (shape)')"""
    zeroed = sorted(k for k, v in state.items() if k in params and k not in before and not v.any())
    renamed = not {k for k in state if k in params} - set(zeroed) <= set(before)
    after = {k: tuple(v.shape) for k, v in state.items()}
    if not renamed:
        return zeroed, [k for k in before if k not in state], \
            [f'{k} {before[k]} -> {after[k]}' for k in after if k in before and before[k] != after[k]]
    return zeroed, [], resized_by_kind(before, after)


def resized_by_kind(before, after):
    """The resampled tensors of a filter that renames (a Swin's patch mergings move a stage on, the
    shared table of a BEiT becomes every block's): by the last part of their names, the kinds whose
    shapes changed, as '*.kind (shapes) -> (shapes)'."""
    def shapes_by_kind(shapes):
        kinds = {}
        for key, shape in shapes.items():
            kinds.setdefault(key.rsplit('.', 1)[-1], set()).add(shape)
        return kinds
    old, new = shapes_by_kind(before), shapes_by_kind(after)
    return [f'*.{kind} {", ".join(map(str, sorted(old[kind] - new[kind])))} -> '
            f'{", ".join(map(str, sorted(new[kind] - old[kind])))}'
            for kind in sorted(old.keys() & new.keys()) if old[kind] - new[kind] and new[kind] - old[kind]]


def load_pretrained_state(model, state, path, head_init_std=2e-5, head_init_bias=0.0):
    """load_pretrained from a state dict in memory (`path` names its source in messages): a
    pre-training model's current weights become a classifier as its checkpoint file would."""
    state, dropped = encoder_of(dict(state))
    pretrain_only = sorted(k for k in state if k.startswith(PRETRAIN_ONLY_PREFIXES) or k.startswith('head.'))
    for key in pretrain_only:
        del state[key]
    dropped += pretrain_only
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    state = in_model_layout(model, state, path)
    file_shapes = {k: tuple(v.shape) for k, v in state.items()}  # what a mismatch names: not the resampled table
    if 'pos_embed' in state and 'pos_embed' in own and state['pos_embed'].shape != own['pos_embed'].shape:
        state['pos_embed'] = resize_pos_embed(state['pos_embed'], model)
    wrong = [f'{k} {file_shapes[k]} vs {tuple(own[k].shape)}' for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    params = {k for k, _ in model.named_parameters()}
    zeroed, left_out, resized = filter_changes(state, shapes, params)
    rebuilt = rebuilt_buffers(model, state)  # computed by the model, not loaded
    state.update(rebuilt)
    dropped += sorted(k for k in left_out if k not in rebuilt)
    missing_body = [k for k in own if k not in state and not k.startswith(HEAD_PREFIXES)]
    if wrong or missing_body or not any(k in own for k in state):
        raise WeightsDoNotFit(f'{path!r} does not fit this model: {key_differences(state, own, wrong, HEAD_PREFIXES)}')
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = model.get_classifier() if hasattr(model, 'get_classifier') else getattr(model, 'head', None)
    if isinstance(head, torch.nn.Linear):
        torch.nn.init.normal_(head.weight, std=head_init_std)
        torch.nn.init.constant_(head.bias, head_init_bias)
    loaded = sum(k in own and k not in zeroed and (k in params or k in shapes) for k in state)  # no computed buffer
    return {'loaded': loaded, 'missing': sorted(missing),
            'unexpected': sorted(unexpected), 'dropped': dropped, 'resized': resized, 'started at zero': zeroed}
