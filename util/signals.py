"""Stopping a run cleanly: SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before they kill
a job) and SIGINT (Ctrl-C) all ask the run to stop.

Before training starts (reading the data set, building the model, loading a checkpoint), and in
evaluation-only runs, there is nothing to save: the signal ends the run at once, with one line
and EXIT_PREEMPTED. Once the loop trains (`training()`), the handler only notes the signal. After
every optimizer step the loop asks `stop_agreed()`, which all ranks answer together (a one-number
all-reduce on the CPU, over Gloo, so the accelerator is not waited for): when any rank was
signalled, all of them finish that step, rank 0 writes checkpoint-last.pth, and the run exits
with EXIT_PREEMPTED. Started again with the same --output_dir, it resumes exactly where it
stopped. A second Ctrl-C stops at once: checkpoints are written atomically, so the last one
written stays whole.

Data-loader workers ignore all three (`ignore_stop_signals_in_worker`): a Ctrl-C in a terminal
reaches every process of the foreground group, and so does a SIGTERM sent to the group (GNU
`timeout`, `kill -TERM -<pgid>`, a scheduler that signals every process of the job); a worker that
died of it would break the step the run finishes before saving. A worker still ends with the run:
the data loader stops its workers when it is done, torch's workers watch their parent and exit
when it is gone, and `_kill_daemonic_children` (at exit) ends those a run leaves running when it
stops on an error.
"""
import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # its exit handler registered first: ours, registered below, runs before it
import os
import signal
import sys

import torch
import torch.distributed as dist

from util.errors import Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

_received = []
_group = None
_deferred = False  # True while the loop trains: a signal is noted, acted on after the step


def _handle(signum, frame):
    name = signal.Signals(signum).name
    if not _deferred:
        raise Preempted(f'stopped by {name} outside the training loop (starting, evaluating or closing): the '
                        f'checkpoints written before are intact; run the same command again to continue')
    if signum == signal.SIGINT and signal.SIGINT in _received:
        raise Preempted('stopped at once by a second SIGINT: the last checkpoint written (checkpoint-last.pth, if '
                        'any) is intact; run the same command again to resume from it')
    _received.append(signum)


def catch_signals():
    """Stop the run cleanly on the stop signals from here on (call first thing: a signal during
    start-up ends the run with one line instead of a traceback or, for SIGTERM, no reaction)."""
    global _deferred
    _received.clear()
    _deferred = False
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handle)


@contextlib.contextmanager
def ending_at_once():
    """While the processes meet (init_process_group), the stop signals end this process at once,
    as if none were caught: the wait is native code that retries what a signal interrupts and never
    returns to Python, where a handler would run (a rank whose others never come could only be
    killed). Nothing is written before then."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def join_agreement_group():
    """Make the CPU group in which the ranks agree to stop (call once, after joining the process
    group: every rank makes it here, together)."""
    global _group
    if dist.is_initialized() and _group is None:
        _group = dist.group.WORLD if dist.get_backend() == 'gloo' else dist.new_group(backend='gloo')


@contextlib.contextmanager
def training():
    """While the loop trains, a stop signal is noted and acted on after the step it arrives in."""
    global _deferred
    _deferred = True
    try:
        yield
    finally:
        _deferred = False


def exit_at_once_on_stop_signals(code):
    """The command has ended with exit status `code`: a stop signal from here on (a second Ctrl-C
    while the interpreter closes) ends the process at once with that status. Raised as before, it
    broke into an exit handler with a traceback ('Exception ignored in atexit callback')."""
    def end(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    for signum in STOP_SIGNALS:
        signal.signal(signum, end)


def ignore_stop_signals_in_worker(worker_id):
    """DataLoader worker_init_fn: leave the stop signals to the training process, which stops cleanly."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@atexit.register
def _kill_daemonic_children():
    """A run that ends on an error while a loader's workers run (an unreadable validation image
    raised in one, say) leaves them to multiprocessing's exit handler, which ends its daemonic
    children with SIGTERM, which the workers ignore, and then waits for them for ever. Run before it,
    this kills them first (they hold nothing to save: they only read images). Nothing to do after a
    clean end, where the loaders have stopped their workers."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker's failure
        for worker in workers:
            worker.kill()


def received():
    """The name of the signal this process received, or None."""
    return signal.Signals(_received[0]).name if _received else None


def stop_agreed():
    """Whether any rank received a stop signal; every rank must call this at the same step."""
    if not (dist.is_initialized() and _group is not None):
        return bool(_received)
    flag = torch.tensor([1 if _received else 0], dtype=torch.int32)  # on the CPU: no device sync
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_group)
    return bool(flag.item())


def fewest_over_ranks(count):
    """The smallest `count` of all ranks (`count` itself in a run of one process), through the CPU
    group of the agreements. Every rank must call this together."""
    if not (dist.is_initialized() and _group is not None):
        return count
    smallest = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=_group)
    return int(smallest.item())


def main_process_value(value):
    """Rank 0's `value` (any picklable object) on every rank, through the CPU group of the
    agreements; `value` itself in a run of one process. Every rank must call this together."""
    if not (dist.is_initialized() and _group is not None):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=_group)
    return holder[0]
