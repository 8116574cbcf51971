"""Pre-emption: SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before they kill a job) ask
the run to stop cleanly.

The handler only notes the signal. After every optimizer step the loop asks `stop_agreed()`,
which all ranks answer together (a one-number all-reduce on the CPU, over Gloo, so the
accelerator is not waited for): when any rank was signalled, all of them finish that step, rank 0
writes checkpoint-last.pth, and the run exits with EXIT_PREEMPTED. Started again with the same
--output_dir, it resumes exactly where it stopped.
"""
import signal

import torch
import torch.distributed as dist

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received = []
_group = None


def _note(signum, frame):
    _received.append(signum)


def install_handlers():
    """Catch the pre-emption signals in this process (call once, after joining the process group:
    every rank makes the CPU group for the agreement here, together)."""
    global _group
    _received.clear()
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, _note)
    if dist.is_initialized() and _group is None:
        _group = dist.group.WORLD if dist.get_backend() == 'gloo' else dist.new_group(backend='gloo')


def received():
    """The name of the signal this process received, or None."""
    return signal.Signals(_received[0]).name if _received else None


def stop_agreed():
    """Whether any rank received a pre-emption signal; every rank must call this at the same step."""
    if not (dist.is_initialized() and _group is not None):
        return bool(_received)
    flag = torch.tensor([1 if _received else 0], dtype=torch.int32)  # on the CPU: no device sync
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_group)
    return bool(flag.item())
