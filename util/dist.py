"""Distributed training: joining the process group (torchrun or SLURM), rank helpers,
reductions and rank-0-only printing.

A single process (plain `python main_pretrain.py`) is a world of size 1 and needs no process
group; every helper here works in both cases.
"""
import builtins
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from util import signals
from util.errors import ORIGINAL_PRINT, UsageError, unsilenced_print
from util.logger import counted


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self):
        return self.world_size > 1


# the SLURM variable each of torchrun's is read from under srun (SLURM_NPROCS where SLURM_NTASKS is not set)
SLURM_SOURCES = {'RANK': 'SLURM_PROCID', 'WORLD_SIZE': 'SLURM_NTASKS', 'LOCAL_RANK': 'SLURM_LOCALID'}


def read_world_from_env():
    """This process's place from torchrun's variables, or from SLURM's under `srun`.

    SLURM's are copied to torchrun's names so that everything downstream (the device shim's
    LOCAL_RANK, init_method='env://') reads one set of variables.
    """
    from_slurm = 'RANK' not in os.environ and 'SLURM_PROCID' in os.environ
    if from_slurm:
        os.environ['RANK'] = os.environ['SLURM_PROCID']
        os.environ['WORLD_SIZE'] = os.environ.get('SLURM_NTASKS', os.environ.get('SLURM_NPROCS', '1'))
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
    numbers = {}
    for name, default in (('RANK', 0), ('WORLD_SIZE', 1), ('LOCAL_RANK', 0)):
        value = os.environ.get(name, str(default))
        if not value.isdigit():
            source = SLURM_SOURCES[name] if from_slurm else name
            raise UsageError(f'the environment variable {source} must be a whole number 0 or more, got {value!r} '
                             f'({"srun sets it" if from_slurm else "torchrun sets it; unset it to run one process"})')
        numbers[name] = int(value)
    if from_slurm and numbers['WORLD_SIZE'] > 1 and not {'MASTER_ADDR', 'MASTER_PORT'} <= set(os.environ):
        raise UsageError(f'SLURM says {numbers["WORLD_SIZE"]} tasks: set MASTER_ADDR and MASTER_PORT for them to meet '
                         f'(e.g. MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) '
                         f'MASTER_PORT=29500); for one process in an allocation of several tasks, start it with '
                         f'torchrun --standalone --nproc_per_node 1')
    if numbers['WORLD_SIZE'] < 1 or numbers['RANK'] >= numbers['WORLD_SIZE']:
        names, advice = (('SLURM_PROCID and SLURM_NTASKS', 'start the tasks with srun, which numbers them')
                         if from_slurm else ('RANK and WORLD_SIZE', 'start the processes with torchrun, which numbers '
                                             'them, or unset both to run one process'))
        raise UsageError(f'this process is rank {numbers["RANK"]} of a world of '
                         f'{counted(numbers["WORLD_SIZE"], "process", "processes")} (from {names}): ranks go from 0 '
                         f'to the world size less 1; {advice}')
    return World(rank=numbers['RANK'], world_size=numbers['WORLD_SIZE'], local_rank=numbers['LOCAL_RANK'])


def init_process_group(world, device, timeout_minutes=30):
    """Join the process group with the device's backend (nccl, hccl, tccl or gloo)."""
    if world.distributed and not {'MASTER_ADDR', 'MASTER_PORT'} <= set(os.environ):  # torch's rendezvous traceback
        raise UsageError(f'WORLD_SIZE is {world.world_size} but MASTER_ADDR and MASTER_PORT are not both set: start '
                         f'the processes with torchrun (which sets them), or set them for the processes to meet')
    if world.distributed:
        if 'TORCHELASTIC_RUN_ID' not in os.environ:  # started by hand or by srun: the others may never come
            unsilenced_print(f'rank {world.rank} of {world.world_size}: waiting for the other processes at '
                             f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]} (up to {timeout_minutes} '
                             f'minutes; Ctrl-C stops)', flush=True)
        with signals.ending_at_once():
            try:
                dist.init_process_group(backend=device.dist_backend, init_method='env://',
                                        world_size=world.world_size, rank=world.rank,
                                        timeout=datetime.timedelta(minutes=timeout_minutes))
            except dist.DistNetworkError as e:  # rank 0 serves the rendezvous at MASTER_PORT (torchrun's agent does)
                if 'EADDRINUSE' not in str(e):
                    raise
                raise UsageError(f'MASTER_PORT {os.environ["MASTER_PORT"]} is in use on this machine (by another run, '
                                 f'or another program): give every process of the run another MASTER_PORT') from None
            dist.barrier()
    print_only_on_main_process(world.rank == 0)


