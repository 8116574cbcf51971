"""--grad_ckpt: activation checkpointing gives the same loss and gradients with far fewer tensors
kept for the backward pass, for every method's model and for a classifier with drop path."""
import pytest
import torch

from helpers import read_jsonl, run_pretrain
from util.registry import create_classifier, create_pretrain_model


def saved_bytes_and_grads(model, loss_of, seed=0):
    """Bytes of the tensors autograd keeps for the backward pass, the loss, and the gradients."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor
    torch.manual_seed(seed)  # the same drop-path draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return sum(saved), loss.detach(), grads


def pretraining_loss(images, masks):
    return lambda model: model(images, **masks)[0]


MODELS = {  # name: the keyword arguments of forward that fix the mask
    'mae_vit_tiny': lambda n: {'noise': torch.rand(n, 64)},
    'mae_hivit_tiny': lambda n: {'noise': torch.rand(n, 64)},
    'simmim_swin_tiny': lambda n: {'mask': (torch.rand(n, 16, 16) < 0.6).float()},
    'simmim_vit_tiny': lambda n: {'mask': (torch.rand(n, 8, 8) < 0.6).float()},
    'maskfeat_vit_tiny': lambda n: {'mask': (torch.rand(n, 8, 8) < 0.4).float()},
}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_pretraining_models_checkpoint_their_blocks(name):
    torch.manual_seed(0)
    model = create_pretrain_model(name)
    images, masks = torch.randn(2, 3, 64, 64), MODELS[name](2)
    plain = saved_bytes_and_grads(model, pretraining_loss(images, masks))
    model.set_grad_checkpointing(True)
    checkpointed = saved_bytes_and_grads(model, pretraining_loss(images, masks))
    assert checkpointed[0] < 0.5 * plain[0]  # each block keeps its input only
    torch.testing.assert_close(checkpointed[1], plain[1], rtol=1e-6, atol=1e-6)
    assert checkpointed[2].keys() == plain[2].keys()
    for key in plain[2]:
        torch.testing.assert_close(checkpointed[2][key], plain[2][key], rtol=1e-5, atol=1e-6, msg=key)


def test_drop_path_is_replayed_in_the_recomputation():
    """HiViT with drop path 0.3: the recomputed blocks draw the same paths, so the gradients match."""
    model = create_classifier('hivit_tiny_patch8_64', num_classes=10, drop_path_rate=0.3).train()
    images, targets = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    loss_of = lambda m: torch.nn.functional.cross_entropy(m(images), targets)  # noqa: E731
    plain = saved_bytes_and_grads(model, loss_of)
    model.set_grad_checkpointing(True)
    checkpointed = saved_bytes_and_grads(model, loss_of)
    assert checkpointed[0] < 0.5 * plain[0]
    torch.testing.assert_close(checkpointed[1], plain[1])
    for key in plain[2]:
        torch.testing.assert_close(checkpointed[2][key], plain[2][key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_flag_trains_as_without(small_folder, tmp_path):
    flags = ['--model', 'mae_vit_tiny', '--data_path', small_folder, '--batch_size', 8, '--epochs', 1, '--max_steps', 2,
             '--log_freq', 1, '--num_workers', 0, '--device', 'cpu']
    run_pretrain(*flags, '--output_dir', tmp_path / 'plain')
    run_pretrain(*flags, '--grad_ckpt', '--output_dir', tmp_path / 'ckpt')
    plain, ckpt = (read_jsonl(tmp_path / name / 'log.jsonl') for name in ('plain', 'ckpt'))
    assert [r['loss'] for r in ckpt] == pytest.approx([r['loss'] for r in plain], rel=1e-5)


def test_batchnorm_models_are_warned_that_their_statistics_update_twice(capsys):
    """What the warning says holds: the recomputed forward of a checkpointed BatchNorm block counts its
    batch again (timm's ResNet: 2 updates a step, not 1). Transformers have none: no warning."""
    import argparse
    import timm
    from util.compiling import compile_and_wrap
    args = argparse.Namespace(grad_ckpt=True, compile=False, compile_mode='default')
    resnet = compile_and_wrap(timm.create_model('resnet10t', num_classes=2), torch.device('cpu'), args)
    assert 'warning: --grad_ckpt recomputes each checkpointed forward' in capsys.readouterr().out
    resnet.train()
    resnet(torch.randn(2, 3, 32, 32)).sum().backward()
    assert resnet.layer1[0].bn1.num_batches_tracked.item() == 2
    compile_and_wrap(create_classifier('vit_tiny_patch8', img_size=32, num_classes=2), torch.device('cpu'), args)
    assert 'warning' not in capsys.readouterr().out
