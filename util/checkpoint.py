"""Checkpoints: written atomically, loaded as data, found again for automatic resumption.

A training checkpoint is the MAE layout (`model`, `optimizer`, `scaler`, `epoch`, `args`) plus
what exact resumption needs: `step` (optimizer steps so far) and `epoch_iters` (micro-batches
already done in the epoch after `epoch` when a run stopped part-way through it). `epoch` is
the last completed epoch, -1 when none is, so a run resumes at epoch + 1.
"""
import argparse
import os
import pickle

import torch

from util.errors import UsageError

LAST = 'checkpoint-last.pth'


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename it over `path`: a crash mid-write
    leaves the previous file intact."""
    tmp = f'{path}.tmp-{os.getpid()}'
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path):
    """Load a checkpoint as data (weights_only: no code runs) onto the CPU. argparse.Namespace
    is allowed besides tensors and containers: the official MAE code stores its args as one."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f'cannot load {path!r} as a checkpoint ({first_line}); '
                         f'is it a complete PyTorch checkpoint file?') from None


def resume_path(resume, output_dir):
    """--resume when given, else <output_dir>/checkpoint-last.pth when a run left one there."""
    if resume:
        return resume
    last = os.path.join(output_dir, LAST) if output_dir else None
    return last if last and os.path.isfile(last) else None


def training_state(model, optimizer, scaler, epoch, step, args, epoch_iters=0):
    """What a training checkpoint holds; `args` as a plain dict so it loads as data."""
    return {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'epoch': epoch,
        'epoch_iters': epoch_iters,
        'step': step,
        'args': {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    }


def restore_training_state(path, model, optimizer, scaler):
    """Load a training checkpoint into model, optimizer and scaler.

    returns: (start_epoch, epoch_iters, step) to continue from
    """
    ckpt = load(path)
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise UsageError(f'{path!r} is not a training checkpoint (no "model" entry)')
    try:
        missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    except RuntimeError as e:  # shapes that differ
        raise UsageError(f'{path!r} does not fit this model: {str(e).splitlines()[1].strip()}') from None
    if missing or unexpected:
        raise UsageError(f'{path!r} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}')
    if 'optimizer' not in ckpt or 'epoch' not in ckpt:
        # weights only (e.g. a released model): start training from them
        return 0, 0, 0
    optimizer.load_state_dict(ckpt['optimizer'])
    if scaler is not None and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    return ckpt['epoch'] + 1, ckpt.get('epoch_iters', 0), ckpt.get('step', 0)
