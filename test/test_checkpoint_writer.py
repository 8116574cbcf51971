"""Checkpoints written in the background (util.checkpoint_writer): the files hold what a
synchronous write holds, the state at the save and not a later one, a failed write is still one
line with the previous file intact, and every file is complete when a run ends, pre-empted or not."""
import copy
import os
import threading

import pytest
import torch

from helpers import NO_SPACE, disk_full, read_jsonl, run_finetune, run_pretrain
from util import checkpoint, engine
from util.checkpoint_writer import CheckpointWriter
from util.errors import Preempted, UsageError

COMMON = ['--model', 'mae_vit_tiny', '--num_workers', 0, '--device', 'cpu', '--log_freq', 2, '--warmup_epochs', 1,
          '--blr', 1e-3, '--batch_size', 16]
RUN_SPECIFIC = ('output_dir', 'log_dir', 'sync_checkpoints')  # args that differ between two runs compared


def assert_same_values(a, b, where='checkpoint'):
    """Every tensor (dtype, shape, values) and every other value of two loaded checkpoints equal."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        assert getattr(a, '_metadata', None) == getattr(b, '_metadata', None), where
        for key in a:
            assert_same_values(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_values(x, y, f'{where}[{i}]')
    else:
        assert a == b, where


def without_run_specific_args(ckpt):
    ckpt['args'] = {k: v for k, v in ckpt['args'].items() if k not in RUN_SPECIFIC}
    return ckpt


def test_background_and_synchronous_writes_hold_the_same_checkpoints(small_folder, tmp_path):
    flags = [*COMMON, '--data_path', small_folder, '--epochs', 2, '--save_every_steps', 3]
    run_pretrain(*flags, '--output_dir', tmp_path / 'background')
    run_pretrain(*flags, '--sync_checkpoints', '--output_dir', tmp_path / 'sync')
    for name in (checkpoint.LAST, 'checkpoint-0.pth', 'checkpoint-1.pth'):
        background = without_run_specific_args(checkpoint.load(tmp_path / 'background' / name))
        sync = without_run_specific_args(checkpoint.load(tmp_path / 'sync' / name))
        assert_same_values(background, sync, name)
    # logged every 2 steps, at each epoch's end (4 steps of 16 of the 64 images) and at each step that
    # saves within an epoch (3, 6), so that a run resumed from one of those logs the same intervals
    assert [r['step'] for r in read_jsonl(tmp_path / 'background' / 'log.jsonl')] == [2, 3, 4, 6, 8]
    files = [sorted(f for f in os.listdir(tmp_path / run) if '.pth' in f) for run in ('background', 'sync')]
    assert files[0] == files[1]  # and no temporary file left
    epochs = read_jsonl(tmp_path / 'background' / 'log.txt')
    assert all(e['checkpoint_stall_s'] >= 0 and e['checkpoint_write_s'] > 0 for e in epochs)
    # written in the training thread, the whole write holds training up
    assert all(e['checkpoint_stall_s'] >= e['checkpoint_write_s'] > 0 for e in read_jsonl(tmp_path / 'sync' / 'log.txt'))


def test_the_best_fine_tuning_checkpoint_is_written_from_the_epochs_copy(small_folder, tmp_path):
    run_finetune('--model', 'vit_tiny_patch8', '--data_path', small_folder, '--batch_size', 16, '--epochs', 1,
                 '--max_steps', 2, '--num_workers', 0, '--device', 'cpu', '--output_dir', tmp_path)
    best, last = checkpoint.load(tmp_path / checkpoint.BEST), checkpoint.load(tmp_path / checkpoint.LAST)
    assert sorted(best) == ['acc1', 'args', 'epoch', 'model'] and best['epoch'] == 0
    assert_same_values(best['model'], last['model'])


def trained_state():
    """A small model and its AdamW state after one step, as a training checkpoint holds them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 8)).square().mean().backward()
    optimizer.step()
    return model, optimizer


def later_step(model, optimizer):
    """What training does right after a save: the weights and the moments change in place."""
    model(torch.randn(5, 8)).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


@pytest.fixture
def held_writes(monkeypatch):
    """torch.save in the writer's thread waits until the test lets it go: the write runs after
    the training thread has moved on."""
    release, save = threading.Event(), torch.save

    def held_save(obj, f):
        assert release.wait(timeout=60)
        save(obj, f)
    monkeypatch.setattr(torch, 'save', held_save)
    return release


