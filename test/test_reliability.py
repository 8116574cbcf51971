"""Runs that survive pre-emption, a killed worker and a changed cluster: SIGTERM, SIGUSR1 and
Ctrl-C stop after the current step with checkpoint-last.pth and exit code 4, and the resumed run logs what the
uninterrupted one logs; `torchrun --max-restarts` with --save_every_steps finishes a run whose
worker was killed; a run stopped on 2 processes x 8 resumes on 1 x 16 exactly; another
effective batch is refused."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import REPO, RESUMABLE, losses_by_step, read_jsonl, run_pretrain, run_script
from util import checkpoint
from util.errors import EXIT_PREEMPTED, UsageError

@pytest.fixture
def uninterrupted(uninterrupted):
    """conftest's uninterrupted run: its losses of steps 1..12."""
    return uninterrupted[1]


def wait_for_step(output_dir, step, process, timeout=120):
    """Block until the run in output_dir has logged `step` (or has ended)."""
    path = os.path.join(output_dir, 'log.jsonl')
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(path) and any(r['step'] >= step for r in read_jsonl(path)):
            return
        time.sleep(0.05)
    raise AssertionError(f'the run did not reach step {step}')


def start(*argv):
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_stop_signals_end_start_up_at_once_and_training_after_its_step():
    """Before the loop trains there is nothing to save: a signal ends the run at once (exit 4,
    one line). While it trains, SIGTERM, SIGUSR1 and SIGINT are noted for the loop to act on after
    the step; a second Ctrl-C stops at once."""
    from util import signals
    from util.errors import Preempted
    try:
        signals.catch_signals()
        with pytest.raises(Preempted, match='stopped by SIGTERM outside the training loop'):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes: well before this ends
        for signum in signals.STOP_SIGNALS:
            signals.catch_signals()
            with signals.training():
                assert not signals.stop_agreed()
                os.kill(os.getpid(), signum)
                assert signals.stop_agreed() and signals.received() == signal.Signals(signum).name
        with signals.training(), pytest.raises(Preempted, match='second SIGINT'):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signals._received.clear()
        for signum in signals.STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def stop_the_group_of_a_run(flags, output_dir, step, signum):
    """Start main_pretrain in a process group of its own, send `signum` to the whole group (its
    data-loader worker included) once it has logged `step`, and check that it stopped cleanly:
    exit 4, no traceback, its last line naming the signal. returns: the step it stopped after"""
    process = subprocess.Popen([sys.executable, 'main_pretrain.py', *map(str, flags)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(output_dir, step, process)
    os.killpg(process.pid, signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-2000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f'error: stopped by {signal.Signals(signum).name} after step ')
    return int(last_line.split('after step ')[1].split()[0])


def test_ctrl_c_stops_cleanly_and_the_resumed_run_logs_the_same_losses(small_folder, tmp_path, uninterrupted):
    """Ctrl-C in a terminal: SIGINT to the whole process group, the data-loader worker included.
    The run finishes its step, writes checkpoint-last.pth and exits with 4 without a traceback;
    started again it logs what the uninterrupted run logs (whose worker count differs: the
    samples do not depend on it)."""
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--output_dir', tmp_path, '--num_workers', 1]
    stopped_at = stop_the_group_of_a_run(flags, tmp_path, 5, signal.SIGINT)
    ckpt = checkpoint.load(tmp_path / checkpoint.LAST)
    assert ckpt['step'] == stopped_at and stopped_at < 12
    assert ckpt['epoch_samples'] == (stopped_at % 4) * 16  # the samples of the unfinished epoch
    run_pretrain(*flags)  # started again: resumes by itself
    assert losses_by_step(tmp_path) == uninterrupted  # bit for bit, step for step


def test_a_stop_at_the_last_step_of_an_epoch_leaves_the_epoch_to_the_resumed_run(small_folder, tmp_path,
                                                                                  uninterrupted, monkeypatch):
    """A signal in the last step of epoch 0: the checkpoint recorded the epoch as finished, so
    that epoch was never logged in log.txt (nor evaluated, in fine-tuning). Now the resumed run
    finishes it without a step: it logs it with the loss of its 4 steps, then goes on."""
    from util import signals
    from util.errors import Preempted
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--output_dir', tmp_path]
    steps = []
    monkeypatch.setattr(signals, 'stop_agreed', lambda: steps.append(1) or len(steps) == 4)
    with pytest.raises(Preempted, match='after step 4 '):
        run_pretrain(*flags)
    monkeypatch.undo()
    run_pretrain(*flags)
    epochs = read_jsonl(tmp_path / 'log.txt')
    assert [e['epoch'] for e in epochs] == [0, 1, 2]
    assert epochs[0]['train_loss'] == pytest.approx(sum(uninterrupted[s] for s in range(1, 5)) / 4, rel=1e-6)
    assert losses_by_step(tmp_path) == uninterrupted


def test_a_stop_at_the_end_of_an_epoch_trains_no_step_of_the_next(small_folder, tmp_path, uninterrupted, monkeypatch):
    """A signal during the end of an epoch (fine-tuning's evaluation, the saves) was acted on after
    the first step of the next epoch, which was trained and saved first. Now the run stops with the
    epoch's checkpoint, and the resumed run goes on from the next epoch's first step."""
    from util import signals
    from util.errors import Preempted
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--output_dir', tmp_path]
    calls = []  # one a step, one at the end of each epoch: the 5th is the end of epoch 0's 4 steps
    monkeypatch.setattr(signals, 'stop_agreed', lambda: calls.append(1) or len(calls) == 5)
    with pytest.raises(Preempted, match=r'after step 4 \(the end of epoch 0\); checkpoint-last.pth is written'):
        run_pretrain(*flags)
    assert checkpoint.load(tmp_path / checkpoint.LAST)['step'] == 4
    assert max(r['step'] for r in read_jsonl(tmp_path / 'log.jsonl')) == 4
    monkeypatch.undo()
    run_pretrain(*flags)
    assert [e['epoch'] for e in read_jsonl(tmp_path / 'log.txt')] == [0, 1, 2]
    assert losses_by_step(tmp_path) == uninterrupted


def test_a_stop_during_fine_tunings_evaluation_ends_it_and_the_resumed_run_evaluates_the_epoch(small_folder, tmp_path,
                                                                                               monkeypatch):
    """A signal during the evaluation after an epoch waited for the whole validation pass (minutes on a slow device,
    longer than a scheduler's grace time) before the checkpoint was written. Now the evaluation stops, the epoch's
    training is kept, and the resumed run evaluates it and goes on: the log of the two launches is the
    uninterrupted run's."""
    from helpers import run_finetune
    from util import signals
    from util.errors import Preempted
    flags = ['--model', 'vit_tiny_patch8', '--data_path', small_folder, '--batch_size', 16, '--epochs', 2,
             '--num_workers', 0, '--device', 'cpu', '--aa', 'none', '--reprob', 0, '--mixup', 0, '--cutmix', 0]
    run_finetune(*flags, '--output_dir', tmp_path / 'whole')
    evaluating = []  # the agreement at each batch of an evaluation, after its count of batches

    monkeypatch.setattr(signals, 'fewest_over_ranks', lambda count: evaluating.append(count) or count)
    monkeypatch.setattr(signals, 'stop_agreed', lambda: bool(evaluating))
    with pytest.raises(Preempted, match=r'in the evaluation after an epoch, whose training is kept for the resumed '
                                        r'run to evaluate; checkpoint-last.pth is written: run the same command again '
                                        r'to resume$'):
        run_finetune(*flags, '--output_dir', tmp_path / 'stopped')
    assert not (tmp_path / 'stopped' / 'log.txt').exists()  # epoch 0 neither evaluated nor logged
    assert checkpoint.load(tmp_path / 'stopped' / checkpoint.LAST)['step'] == 4  # epoch 0's 64 images trained
    monkeypatch.undo()
    run_finetune(*flags, '--output_dir', tmp_path / 'stopped')
    whole, resumed = (read_jsonl(tmp_path / run / 'log.txt') for run in ('whole', 'stopped'))
    assert [(e['epoch'], e['test_acc1']) for e in resumed] == [(e['epoch'], e['test_acc1']) for e in whole]


def test_sigterm_to_the_whole_group_stops_cleanly(small_folder, tmp_path):
    """GNU timeout, `kill -TERM -<pgid>` and schedulers signal every process of a job, the
    data-loader worker included: the worker leaves it to the run (a worker killed by it broke
    the step with torch's 'DataLoader worker ... is killed by signal'), which finishes its step,
    writes checkpoint-last.pth and exits with 4."""
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--output_dir', tmp_path, '--num_workers', 1]
    stopped_at = stop_the_group_of_a_run(flags, tmp_path, 3, signal.SIGTERM)
    assert checkpoint.load(tmp_path / checkpoint.LAST)['step'] == stopped_at


def child_pids(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(not os.path.exists(f'/proc/{os.getpid()}/task/{os.getpid()}/children'),
                    reason='finding torchrun\'s worker needs Linux /proc')
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_from_its_last_steps(small_folder, tmp_path,
                                                                                   uninterrupted):
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--save_every_steps', 1,
             '--output_dir', tmp_path]
    process = start('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', 1, '--max-restarts', 1,
                    'main_pretrain.py', *flags)
    wait_for_step(tmp_path, 7, process)
    for worker in child_pids(process.pid):
        os.kill(worker, signal.SIGKILL)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr[-3000:]
    records = read_jsonl(tmp_path / 'log.jsonl')
    assert records[-1]['step'] == 12
    # every step is logged; a step the killed worker logged after its last checkpoint is redone the same
    assert {r['step']: r['loss'] for r in records} == uninterrupted
    restart = next(i for i in range(1, len(records)) if records[i]['step'] <= records[i - 1]['step'])
    # --save_every_steps 1: the restarted worker goes on from a step of epoch 1, not from the end of
    # epoch 0 (step 4). Step 7 was logged before the kill; the write of step 6's checkpoint may have
    # been under way (one background write at a time: step 6's save waited for step 5's write)
    assert records[restart]['step'] >= 6


def test_two_processes_stopped_mid_epoch_resume_as_one_exactly(small_folder, tmp_path, uninterrupted):
    """2 processes x 8 images stop after 6 steps (in the middle of epoch 1); 1 process x 16, and
    1 process x 8 x 2 micro-batches, finish the run on the samples that were left, and log what the
    uninterrupted 1 x 16 run logs (to the rounding of a 2-process gradient average)."""
    import shutil
    flags = [*RESUMABLE, '--data_path', small_folder]
    result = run_script(sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', 2,
                        'main_pretrain.py', *flags, '--batch_size', 8, '--max_steps', 6, '--output_dir', tmp_path / 'a')
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = checkpoint.load(tmp_path / 'a' / checkpoint.LAST)
    assert (ckpt['epoch'], ckpt['epoch_samples'], ckpt['effective_batch']) == (0, 32, 16)
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    with pytest.raises(UsageError, match='effective batch of 16 images .* this run has 8'):
        run_pretrain(*flags, '--batch_size', 8, '--output_dir', tmp_path / 'a')
    run_pretrain(*flags, '--batch_size', 16, '--output_dir', tmp_path / 'a')
    run_pretrain(*flags, '--batch_size', 8, '--accum_iter', 2, '--output_dir', tmp_path / 'b')
    for resumed in (losses_by_step(tmp_path / 'a'), losses_by_step(tmp_path / 'b')):
        assert sorted(resumed) == sorted(uninterrupted)
        for step, loss in uninterrupted.items():
            assert resumed[step] == pytest.approx(loss, rel=1e-4), step
    # the epoch cut in two reports the mean over all its steps (5..8, equal batches), not over the
    # resumed run's steps 7 and 8 alone
    epochs = {r['epoch']: r['train_loss'] for r in read_jsonl(tmp_path / 'a' / 'log.txt')}
    assert epochs[1] == pytest.approx(sum(uninterrupted[step] for step in range(5, 9)) / 4, rel=1e-4)


def test_exit_codes_say_why_a_run_ended():
    """2: bad input; 3: the loss diverged; 4: pre-empted, with a checkpoint to resume from."""
    from util.engine import TrainingDiverged
    from util.errors import Preempted, run_cli
    for error, code in ((UsageError('bad flag'), 2), (TrainingDiverged('loss is nan'), 3), (Preempted('SIGTERM'), 4)):
        def main():
            raise error
        with pytest.raises(SystemExit) as ended:
            run_cli(main)
        assert ended.value.code == code


def test_an_error_of_another_rank_is_printed_with_its_rank(monkeypatch, capsys):
    """print() is rank 0's alone once the processes meet: rank 1's own error (an unreadable image in
    its shard) was never shown, and torchrun said only that rank 0 was stopped. A stop signal,
    which every rank receives, stays rank 0's to report."""
    import builtins
    from util import dist
    from util.errors import Preempted, run_cli
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setattr(builtins, 'print', builtins.print)  # restored after the silencing below
    dist.print_only_on_main_process(False)
    for error, expected in ((UsageError('unreadable image x.jpg'), 'error: rank 1: unreadable image x.jpg\n'),
                            (Preempted('stopped by SIGTERM'), '')):
        def main():
            raise error
        with pytest.raises(SystemExit):
            run_cli(main)
        assert capsys.readouterr().err == expected
    # the rank left waiting in a collective for the one that ended: a line, not Gloo's traceback of 40
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '2')

    def main():
        raise RuntimeError('[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:60568. This is '
                           'typically caused by a remote worker crashing. Check the logs of the remote worker.')
    with pytest.raises(SystemExit) as ended:
        run_cli(main)
    assert ended.value.code == 1 and capsys.readouterr().err == (
        'error: another process of the run ended while this one waited for it in a collective operation (connection '
        'closed by peer): its own error line, or its log, says why\n')


def test_a_stop_signal_while_the_process_exits_keeps_its_exit_code_without_a_traceback(tmp_path):
    """A second Ctrl-C after the run's last line, while the interpreter runs its exit handlers (a
    slow one here), broke into the handler with 'Exception ignored in atexit callback' and a
    traceback; the process now ends at once with the exit status it was ending with."""
    script = tmp_path / 'command.py'
    script.write_text('import argparse, atexit, time\n'
                      'from util.errors import UsageError, run_command\n'
                      'def main(args):\n'
                      '    atexit.register(time.sleep, 60)\n'
                      '    raise UsageError("bad flag")\n'
                      'run_command(main, argparse.ArgumentParser)\n')
    process = subprocess.Popen([sys.executable, script], cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stderr.readline() == 'error: bad flag\n'
    time.sleep(0.5)  # into the exit handler
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 2 and stderr == ''


def test_a_stop_signal_ends_the_wait_for_processes_that_never_come(tmp_path):
    """Rank 1 of 2 started by hand, with no rank 0 anywhere: it says what it waits for, and Ctrl-C
    ends the wait at once (torch's store retried the connect the signal interrupted for 30 minutes,
    while the handler that would have stopped it waited for the wait to end; SIGTERM and SIGUSR1,
    the other stop signals, are set alike)."""
    signum = signal.SIGINT
    import socket
    with socket.socket() as s:  # a port no process listens on
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {**os.environ, 'RANK': '1', 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port)}
    flags = [*RESUMABLE, '--data_path', 'demo', '--output_dir', tmp_path / 'out']
    process = subprocess.Popen([sys.executable, 'main_pretrain.py', *map(str, flags)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == f'rank 1 of 2: waiting for the other processes at 127.0.0.1:{port} (up ' \
            f'to 30 minutes; Ctrl-C stops)\n'
        time.sleep(1)  # into the wait
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()  # a process still waiting
    assert process.returncode == -signum, stderr[-2000:]
    assert not (tmp_path / 'out').exists()  # nothing written before the processes meet


def test_a_damaged_last_checkpoint_names_the_newest_epoch_checkpoint(small_folder, tmp_path):
    for epoch in (3, 7):
        torch.save({'epoch': epoch}, tmp_path / f'checkpoint-{epoch}.pth')
    torch.save({'epoch': 8, 'model': {'w': torch.zeros(1000)}}, tmp_path / checkpoint.LAST)
    data = (tmp_path / checkpoint.LAST).read_bytes()
    (tmp_path / checkpoint.LAST).write_bytes(data[:len(data) // 2])  # a write cut short by a crash
    with pytest.raises(UsageError, match=r"cannot load .*checkpoint-last.pth.* Resume from the newest epoch "
                                         r"checkpoint instead: --resume .*checkpoint-7.pth") as error:
        run_pretrain(*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--output_dir', tmp_path)
    # torch's reason in its first sentence, not the paragraph of advice that follows it
    assert re.search(r"as a checkpoint \(PytorchStreamReader failed reading zip archive: [^.]*\): is it a complete",
                     str(error.value)) and 'miniz' not in str(error.value)


def test_resuming_another_models_or_modes_checkpoint_is_one_line(small_folder, tmp_path):
    from helpers import run_finetune
    def finetune(*flags, output_dir=tmp_path):
        run_finetune('--model', 'vit_tiny_patch8', '--data_path', small_folder, '--num_workers', 0, '--device', 'cpu',
                     *flags, '--output_dir', output_dir)

    def pretrain(*flags, output_dir=tmp_path):
        run_pretrain(*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, *flags, '--output_dir', output_dir)

    def write(**args):
        torch.save({'model': {}, 'optimizer': {}, 'epoch': 0, 'args': args}, tmp_path / checkpoint.LAST)

    write(model='vit_tiny_patch8', linprobe=True, finetune='')  # main_finetune's args hold --finetune
    with pytest.raises(UsageError, match='written by a run with --linprobe True, this run has False'):
        finetune()
    with pytest.raises(UsageError, match=r"is a checkpoint of main_finetune.py \(--model vit_tiny_patch8\), which "
                                         r"pre-training cannot resume: start a new run in another --output_dir"):
        pretrain()
    # given with --resume into a new folder: the flag is what to change
    with pytest.raises(UsageError, match=r"pre-training cannot resume: give a pre-training checkpoint to --resume, or "
                                         r"leave it out$"):
        pretrain('--resume', tmp_path / checkpoint.LAST, output_dir=tmp_path / 'new')
    write(model='mae_hivit_tiny', mask_ratio=0.75)
    with pytest.raises(UsageError, match='written by a run with --model mae_hivit_tiny, this run has mae_vit_tiny'):
        pretrain()
    with pytest.raises(UsageError, match=r"is a pre-training checkpoint \(--model mae_hivit_tiny\), which "
                                         r"fine-tuning cannot resume: start from its weights with --finetune"):
        finetune()
    # given to both --resume and --finetune: --resume is what to leave out
    with pytest.raises(UsageError, match=r"fine-tuning cannot resume: leave out --resume: --finetune gives the weights "
                                         r"to start from$"):
        finetune('--finetune', tmp_path / checkpoint.LAST, '--resume', tmp_path / checkpoint.LAST,
                 output_dir=tmp_path / 'new')
    # fine-tuning that run's weights in its own folder: the folder is what to change
    with pytest.raises(UsageError, match=rf"^--output_dir {tmp_path} holds a pre-training run \(.*checkpoint-last.pth, "
                                         rf"--model mae_hivit_tiny\), which fine-tuning would resume: give the "
                                         rf"fine-tuning another --output_dir$"):
        finetune('--finetune', tmp_path / checkpoint.LAST)


def test_a_run_resumes_under_its_models_other_name():
    """mae_vit_tiny is the alias of mae_vit_tiny_patch8 (the README lists both): a run started under
    one name resumed under the other was refused as another model's."""
    from argparse import Namespace
    from util.checkpoint import check_same_kind_of_run
    ckpt = {'model': {}, 'optimizer': {}, 'epoch': 0, 'args': {'model': 'mae_vit_tiny_patch8', 'mask_ratio': 0.75}}
    check_same_kind_of_run(ckpt, 'last.pth', Namespace(model='mae_vit_tiny', resume='', output_dir='run'))
    with pytest.raises(UsageError, match='--model mae_vit_tiny_patch8, this run has simmim_vit_tiny'):
        check_same_kind_of_run(ckpt, 'last.pth', Namespace(model='simmim_vit_tiny', resume='', output_dir='run'))


def test_every_rank_stops_where_rank_0_cannot_lock_the_output_dir(monkeypatch):
    """Rank 0 alone locks --output_dir: where another run held it, rank 0 stopped with that line,
    and the other ranks went on to resume the other run's checkpoint (and failed on its effective
    batch). Each rank here plays its part with rank 0's answer passed as the collective would."""
    from util import launch, signals
    held = 'another run is using --output_dir run (pid 7 on host): wait for it to end'
    sent = []

    def lock(output_dir):
        raise UsageError(held)
    monkeypatch.setattr(launch, 'lock_output_dir', lock)
    monkeypatch.setattr(signals, 'main_process_value', lambda value: sent.append(value) or value)
    monkeypatch.setattr(launch.dist, 'is_main_process', lambda: True)
    with pytest.raises(UsageError, match=f'^{re.escape(held)}$'):
        launch.lock_for_every_rank('run')
    assert sent == [held]  # rank 0 passes its line on
    monkeypatch.setattr(launch, 'lock_output_dir', lambda output_dir: pytest.fail('only rank 0 locks'))
    monkeypatch.setattr(launch.dist, 'is_main_process', lambda: False)
    monkeypatch.setattr(signals, 'main_process_value', lambda value: held)  # rank 0's, broadcast
    with pytest.raises(UsageError, match=f'^{re.escape(held)}$'):
        launch.lock_for_every_rank('run')
    monkeypatch.setattr(signals, 'main_process_value', lambda value: None)  # rank 0 holds the lock
    launch.lock_for_every_rank('run')


def test_a_second_run_in_the_same_output_dir_refuses_until_the_first_ends(small_folder, tmp_path):
    from util.output_dir import lock_output_dir, release_output_dir_locks
    holder = start('-c', f'import sys, time; sys.path.insert(0, {REPO!r}); from util.output_dir import lock_output_dir; '
                         f'lock_output_dir({str(tmp_path)!r}); print("locked", flush=True); time.sleep(600)')
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(UsageError, match=f'another run is using --output_dir {tmp_path} \\(pid {holder.pid} on '):
        run_pretrain(*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--output_dir', tmp_path)
    holder.kill()  # a crash: the lock goes with the process
    holder.wait()
    lock_output_dir(str(tmp_path))
    release_output_dir_locks()


def test_a_fresh_run_does_not_inherit_an_old_best_accuracy(small_folder, tmp_path):
    from helpers import run_finetune
    (tmp_path / 'log.txt').write_text('{"epoch": 0, "test_acc1": 99.9}\n')  # an old run's, without checkpoints
    run_finetune('--model', 'vit_tiny_patch8', '--data_path', small_folder, '--batch_size', 16, '--epochs', 1,
                 '--max_steps', 1, '--num_workers', 0, '--device', 'cpu', '--output_dir', tmp_path)
    assert os.path.isfile(tmp_path / checkpoint.BEST)


def test_a_log_line_a_killed_run_cut_short_is_skipped_and_the_resumed_run_logs_after_it(tmp_path):
    """A SIGKILL or a full disk in the middle of a write leaves the last line of log.txt without its end: the
    resumed fine-tuning run read it for its best accuracy so far and ended in JSONDecodeError at every restart,
    and its first record was written onto that line."""
    from main_finetune import best_accuracy_so_far
    from util.logger import RunLogger, read_json_lines
    log = tmp_path / 'log.txt'
    log.write_text('{"epoch": 0, "test_acc1": 40.0}\n{"epoch": 1, "test_acc1": 55.5}\n{"epoch": 2, "train_lo')
    assert best_accuracy_so_far(tmp_path) == 55.5
    RunLogger(tmp_path, None, enabled=True).log_epoch({'epoch': 2, 'test_acc1': 60.0})
    assert [r['epoch'] for r in read_json_lines(log)] == [0, 1, 2]
    assert log.read_text().splitlines()[-1] == '{"epoch": 2, "test_acc1": 60.0}'


def test_evaluation_counts_without_float64():
    """MPS has no float64: the evaluation must count in int64 and sum the loss in float32 (here
    any float64 tensor made during the evaluation fails the test), and still be exact."""
    from torch.overrides import TorchFunctionMode
    from util.device import Device
    from util.engine import evaluate

    class NoFloat64(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                raise AssertionError(f'{func} made a float64 tensor')
            return out

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    images, targets = torch.randn(10, 4), torch.randint(0, 3, (10,))
    loader = [(images[:6], targets[:6]), (images[6:], targets[6:])]
    with NoFloat64():
        stats = evaluate(model, loader, Device('cpu', None), 'fp32')
    logits = model(images)
    assert stats['images'] == 10
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    assert stats['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
