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
    model, loss_fn, batch, _ = build_step(name, 2, None)
    torch._dynamo.reset()
    loss = loss_fn(torch.compile(model, backend='eager', fullgraph=True), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