def destroy_process_group():
    """Leave the process group once every rank is done with it, and free what it left behind
    while the interpreter is still whole: objects of the last collectives, kept alive by reference
    cycles until the interpreter's finalisation, were destroyed there by Gloo's threads, which
    then aborted the process after its work was done ("terminate called without an active
    exception", in 1 of 8 two-process runs of main_finetune --knn; none in 24 with the collection)."""
    if is_dist_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def print_only_on_main_process(is_main):
    """Silence print() on every rank but 0; print(..., force=True) still prints everywhere."""
    builtin_print = builtins.__dict__.setdefault(ORIGINAL_PRINT, builtins.print)

    def rank_print(*args, force=False, **kwargs):
        if is_main or force:
            builtin_print(*args, **kwargs)
    builtins.print = rank_print


def main_process_by_env():
    """Whether this process is rank 0 by torchrun's (or SLURM's) variables, read before the
    processes meet: the flags are checked, and warned about, before then (read_world_from_env
    checks the values)."""
    return os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0')) == '0'


def is_dist_initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process():
    return get_rank() == 0


def micro_batch_images(args):
    """Images one micro-batch takes, all processes together: --batch_size x processes (the unit in
    which a resumed epoch's progress, counted in samples, becomes this run's micro-batches)."""
    return args.batch_size * get_world_size()


def effective_batch_size(args):
    """Images an optimizer step takes, all processes together: --batch_size x --accum_iter x processes."""
    return micro_batch_images(args) * args.accum_iter


def barrier():
    if is_dist_initialized():
        dist.barrier()


def _all_reduce(tensor, op):
    """A reduced copy of the tensor. Gloo reduces CPU tensors only: with Gloo (the CPU, and MPS,
    which has no collective backend of its own) the copy is made on the CPU."""
    if not is_dist_initialized():
        return tensor
    tensor = tensor.to('cpu', copy=True) if dist.get_backend() == 'gloo' else tensor.clone()  # never the caller's
    dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor):
    """Sum of a tensor over all ranks (the tensor itself on a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_mean(tensor):
    """Mean of a tensor over all ranks (the tensor itself on a single process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM) / get_world_size()


def all_gather_rows(tensor):
    """The rows of `tensor` of every rank, concatenated in rank order (the tensor itself on a single
    process). The ranks may hold different numbers of rows: each shard is padded to the longest
    for the collective, then cut back. With Gloo the gathering goes through the CPU; the result is
    on the tensor's device."""
    if not is_dist_initialized():
        return tensor
    local = tensor.cpu() if dist.get_backend() == 'gloo' else tensor
    counts = [torch.zeros(1, dtype=torch.int64, device=local.device) for _ in range(get_world_size())]
    dist.all_gather(counts, torch.tensor([len(local)], device=local.device))
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[:len(local)] = local
    shards = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(shards, padded)
    return torch.cat([shard[:count] for shard, count in zip(shards, counts)]).to(tensor.device)


def wrap_ddp(model, device):
    """DistributedDataParallel on one device per process; the model itself when not distributed."""
    if not is_dist_initialized():
        return model
    device_ids = None if device.index is None else [device.index]
    # the gradients live in DDP's all-reduce buckets: no copy between them, one gradient-sized
    # buffer less in memory
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