def test_the_state_written_is_the_state_at_the_save(tmp_path, held_writes):
    model, optimizer = trained_state()
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 3}
    at_save = copy.deepcopy(state)
    writer = CheckpointWriter()
    writer.save({tmp_path / 'last.pth': state, tmp_path / 'best.pth': {'model': state['model']}})
    later_step(model, optimizer)
    held_writes.set()
    writer.wait()
    assert_same_values(checkpoint.load(tmp_path / 'last.pth'), at_save)
    assert_same_values(checkpoint.load(tmp_path / 'best.pth'), {'model': at_save['model']})

    # the next save reuses the host buffers, and writes the new state
    buffers = {key: b.data_ptr() for key, b in writer.buffers.items()}
    now = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 4}
    writer.save({tmp_path / 'last.pth': now})
    writer.close()
    assert {key: b.data_ptr() for key, b in writer.buffers.items()} == buffers
    assert_same_values(checkpoint.load(tmp_path / 'last.pth'), copy.deepcopy(now))


def test_a_failed_background_write_is_one_line_at_the_next_save_and_the_previous_file_stays(tmp_path, monkeypatch,
                                                                                            capsys):
    path = str(tmp_path / checkpoint.LAST)
    writer = CheckpointWriter()
    writer.save({path: {'epoch': 1}})
    writer.wait()
    monkeypatch.setattr(torch, 'save', disk_full)
    writer.save({path: {'epoch': 2}})  # fails in the thread
    with pytest.raises(UsageError, match="^" + NO_SPACE) as failed:
        writer.save({path: {'epoch': 3}})
    assert '\n' not in str(failed.value)
    writer.save({path: {'epoch': 4}})
    with pytest.raises(UsageError, match="^" + NO_SPACE):  # the end of the run
        writer.wait()
    # another error ends the run while a write fails: that error stays, the failure is printed
    writer.save({path: {'epoch': 5}})
    with pytest.raises(KeyError):
        try:
            raise KeyError('the error that ended the run')
        finally:
            writer.close()
    assert 'error: cannot write' in capsys.readouterr().err
    monkeypatch.undo()
    assert checkpoint.load(path)['epoch'] == 1
    assert os.listdir(tmp_path) == [checkpoint.LAST]


def test_a_run_whose_last_write_fails_ends_with_one_line_and_keeps_the_previous_file(small_folder, tmp_path,
                                                                                      monkeypatch):
    flags = [*COMMON, '--data_path', small_folder, '--output_dir', tmp_path]
    run_pretrain(*flags, '--epochs', 1)
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(UsageError, match="^" + NO_SPACE):
        run_pretrain(*flags, '--epochs', 2)  # epoch 1's write fails in the background, after its last step
    monkeypatch.undo()
    assert checkpoint.load(tmp_path / checkpoint.LAST)['epoch'] == 0


def test_preemption_exits_only_once_the_checkpoint_is_written(small_folder, tmp_path, monkeypatch):
    """The pre-emption exit (code 4) says checkpoint-last.pth is written: with a slow write the file
    is complete when Preempted is raised, and a write that fails is the UsageError instead."""
    from util import signals
    monkeypatch.setattr(signals, 'stop_agreed', lambda: True)  # a signal during the first step
    save = torch.save

    def slow_save(obj, f):
        threading.Event().wait(0.5)
        save(obj, f)
    monkeypatch.setattr(torch, 'save', slow_save)

    class CheckedPreempted(Preempted):
        def __init__(self, message):
            super().__init__(message)
            self.step = checkpoint.load(tmp_path / checkpoint.LAST)['step']  # the file when the exit is decided
    monkeypatch.setattr(engine, 'Preempted', CheckedPreempted)
    flags = [*COMMON, '--data_path', small_folder, '--epochs', 2, '--output_dir', tmp_path]
    with pytest.raises(Preempted) as stopped:
        run_pretrain(*flags)
    assert stopped.value.step == 1
    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(UsageError, match="^" + NO_SPACE):
        run_pretrain(*flags)  # resumes at step 1, stops after step 2, and cannot write it
    assert checkpoint.load(tmp_path / checkpoint.LAST)['step'] == 1
