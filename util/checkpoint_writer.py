"""Checkpoints written without holding training up for the length of the write.

Writing a large model's checkpoint (ViT-H: weights and AdamW moments, several GB) takes seconds
to minutes, and while rank 0 writes, every process waits for it. `CheckpointWriter.save` pauses
training only for one copy of the state into host memory (from an accelerator: into reused
page-locked buffers, one device-to-host transfer); a background thread then writes the files with
`checkpoint.atomic_save` (temporary file, then os.replace), so a file on disk is always a whole
checkpoint, the previous one or the new one.

One write at a time: a save first waits for the write before it to end. Skipping the save
instead would lose an epoch file or the progress --save_every_steps is there to keep, and the
copy buffers are reused, so they must be free first. The wait counts in the pause that is logged,
so saves more frequent than the disk can take show there.

A write that fails in the thread (a full disk) is raised where the training thread next looks:
the next save, or `wait()` at the end of the run and before a pre-emption exit. `--sync_checkpoints`
writes in the training thread instead, from the state itself, as before this writer existed.
"""
import collections
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from util import checkpoint
from util.errors import usage_message


def write_files(files):
    """Write {path: state} atomically, one file after the other. returns: the seconds it took"""
    start = time.perf_counter()
    for path, state in files.items():
        checkpoint.atomic_save(state, path)
    return time.perf_counter() - start


def tensor_key(t):
    """What identifies a tensor's values: the same key is the same memory seen the same way (the
    weights in checkpoint-last.pth and in checkpoint-best.pth), copied once."""
    return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def host_buffer(t):
    """An empty host tensor for a copy of `t`: page-locked where `t` is on an accelerator, so that
    the copies run as DMA transfers without a wait per tensor."""
    if t.device.type != 'cpu':
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError:  # no page-locked memory for this accelerator (MPS): an ordinary copy
            pass
    return torch.empty(t.shape, dtype=t.dtype)


def copy_to_host(obj, old, new):
    """`obj` with its tensors replaced by host copies and its containers rebuilt, so that later
    optimizer steps do not change what is written; other values (numbers, strings) are kept, nothing
    changes them in place. old: the previous save's buffers by tensor_key, reused; new: receives
    this save's."""
    if isinstance(obj, torch.Tensor):
        key = tensor_key(obj)
        if key not in new:
            buffer = old.get(key)
            new[key] = buffer if buffer is not None else host_buffer(obj)
            new[key].copy_(obj.detach(), non_blocking=new[key].is_pinned())
        return new[key]
    if isinstance(obj, dict):
        copy = (collections.OrderedDict if isinstance(obj, collections.OrderedDict) else dict)(
            (k, copy_to_host(v, old, new)) for k, v in obj.items())
        if hasattr(obj, '_metadata'):  # a state dict's module versions, which load_state_dict reads
            copy._metadata = obj._metadata
        return copy
    if isinstance(obj, (list, tuple)):
        return type(obj)(copy_to_host(v, old, new) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints from one training process (rank 0), in a background thread unless
    `synchronous`. `synchronize()` waits for the accelerator (util.device.Device.synchronize): the
    copies from it are asynchronous."""

    def __init__(self, synchronous=False, synchronize=None):
        self.synchronous = synchronous
        self.synchronize = synchronize or (lambda: None)
        self.buffers = {}         # the host copies of the last save, reused by the next
        self.thread = None        # made at the first background save
        self.in_flight = None     # (future, file names) of the write not yet waited for
        self.write_seconds = None  # how long the last finished write took

    def save(self, files):
        """Write {path: state}; every file from one copy of the states (a tensor in two of them is
        copied once). returns: the seconds the caller was held up (the previous write, the copy)"""
        start = time.perf_counter()
        self.wait()
        names = ', '.join(os.path.basename(path) for path in files)
        if self.synchronous:
            self.write_seconds = write_files(files)
            print(f'checkpoint: training held up {self.write_seconds:.2f} s writing {names} (--sync_checkpoints)',
                  flush=True)
            return time.perf_counter() - start
        waited = time.perf_counter() - start
        new = {}
        copies = {path: copy_to_host(state, self.buffers, new) for path, state in files.items()}
        self.synchronize()  # the transfers are done: training may change the state again
        self.buffers = new
        if self.thread is None:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix='checkpoint-writer')
        self.in_flight = (self.thread.submit(write_files, copies), names)
        stall = time.perf_counter() - start
        print(f'checkpoint: training held up {stall:.2f} s (copy {stall - waited:.2f} s, waiting for the previous '
              f'write {waited:.2f} s); writing {names} in the background', flush=True)
        return stall

    def wait(self):
        """Block until the write in flight has ended; raise its error (a UsageError from
        atomic_save, the previous file intact) when it failed."""
        if self.in_flight is None:
            return
        future, names = self.in_flight
        self.in_flight = None
        self.write_seconds = future.result()  # re-raises what the thread raised
        print(f'checkpoint: {names} written in {self.write_seconds:.2f} s (in the background)', flush=True)

    def close(self):
        """Let the write in flight end, after an error elsewhere too: the file is whole before the
        process exits, and a failure of it is reported on stderr without hiding that error."""
        try:
            self.wait()
        except Exception as e:
            print(f'error: {usage_message(e)}', file=sys.stderr, flush=True)
        finally:
            if self.thread is not None:
                self.thread.shutdown()
                self.thread = None
