"""--compile: the training step of one model of every family is a single graph for torch.compile.

TorchDynamo traces it with fullgraph=True and the eager backend: the graph inductor would compile,
without compiling it (minutes on a CPU). A graph break (Python control flow on a tensor's value,
a call Dynamo cannot trace) fails the trace; in a compiled run each break would split the step
into separately compiled pieces with a return to Python between them. (The compiled step itself
ran on an H200 for MAE ViT-B: docs/PERFORMANCE.md.)"""
import pytest
import torch

from benchmark import FAMILIES, build_step


@pytest.mark.parametrize('name', [small for small, _ in FAMILIES.values()])
def test_training_step_is_one_graph(name):
    model, loss_fn, batch = build_step(name, 2, None)[:3]
    torch._dynamo.reset()
    loss = loss_fn(torch.compile(model, backend='eager', fullgraph=True), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_compile_is_the_default_with_cuda_only():
    from util.compiling import compiles_by_default
    assert compiles_by_default('cuda', deterministic=False)
    assert not compiles_by_default('cuda', deterministic=True)  # --align compares eager kernels
    assert not any(compiles_by_default(device, False) for device in ('cpu', 'mps', 'npu', 'sdaa'))


def test_compiling_an_alignment_run_is_said(capsys):
    """--align compares a run with another device's eager one: --compile given with it is honoured, and
    a line says what it does to the comparison; an --align run compiles nothing unless told."""
    import argparse
    from util.compiling import resolve_compile
    for given, mode, deterministic in ((True, None, True), (None, 'reduce-overhead', True), (True, None, False),
                                       (None, None, True)):
        args = argparse.Namespace(compile=given, compile_mode=mode)
        resolve_compile(args, 'cuda', deterministic)
        asked = given or mode is not None
        assert args.compile == (asked or not deterministic)
        assert ('warning: --align with --compile' in capsys.readouterr().out) == (asked and deterministic)


def losses_of_run(data_path, output_dir, *flags):
    from helpers import read_jsonl, run_pretrain
    run_pretrain('--model', 'mae_vit_tiny', '--data_path', data_path, '--batch_size', 8, '--epochs', 1, '--max_steps', 2,
                 '--log_freq', 1, '--num_workers', 0, '--device', 'cpu', '--output_dir', output_dir, *flags)
    return [r['loss'] for r in read_jsonl(output_dir / 'log.jsonl')]


def test_a_compiled_run_logs_the_eager_runs_losses_and_a_failed_compilation_falls_back(small_folder, tmp_path,
                                                                                        monkeypatch, capsys):
    """--compile in the real loop: TorchDynamo's graphs run by AOTAutograd without code generation
    (backend aot_eager: Inductor's compilation takes minutes on a CPU) log the losses of the eager
    run; --compile_mode reaches torch.compile (and turns compiling on); a backend that fails to
    compile costs one line, and the run trains eagerly."""
    from util import compiling
    eager = losses_of_run(small_folder, tmp_path / 'eager')
    assert 'torch.compile' not in capsys.readouterr().out  # off by default on the CPU

    compile_with, modes = {'backend': 'aot_eager'}, []

    def compile_without_codegen(model, mode):
        modes.append(mode)
        return torch._dynamo.optimize(**compile_with)(model)
    monkeypatch.setattr(compiling.torch, 'compile', compile_without_codegen)
    torch._dynamo.reset()
    assert losses_of_run(small_folder, tmp_path / 'compiled', '--compile') == pytest.approx(eager, rel=1e-6)
    out = capsys.readouterr().out
    assert 'torch.compile failed' not in out
    assert 'torch.compile (mode default) compiles the training step in its first call' in out  # why step 1 is slow

    def broken_backend(graph, example_inputs):
        raise RuntimeError('no C++ compiler found')
    compile_with['backend'] = broken_backend
    torch._dynamo.reset()
    # a mode alone turns compiling on, and reaches torch.compile
    assert losses_of_run(small_folder, tmp_path / 'fallback', '--compile_mode', 'reduce-overhead') == eager
    assert modes == ['default', 'reduce-overhead']
    out = capsys.readouterr().out
    assert out.count('torch.compile failed') == 1
    assert 'torch.compile failed (RuntimeError: no C++ compiler found): training without it (--no-compile skips it)' \
        in out


def test_a_compile_mode_without_compiling_is_refused(tmp_path):
    from util.errors import UsageError
    with pytest.raises(UsageError, match='^--compile_mode max-autotune is a mode of torch.compile, which --no-compile '
                                         'turns off: give one of the two$'):
        losses_of_run('demo', tmp_path, '--no-compile', '--compile_mode', 'max-autotune')


def test_the_fallback_is_the_model_to_the_loop():
    """What the loop asks of the model it steps: no_sync exactly where the model (DDP) has it, and
    the model's parameters once (the compiled module shares them)."""
    import contextlib

    from util.compiling import EagerFallback

    class WithNoSync(torch.nn.Linear):
        def no_sync(self):
            return contextlib.nullcontext()
    plain, synced = torch.nn.Linear(2, 2), WithNoSync(2, 2)
    assert hasattr(EagerFallback(synced, torch.compile(synced)), 'no_sync')
    assert not hasattr(EagerFallback(plain, torch.compile(plain)), 'no_sync')
    assert list(EagerFallback(plain, torch.compile(plain)).parameters()) == list(plain.parameters())
