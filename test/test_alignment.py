"""--align: two pre-training runs that must see the same weights, images, crops and masks, as a
run on an accelerator and its GPU reference would, and differ at most in arithmetic."""
import contextlib
import io
import os
import re
import sys

import numpy as np
import torch

from helpers import read_jsonl, run_pretrain, run_script

ALIGN = ['main_pretrain.py', '--align', '--model', 'mae_vit_tiny', '--input_size', 64, '--data_path', 'demo',
         '--device', 'cpu', '--epochs', 1, '--warmup_epochs', 0, '--blr', 1e-3, '--max_steps', 6]


def aligned_run(output_dir, *extra, nproc=1):
    """One process runs in this one (a new interpreter would spend seconds importing torch and timm;
    run_pretrain puts back what --align switches on for the process); more run under torchrun.
    returns: (log.jsonl's records, the start's fingerprints, the console)"""
    if nproc == 1:
        with contextlib.redirect_stdout(io.StringIO()) as console:
            run_pretrain(*ALIGN[1:], '--output_dir', output_dir, *extra)
        stdout = console.getvalue()
    else:
        result = run_script(sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                            *ALIGN, '--output_dir', output_dir, *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        stdout = result.stdout
    fingerprints = re.search(r'align: initial weights (\w+), data order (\w+), sample 0 (\w+)', stdout).groups()
    return read_jsonl(os.path.join(output_dir, 'log.jsonl')), fingerprints, stdout


def test_two_aligned_runs_give_identical_curves(demo_root, tmp_path):
    """The data-loading layout (workers) must not change what a run sees."""
    first, prints_first, out = aligned_run(tmp_path / 'a', '--batch_size', 16, '--num_workers', 0)
    second, prints_second, _ = aligned_run(tmp_path / 'b', '--batch_size', 16, '--num_workers', 2)
    assert [r['step'] for r in first] == [1, 2, 3, 4, 5, 6]  # every step logged
    assert '"precision": "fp32"' in out
    assert 'align: every kernel that ran was deterministic' in out
    assert prints_first == prints_second
    assert [r['loss'] for r in first] == [r['loss'] for r in second]

    # the fingerprints and the curve do depend on the seed: they are not constants
    other, prints_other, _ = aligned_run(tmp_path / 'c', '--batch_size', 16, '--num_workers', 0, '--seed', 1)
    assert all(a != b for a, b in zip(prints_other, prints_first))
    assert other[0]['loss'] != first[0]['loss']


def test_one_process_and_two_processes_see_the_same_global_batches(demo_root, tmp_path):
    """16 images on one process == 8 on each of two: the same samples, crops and masks per step,
    so the curves differ only by the order of floating-point sums (gradient all-reduce); only rank 0
    prints the steps."""
    single, prints_single, _ = aligned_run(tmp_path / 'one', '--batch_size', 16, '--num_workers', 1)
    double, prints_double, stdout = aligned_run(tmp_path / 'two', '--batch_size', 8, '--num_workers', 1, nproc=2)
    assert 'x 2 processes' in stdout and stdout.count('train.ips') == len(double) == 6
    assert prints_single == prints_double
    losses_single = np.array([r['loss'] for r in single])
    losses_double = np.array([r['loss'] for r in double])
    np.testing.assert_allclose(losses_double, losses_single, rtol=1e-4)
    assert losses_single[-1] < losses_single[0]  # it trained

    result = run_script(sys.executable, 'compare_loss.py', tmp_path / 'two' / 'log.jsonl',
                        tmp_path / 'one' / 'log.jsonl')
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'^pass', result.stdout, re.MULTILINE)


def test_flags_given_with_align_are_kept(demo_root, tmp_path):
    # bf16 matmuls are slow on a CPU: 4 steps of 4 images
    records, _, out = aligned_run(tmp_path / 'a', '--batch_size', 4, '--max_steps', 4, '--num_workers', 0,
                                  '--log_freq', 2, '--precision', 'bf16')
    assert [r['step'] for r in records] == [2, 4]
    assert '"precision": "bf16"' in out


def test_deterministic_algorithms_are_switched_on(monkeypatch):
    """What --align asks of each device; the flags are only set, so no GPU or NPU is needed."""
    from util.device import Device
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', True)
    monkeypatch.setattr(torch.backends.cudnn, 'deterministic', False)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    for name in ('CUBLAS_WORKSPACE_CONFIG', 'HCCL_DETERMINISTIC'):
        monkeypatch.delenv(name, raising=False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision('high')  # TF32 matmuls, as many training scripts set
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        Device('cpu', None).use_deterministic_algorithms()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_float32_matmul_precision() == 'highest'
        assert 'CUBLAS_WORKSPACE_CONFIG' not in os.environ and torch.backends.cudnn.benchmark

        Device('cuda', 0).use_deterministic_algorithms()
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                torch.backends.cudnn.allow_tf32) == (False, True, False)
        Device('npu', 0).use_deterministic_algorithms()
        assert os.environ['HCCL_DETERMINISTIC'] == 'true'
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_float32_matmul_precision(precision)


def test_simmim_masks_follow_the_samples_across_process_counts(demo_root, tmp_path):
    """SimMIM's masks are drawn per sample in the data pipeline too: one process of 8 images and two of
    4 see the same images, crops and masks, so their curves agree. Its ViT's recipe has drop path
    0.1, drawn by each process's device generator: --align switches it off, or the curves would
    differ from the first step (by 0.2 % here)."""
    simmim = ['--model', 'simmim_vit_tiny', '--max_steps', 3, '--num_workers', 1]
    single, prints_single, out = aligned_run(tmp_path / 'one', '--batch_size', 8, *simmim)
    double, prints_double, _ = aligned_run(tmp_path / 'two', '--batch_size', 4, *simmim, nproc=2)
    assert 'align: drop path (rates up to 0.1) switched off' in out
    assert prints_single == prints_double
    np.testing.assert_allclose([r['loss'] for r in double], [r['loss'] for r in single], rtol=1e-4)


def test_an_op_without_a_deterministic_kernel_is_named_in_the_summary(monkeypatch):
    """warn_only mode warns once where an op has no deterministic kernel (put_ on the CPU, a
    real one); --align's closing line names it, and says all was deterministic otherwise."""
    import warnings
    from util import determinism
    monkeypatch.setattr(warnings, 'showwarning', warnings.showwarning)  # restored after the test
    determinism.watch_nondeterministic_kernels()
    assert determinism.alignment_summary() == 'align: every kernel that ran was deterministic'
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('always')
            torch.zeros(5).put_(torch.tensor([0, 0]), torch.tensor([1., 2.]))
    finally:
        torch.use_deterministic_algorithms(False)
    summary = determinism.alignment_summary()
    assert summary.startswith('align: WARNING: 1 op(s) ran without a deterministic kernel') and 'put_' in summary
