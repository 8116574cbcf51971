"""The hot loop never makes the host wait for the device between log steps.

On a GPU the host queues kernels ahead of the device; every read of a device value (`.item()`,
`float(t)`, `bool(t)`, `.tolist()`) and every op whose output size depends on values (`nonzero`,
boolean indexing, `masked_select`, `unique`) stops the queue until the device catches up, and the
step pays the host's whole launch time again. The loop reads the loss only at log steps
(util/engine.py). These tests count such calls in the training process on the CPU (each one would
wait on a GPU) for runs of 1 and of 4 optimizer steps: both runs log once (the last step), so the
three extra steps must add none. What the data loader does is left out: on a real run it happens in
the workers, on the host, with host tensors."""
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import REPO, run_finetune, run_pretrain

# aten ops that read a value on the host, or size their output by the values
VALUE_SIZED = {'aten::nonzero', 'aten::masked_select', 'aten::_unique2', 'aten::unique_dim', 'aten::unique_consecutive',
               'aten::repeat_interleave'}
HOST_READS = {'tolist', 'numpy'}  # reads that do not reach the dispatcher on the CPU


def in_data_loading(stack):
    return any('torch/utils/data/' in frame.filename.replace('\\', '/') for frame in stack)


class HostSyncs(TorchDispatchMode):
    """Records (what, where) for each op of this thread that would wait for a CUDA device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def record(self, what):
        stack = traceback.extract_stack()[:-2]
        if not in_data_loading(stack):
            ours = [frame for frame in stack if frame.filename.startswith(REPO) and '/test/' not in frame.filename]
            self.calls.append((what, ''.join(traceback.format_list(ours[-3:]))))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        boolean_index = name == 'aten::index' and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
        if name == 'aten::_local_scalar_dense' or name in VALUE_SIZED or boolean_index:
            self.record(name)
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    def __init__(self, syncs):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, '__name__', None) in HOST_READS:
            self.syncs.record(func.__name__)
        return func(*args, **(kwargs or {}))


def syncs_of_run(run, steps, *flags):
    syncs = HostSyncs()
    with syncs, HostReads(syncs):
        run(*flags, '--max_steps', steps)
    return syncs.calls


COMMON = ('--epochs', 1, '--batch_size', 4, '--log_freq', 1000, '--num_workers', 0, '--device', 'cpu')

RUNS = {
    'MAE': (run_pretrain, '--model', 'mae_vit_tiny'),
    'MAE fp16, loss scaling, clipping': (run_pretrain, '--model', 'mae_vit_tiny', '--precision', 'fp16',
                                         '--clip_grad', 1.0),
    'SimMIM, mask from the loader': (run_pretrain, '--model', 'simmim_vit_tiny'),
    'MaskFeat': (run_pretrain, '--model', 'maskfeat_vit_tiny'),
    'fine-tuning, mixup, EMA': (run_finetune, '--model', 'vit_tiny_patch8', '--input_size', 64, '--model_ema'),
}


@pytest.mark.parametrize('name', RUNS)
def test_steps_between_log_steps_never_wait_for_the_device(name, small_folder, tmp_path):
    run, *flags = RUNS[name]
    flags = [*COMMON, '--data_path', small_folder, *flags]
    once = syncs_of_run(run, 1, *flags, '--output_dir', tmp_path / 'one')
    four = syncs_of_run(run, 4, *flags, '--output_dir', tmp_path / 'four')
    assert len(once) > 0  # the log step reads the loss: what is counted is seen
    once_kinds = sorted(what for what, _ in once)
    extra = [f'{what} at\n{where}' for what, where in four if once_kinds.count(what) < [w for w, _ in four].count(what)]
    assert len(four) == len(once), '3 steps without logging waited for the device:\n' + '\n'.join(extra[:6])
