"""The training loop end to end: the schedule, parameter groups, the demo run, resumption,
gradient accumulation, two processes, and what happens on bad input or a diverging loss."""
import math
import os
import shutil
import sys

import pytest
import torch

import compare_loss
from helpers import RESUMABLE, losses_by_step, read_jsonl, run_pretrain, run_script
from util import checkpoint
from util.errors import UsageError
from util.lr_sched import adjust_learning_rate, lr_at

COMMON = ['--model', 'mae_vit_tiny', '--input_size', 64, '--num_workers', 0, '--device', 'cpu', '--log_freq', 1]


def test_lr_schedule_known_points():
    lr, min_lr, warmup, epochs = 1e-3, 1e-5, 10, 110
    assert lr_at(0, lr, min_lr, warmup, epochs) == 0
    assert lr_at(2.5, lr, min_lr, warmup, epochs) == pytest.approx(lr * 0.25)
    assert lr_at(10, lr, min_lr, warmup, epochs) == pytest.approx(lr)
    # half-way through the cosine: cos(pi/2) = 0, the mean of lr and min_lr
    assert lr_at(60, lr, min_lr, warmup, epochs) == pytest.approx((lr + min_lr) / 2)
    # a quarter of the way: min + (lr - min) * (1 + cos(pi/4)) / 2
    assert lr_at(35, lr, min_lr, warmup, epochs) == pytest.approx(min_lr + (lr - min_lr) * (1 + 2 ** -0.5) / 2)
    assert lr_at(110, lr, min_lr, warmup, epochs) == pytest.approx(min_lr)


def test_adjust_learning_rate_scales_each_group():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    optimizer = torch.optim.SGD([{'params': [params[0]]}, {'params': [params[1]], 'lr_scale': 0.1}], lr=1)
    args = type('Args', (), dict(lr=2.0, min_lr=0.0, warmup_epochs=4, epochs=8))()
    assert adjust_learning_rate(optimizer, 1.0, args) == pytest.approx(0.5)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])


SCALES = (1.0, 0.65, 0.65 ** 5)  # three layer-decay groups


def flat(rows):
    return [x for row in rows for x in row]


def group_lrs_by_step(bounds, steps_per_epoch, epochs, **schedule):
    """The lr of each SCALES group at every optimizer step, as adjust_learning_rate sets them."""
    optimizer = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)], 'lr_scale': s} for s in SCALES],
                                lr=1.0)
    args = type('Args', (), dict(layer_lr_bounds=bounds, epochs=epochs, **schedule))()
    lrs = []
    for t in range(epochs * steps_per_epoch):
        adjust_learning_rate(optimizer, t / steps_per_epoch, args)
        lrs.append([g['lr'] for g in optimizer.param_groups])
    return lrs


def test_layer_decay_bounds_follow_each_official_schedule():
    """Under layer decay each group's peak lr is lr x its scale; what the warm-up starts from and the
    floor follow the official code of each method, compared step by step with it:
    - scaled (MAE's lr_sched.adjust_learning_rate, written out): the whole schedule times the scale;
    - shared (SimMIM: timm's CosineLRScheduler on groups whose lr is lr x scale): every group warms up
      from the same lr and ends at the same floor;
    - warmup_scaled (MaskFeat: mmpretrain's LinearLR(start_factor) then CosineAnnealingLR(eta_min), as
      torch's schedulers of the same names): the warm-up starts at a fraction of each group's lr, the
      floor is shared."""
    from timm.scheduler import CosineLRScheduler
    spe, epochs, warmup, lr, min_lr = 5, 12, 3, 1e-3, 1e-5

    def mae(t):
        epoch = t / spe
        at = lr * epoch / warmup if epoch < warmup else \
            min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))
        return [at * s for s in SCALES]
    ours = group_lrs_by_step('scaled', spe, epochs, lr=lr, min_lr=min_lr, warmup_epochs=warmup, warmup_lr=0.0)
    assert flat(ours) == pytest.approx(flat(mae(t) for t in range(epochs * spe)), rel=1e-9)

    warmup_lr = 1e-6
    optimizer = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)], 'lr': lr * s} for s in SCALES])
    timm_sched = CosineLRScheduler(optimizer, t_initial=epochs * spe, lr_min=min_lr, warmup_lr_init=warmup_lr,
                                   warmup_t=warmup * spe, cycle_limit=1, t_in_epochs=False)
    ours = group_lrs_by_step('shared', spe, epochs, lr=lr, min_lr=min_lr, warmup_epochs=warmup, warmup_lr=warmup_lr,
                             lr_schedule='cosine_whole_run')
    assert flat(ours) == pytest.approx(flat(timm_sched._get_lr(t) for t in range(epochs * spe)), rel=1e-9)

    factor = 1e-4

    def torch_schedule(scheduler_class, steps, **kwargs):
        """The lrs of the SCALES groups over `steps` steps of a torch scheduler, from their peak lrs."""
        optimizer = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)], 'lr': lr * s} for s in SCALES])
        scheduler, lrs = scheduler_class(optimizer, **kwargs), []
        for _ in range(steps):
            lrs.append([g['lr'] for g in optimizer.param_groups])
            optimizer.step()  # no gradients: nothing moves; torch wants it before the scheduler's step
            scheduler.step()
        return lrs
    torch_lrs = (torch_schedule(torch.optim.lr_scheduler.LinearLR, warmup * spe, start_factor=factor,
                                total_iters=warmup * spe)
                 + torch_schedule(torch.optim.lr_scheduler.CosineAnnealingLR, (epochs - warmup) * spe,
                                  T_max=(epochs - warmup) * spe, eta_min=min_lr))
    ours = group_lrs_by_step('warmup_scaled', spe, epochs, lr=lr, min_lr=min_lr, warmup_epochs=warmup,
                             warmup_lr=factor * lr)
    assert flat(ours) == pytest.approx(flat(torch_lrs), rel=1e-6)
    assert ours[-1][2] > min_lr > ours[-1][2] - 1e-6  # the lowest group's floor is min_lr itself


def test_weight_decay_as_the_official_mae_pre_training():
    """timm's add_weight_decay as the official main_pretrain.py calls it: no decay on 1-D
    parameters and biases only; the cls and mask tokens (3-D) are decayed."""
    from models_mae import mae_vit_tiny_patch8
    from util.optim import param_groups
    model = mae_vit_tiny_patch8(depth=1)
    groups = param_groups(model, 0.05)
    by_decay = {g['weight_decay']: {id(p) for p in g['params']} for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[i] for i in by_decay[0.0]}
    decay = {names[i] for i in by_decay[0.05]}
    assert {'blocks.0.norm1.weight', 'blocks.0.attn.qkv.bias', 'decoder_pred.bias'} <= no_decay
    assert {'cls_token', 'mask_token', 'blocks.0.attn.qkv.weight', 'decoder_pred.weight',
            'patch_embed.proj.weight'} <= decay
    # the frozen sin-cos tables are not optimised at all
    assert 'pos_embed' not in no_decay | decay and 'decoder_pos_embed' not in no_decay | decay
    assert no_decay | decay == {n for n, p in model.named_parameters() if p.requires_grad}


def test_demo_pretraining_runs_and_loss_falls(demo_pretraining):
    """conftest's demo_pretraining: 12 steps of 32 images, a log line every 3."""
    out = demo_pretraining
    records = read_jsonl(out / 'log.jsonl')
    assert [r['step'] for r in records] == [3, 6, 9, 12]
    assert all({'epoch', 'step', 'loss', 'lr', 'ips'} <= set(r) for r in records)
    # normalised-pixel MSE starts near the target's variance (about 1) and must fall clearly
    assert records[-1]['loss'] < 0.8 * records[0]['loss']
    assert os.path.isfile(out / 'checkpoint-last.pth')
    assert os.path.isfile(out / 'log.txt')
    # TensorBoard: the step scalars, the gradient norm among them, and the reconstructions of the epoch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={'images': 0, 'scalars': 0})
    events.Reload()
    for key in ('loss', 'lr', 'ips', 'grad_norm'):
        scalars = events.Scalars(f'train/{key}')
        assert [e.step for e in scalars] == [r['step'] for r in records]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    [grid] = events.Images('reconstructions')
    # 8 rows of 4 panels of 64 px with make_grid's 2-px padding
    assert (grid.step, grid.width, grid.height) == (0, 4 * 66 + 2, 8 * 66 + 2)


def test_resumed_run_continues_exactly(small_folder, tmp_path, uninterrupted, capsys):
    """3 epochs in one go (conftest's uninterrupted) == a run stopped part-way through epoch 1 and
    resumed by itself."""
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16]
    shutil.copytree(uninterrupted[0], tmp_path / 'straight')  # extended below
    run_pretrain(*flags, '--output_dir', tmp_path / 'resumed', '--max_steps', 6)
    ckpt = checkpoint.load(tmp_path / 'resumed' / checkpoint.LAST)
    assert (ckpt['epoch'], ckpt['epoch_samples'], ckpt['step']) == (0, 32, 6)  # 4 steps of 16 an epoch
    # another --seed in the middle of an epoch draws its rest in another order: said (a copy, one step)
    shutil.copytree(tmp_path / 'resumed', tmp_path / 'reseeded')
    capsys.readouterr()
    run_pretrain(*flags, '--output_dir', tmp_path / 'reseeded', '--seed', 1, '--max_steps', 1)
    assert ('warning: --seed 1 is not the seed 0 of the run this resumes in the middle of an epoch'
            in capsys.readouterr().out)
    # other optimization flags (one left out: its default is the recipe's) are said, and apply from here
    shutil.copytree(tmp_path / 'resumed', tmp_path / 'changed')
    run_pretrain(*[f for f in flags if f not in ('--blr', 1e-3)], '--weight_decay', 0.1, '--max_steps', 1,
                 '--output_dir', tmp_path / 'changed')
    assert ('warning: resumed with other flags than the run\'s: the lr (--blr x effective batch / 256) 9.375e-06 '
            '(the run had 6.25e-05), --weight_decay 0.1 (the run had 0.05); they apply from here'
            in capsys.readouterr().out)  # MAE's blr 1.5e-4 and 1e-3, times 16 / 256
    step_7 = read_jsonl(tmp_path / 'changed' / 'log.jsonl')[-1]
    # step 7 begins epoch 1.5 of 3, after 1 warm-up epoch: half-way down the cosine's first half
    assert (step_7['step'], step_7['lr']) == (7, pytest.approx(1.5e-4 * 16 / 256 * 0.5 * (1 + math.cos(math.pi / 4))))
    groups = checkpoint.load(tmp_path / 'changed' / checkpoint.LAST)['optimizer']['param_groups']
    assert sorted(group['weight_decay'] for group in groups) == [0.0, 0.1]  # the run's was 0.05
    run_pretrain(*flags, '--output_dir', tmp_path / 'resumed')
    assert 'resumed with other flags' not in capsys.readouterr().out

    straight, resumed = losses_by_step(tmp_path / 'straight'), losses_by_step(tmp_path / 'resumed')
    assert sorted(straight) == list(range(1, 13))
    assert resumed == straight  # bit for bit: same data order, crops, masks and optimizer state
    epochs = [r['epoch'] for r in read_jsonl(tmp_path / 'resumed' / 'log.txt')]
    assert epochs == [0, 1, 1, 2]  # epoch 1 logged when cut short, then when finished

    # a finished run asked for more epochs starts at the next one
    run_pretrain(*flags, '--epochs', 4, '--output_dir', tmp_path / 'straight')
    assert [r['epoch'] for r in read_jsonl(tmp_path / 'straight' / 'log.txt')] == [0, 1, 2, 3]
    assert checkpoint.load(tmp_path / 'straight' / checkpoint.LAST)['epoch'] == 3
    assert os.path.isfile(tmp_path / 'straight' / 'checkpoint-3.pth')  # the last epoch is kept
    # run again, it has nothing left to train, and leaves no empty TensorBoard file behind
    events = sorted(f for f in os.listdir(tmp_path / 'straight') if f.startswith('events.out.tfevents'))
    capsys.readouterr()
    run_pretrain(*flags, '--epochs', 4, '--output_dir', tmp_path / 'straight')
    # the line the ModelZoo cases read, to keep the figures of the launch that finished the run
    assert '\nnothing to train: ' in capsys.readouterr().out
    assert sorted(f for f in os.listdir(tmp_path / 'straight') if f.startswith('events.out.tfevents')) == events


def test_resuming_into_another_runs_folder_is_refused_and_its_own_earlier_epoch_continues_it(small_folder, tmp_path,
                                                                                               uninterrupted, capsys):
    """--resume of run A's checkpoint with --output_dir of run B overwrote B's checkpoint-last.pth
    without a word; a checkpoint of B's own folder (going back to an earlier epoch) continues B, and
    so does the command that started B from A, launched again."""
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--epochs', 4, '--max_steps', 1]
    shutil.copytree(uninterrupted[0], tmp_path / 'other')
    other_last = (tmp_path / 'other' / checkpoint.LAST).read_bytes()
    with pytest.raises(UsageError, match=f'^{tmp_path / "other"} holds the checkpoint-last.pth of another run, which '
                                         f'continuing {uninterrupted[0] / checkpoint.LAST} there would overwrite: '
                                         f'give another --output_dir, or leave --resume out'):
        run_pretrain(*flags, '--resume', uninterrupted[0] / checkpoint.LAST, '--output_dir', tmp_path / 'other')
    assert (tmp_path / 'other' / checkpoint.LAST).read_bytes() == other_last
    capsys.readouterr()
    run_pretrain(*flags, '--resume', tmp_path / 'other' / 'checkpoint-2.pth', '--output_dir', tmp_path / 'other')
    assert f'resumed from {tmp_path / "other" / "checkpoint-2.pth"}: epoch 3' in capsys.readouterr().out
    assert checkpoint.load(tmp_path / 'other' / checkpoint.LAST)['step'] == 13  # 3 epochs of 4 steps, then 1
    # the same command launched again after an interruption continues its own run, not the checkpoint it began from
    last = uninterrupted[0] / checkpoint.LAST
    run_pretrain(*flags, '--resume', last, '--output_dir', tmp_path / 'continued')
    capsys.readouterr()
    run_pretrain(*flags, '--resume', last, '--output_dir', tmp_path / 'continued')
    out = capsys.readouterr().out
    assert (f'{tmp_path / "continued" / checkpoint.LAST} continues {last} (this command\'s run, launched before): '
            f'resuming it, not {last} again') in out
    assert checkpoint.load(tmp_path / 'continued' / checkpoint.LAST)['step'] == 14  # 12, then 1 a launch


def test_a_resumption_without_model_takes_the_checkpoints_and_another_kind_is_refused_before_building(
        small_folder, tmp_path, uninterrupted, capsys):
    """--resume without --model built the default ViT-B (112 M parameters), then refused the checkpoint as
    another model's ('this run has mae_vit_base_patch16'); fine-tuning built its default ViT-B before
    refusing a pre-training checkpoint."""
    from helpers import run_finetune
    last = uninterrupted[0] / checkpoint.LAST
    flags = ['--data_path', small_folder, '--batch_size', 16, '--num_workers', 0, '--device', 'cpu', '--epochs', 4,
             '--max_steps', 1]
    capsys.readouterr()
    run_pretrain(*flags, '--resume', last, '--output_dir', tmp_path / 'more')
    out = capsys.readouterr().out
    assert f'resumed from {last}: epoch 3' in out and '\nmodel mae_vit_tiny: ' in out
    with pytest.raises(UsageError, match=r"is a pre-training checkpoint \(--model mae_vit_tiny\), which fine-tuning "
                                         r"cannot resume"):
        run_finetune(*flags, '--resume', last, '--output_dir', tmp_path / 'finetune')
    assert 'parameters' not in capsys.readouterr().out


def test_a_stop_between_log_steps_and_the_resumed_run_log_the_intervals_loss(small_folder, tmp_path,
                                                                              uninterrupted, capsys):
    """--log_freq 3 over epochs of 4 steps logs steps 3, 4, 6, 8, 9, 12, each with the mean loss of the
    steps since the last log. Stopped after step 5, the run logs step 5 (its part of the interval 5-6),
    marked partial, and the resumed run logs step 6 with the mean of steps 5 and 6, as the
    uninterrupted run does. The log readers leave step 5 out: the curve is the uninterrupted run's."""
    flags = [*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--log_freq', 3, '--output_dir', tmp_path]
    capsys.readouterr()
    run_pretrain(*flags, '--max_steps', 5)
    run_pretrain(*flags)
    console = capsys.readouterr().out
    per_step = uninterrupted[1]  # logged every step

    def mean(first, last):
        return sum(per_step[s] for s in range(first, last + 1)) / (last - first + 1)
    expected = {3: mean(1, 3), 4: mean(4, 4), 5: mean(5, 5), 6: mean(5, 6), 8: mean(7, 8), 9: mean(9, 9),
                12: mean(10, 12)}
    logged = [(r['step'], r['loss']) for r in read_jsonl(tmp_path / 'log.jsonl')]
    assert [step for step, _ in logged] == sorted(expected)
    for step, loss in logged:
        assert loss == pytest.approx(expected[step], rel=1e-6), step
    assert [r['step'] for r in read_jsonl(tmp_path / 'log.jsonl') if r.get('partial')] == [5]
    for curve in compare_loss.read_log(str(tmp_path))[1], compare_loss.parse_console(console):
        assert sorted(curve) == [3, 4, 6, 8, 9, 12]
        assert list(curve.values()) == pytest.approx([expected[step] for step in sorted(curve)], rel=1e-5)
    epochs = read_jsonl(tmp_path / 'log.txt')
    assert [e['epoch'] for e in epochs] == [0, 1, 1, 2]
    assert epochs[2]['train_loss'] == pytest.approx(mean(5, 8), rel=1e-6)  # the whole epoch 1, after the resumption


def test_a_start_epoch_numbers_the_steps_as_a_resumed_run_does(small_folder, tmp_path):
    """--start_epoch 2 without a checkpoint: the lr of epoch 2 and the steps of epoch 2 (9, 10, ...: 4
    steps of 16 an epoch), as a run resumed at that epoch logs them, so compare_loss lines them up."""
    run_pretrain(*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--start_epoch', 2, '--max_steps', 2,
                 '--output_dir', tmp_path)
    assert sorted(losses_by_step(tmp_path)) == [9, 10]


def test_gradient_accumulation_matches_a_larger_batch(small_folder, tmp_path):
    """2 micro-batches of 8 = one batch of 16: the same samples, the same mean gradient."""
    flags = [*COMMON, '--data_path', small_folder, '--epochs', 1, '--warmup_epochs', 0, '--lr', 1e-3,
             '--max_steps', 3]
    run_pretrain(*flags, '--batch_size', 16, '--output_dir', tmp_path / 'big')
    run_pretrain(*flags, '--batch_size', 8, '--accum_iter', 2, '--output_dir', tmp_path / 'accum')
    big, accum = losses_by_step(tmp_path / 'big'), losses_by_step(tmp_path / 'accum')
    assert sorted(big) == sorted(accum) == [1, 2, 3]
    for step in big:
        assert accum[step] == pytest.approx(big[step], rel=1e-4)
    w_big = checkpoint.load(tmp_path / 'big' / checkpoint.LAST)['model']['decoder_pred.weight']
    w_accum = checkpoint.load(tmp_path / 'accum' / checkpoint.LAST)['model']['decoder_pred.weight']
    torch.testing.assert_close(w_accum, w_big, rtol=1e-4, atol=1e-6)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(small_folder, tmp_path, monkeypatch):
    import main_pretrain
    from util.engine import TrainingDiverged
    flags = [*COMMON, '--data_path', small_folder, '--batch_size', 16, '--epochs', 3, '--warmup_epochs', 1,
             '--output_dir', tmp_path]
    run_pretrain(*flags[:-4], '--epochs', 1, '--warmup_epochs', 1, '--output_dir', tmp_path)
    good = checkpoint.load(tmp_path / checkpoint.LAST)

    def nan_after_two_steps(model, batch, forward_kwargs, calls=[0]):
        calls[0] += 1  # the first call counts the FLOPs at start-up (util.flops), on meta tensors
        loss = model(batch[0], **batch[1], **forward_kwargs)[0]
        return loss * float('nan') if calls[0] > 3 else loss
    monkeypatch.setattr(main_pretrain, 'mim_loss', nan_after_two_steps)
    with pytest.raises(TrainingDiverged) as error:
        run_pretrain(*flags)
    # fp32 on the CPU: no advice to use fp32; the checkpoint of epoch 0 is there
    assert str(error.value) == ('the loss is nan at epoch 1, step 7: training stopped; the last checkpoint written is '
                                'the last good one. Lower the lr (--blr or --lr) or set --clip_grad')
    # the step is logged before the run stops: a loss-curve comparison fails on it (compare_loss's NaN)
    last = read_jsonl(tmp_path / 'log.jsonl')[-1]
    assert last['step'] == 7 and math.isnan(last['loss'])
    kept = checkpoint.load(tmp_path / checkpoint.LAST)
    assert kept['epoch'] == good['epoch'] == 0
    torch.testing.assert_close(kept['model'], good['model'])


def test_divergence_during_a_background_write_counts_that_checkpoint(small_folder, tmp_path, monkeypatch):
    """The checkpoint of step 2 is still being written (slowly, here) when the loss diverges at
    step 3, found at the log step 4: the line said no checkpoint had been written, and the exit
    then completed it. The line names the steps of the interval the loss was logged over."""
    import time
    import main_pretrain
    from util.engine import TrainingDiverged
    save = checkpoint.atomic_save
    monkeypatch.setattr(checkpoint, 'atomic_save', lambda *a, **kw: time.sleep(3) or save(*a, **kw))

    def nan_from_the_third_step(model, batch, forward_kwargs, calls=[0]):
        calls[0] += 1  # the first call counts the FLOPs at start-up, on meta tensors
        loss = model(batch[0], **batch[1], **forward_kwargs)[0]
        return loss * float('nan') if calls[0] > 3 else loss
    monkeypatch.setattr(main_pretrain, 'mim_loss', nan_from_the_third_step)
    with pytest.raises(TrainingDiverged, match=r'at epoch 0, step 4 \(the mean of steps 3 to 4\): training stopped; '
                                               r'the last checkpoint written is the last good one'):
        run_pretrain(*COMMON, '--data_path', small_folder, '--batch_size', 16, '--epochs', 1, '--warmup_epochs', 0,
                     '--save_every_steps', 2, '--log_freq', 4, '--output_dir', tmp_path)
    assert checkpoint.load(tmp_path / checkpoint.LAST)['step'] == 2


def test_weights_that_became_nan_before_the_loss_did_are_not_saved(small_folder, tmp_path, monkeypatch):
    """Step 2's gradient is NaN while its loss is finite (an overflow in the backward pass): the
    update makes the weights NaN, and step 2's checkpoint (--save_every_steps 1) would have kept
    them while the loss checked at that step was fine. The run stops there instead, and
    checkpoint-last.pth is step 1's, whole and finite."""
    import main_pretrain
    from util.engine import TrainingDiverged

    def nan_gradient_at_step_two(model, batch, forward_kwargs, calls=[0]):
        calls[0] += 1  # the first call counts the FLOPs at start-up, on meta tensors
        loss = model(batch[0], **batch[1], **forward_kwargs)[0]
        if calls[0] == 3:  # sqrt at 0: the value 0, the gradient inf x 0 = NaN
            weight = model.decoder_pred.weight
            loss = loss + torch.sqrt(((weight - weight.detach()) ** 2).sum())
        return loss
    monkeypatch.setattr(main_pretrain, 'mim_loss', nan_gradient_at_step_two)
    with pytest.raises(TrainingDiverged) as error:
        run_pretrain(*COMMON, '--data_path', small_folder, '--batch_size', 16, '--epochs', 1, '--warmup_epochs', 0,
                     '--save_every_steps', 1, '--output_dir', tmp_path)
    assert str(error.value).startswith('the weights became NaN or infinite by step 2 (epoch 0), before the loss '
                                       'logged did: training stopped; the last checkpoint written is the last good one')
    assert [math.isfinite(r['loss']) for r in read_jsonl(tmp_path / 'log.jsonl')] == [True, True]
    kept = checkpoint.load(tmp_path / checkpoint.LAST)
    assert kept['step'] == 1 and all(torch.isfinite(w).all() for w in kept['model'].values() if w.is_floating_point())


def test_bad_input_is_one_line_without_traceback(tmp_path):
    """One line, exit code 2, and the --output_dir the run made and locked before it found the bad
    flag is gone with it (it held the lock file alone)."""
    result = run_script(sys.executable, 'main_pretrain.py', '--data_path', tmp_path / 'missing', '--device', 'cpu',
                        '--output_dir', tmp_path / 'a')
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: --data_path') and 'train/' in lines[0]
    assert not (tmp_path / 'a').exists()

    # the others as UsageErrors, which run_cli prints as the line above (in-process: faster); a folder
    # that was there is left as it was, without the lock file
    (tmp_path / 'kept').mkdir()
    with pytest.raises(UsageError, match='--data_path .* does not exist'):
        run_pretrain('--data_path', tmp_path / 'missing', '--device', 'cpu', '--output_dir', tmp_path / 'kept')
    assert os.listdir(tmp_path / 'kept') == []
    with pytest.raises(UsageError, match=r"unknown pre-training model 'mae_vit_bse'.*mae_vit_base"):
        run_pretrain('--data_path', 'demo', '--model', 'mae_vit_bse', '--output_dir', tmp_path / 'b')
    # 2,000 demo images are 31 batches of 64: accumulating 32 of them would never take a step
    with pytest.raises(UsageError, match='has 31 batches of 64 an epoch, fewer than --accum_iter 32'):
        run_pretrain('--data_path', 'demo', '--device', 'cpu', '--model', 'mae_vit_tiny', '--batch_size', 64,
                     '--accum_iter', 32, '--num_workers', 0, '--output_dir', tmp_path / 'b')


def test_batches_that_accumulation_leaves_out_are_said(small_folder, tmp_path, capsys):
    """64 images in batches of 8 are 8 batches; steps of 3 micro-batches take 6 of them, and the
    last 2 (16 images, a quarter of the data) never train: said, as on a small set with a recipe's
    accumulation (DeiT's 1,024 over 2 processes of 16 left out almost half of the demo)."""
    run_pretrain('--data_path', small_folder, '--device', 'cpu', '--model', 'mae_vit_tiny', '--batch_size', 8,
                 '--accum_iter', 3, '--max_steps', 1, '--num_workers', 0, '--output_dir', tmp_path)
    assert ('warning: an epoch takes 6 of the 8 batches of 8 of each process (whole optimizer steps of --accum_iter 3): '
            'the other 2 (16 images a process) are left out each epoch') in capsys.readouterr().out


def test_fp16_with_loss_scaling_and_clipping(small_folder, tmp_path, capsys):
    """--precision fp16 takes the GradScaler path (unscale before clipping); the scaler's state is
    checkpointed so a resume continues with the same loss scale. On the CPU it says it is slow."""
    run_pretrain(*COMMON, '--data_path', small_folder, '--batch_size', 4, '--epochs', 1, '--max_steps', 2,
                 '--precision', 'fp16', '--clip_grad', 1.0, '--output_dir', tmp_path)
    assert 'warning: fp16 on the CPU has few fast kernels and trains several times slower' in capsys.readouterr().out
    records = read_jsonl(tmp_path / 'log.jsonl')
    assert all(math.isfinite(r['loss']) and r['grad_norm'] > 0 for r in records)
    scaler = checkpoint.load(tmp_path / checkpoint.LAST)['scaler']
    assert scaler is not None and scaler['scale'] > 0


def test_gradient_norm_is_logged_without_clipping(small_folder, tmp_path):
    """Without --clip_grad every log step still carries the gradient norm, the number that
    clipping measures (before it clips) on the same weights and batch."""
    flags = [*COMMON, '--data_path', small_folder, '--batch_size', 8, '--epochs', 1, '--max_steps', 2]
    run_pretrain(*flags, '--output_dir', tmp_path / 'free')
    run_pretrain(*flags, '--clip_grad', 1e-3, '--output_dir', tmp_path / 'clipped')
    free, clipped = read_jsonl(tmp_path / 'free' / 'log.jsonl'), read_jsonl(tmp_path / 'clipped' / 'log.jsonl')
    assert [r['step'] for r in free] == [1, 2] and all(math.isfinite(r['grad_norm']) and r['grad_norm'] > 1e-3
                                                       for r in free)
    assert free[0]['grad_norm'] == pytest.approx(clipped[0]['grad_norm'], rel=1e-6)


def test_max_steps_at_an_epoch_boundary_stops_there(small_folder, tmp_path):
    flags = [*COMMON, '--data_path', small_folder, '--batch_size', 16, '--epochs', 3, '--output_dir', tmp_path]
    run_pretrain(*flags, '--max_steps', 4)  # exactly one epoch of 64 images
    assert max(losses_by_step(tmp_path)) == 4
    ckpt = checkpoint.load(tmp_path / checkpoint.LAST)
    assert (ckpt['epoch'], ckpt['epoch_samples'], ckpt['step']) == (0, 0, 4)
    run_pretrain(*flags)
    assert sorted(losses_by_step(tmp_path)) == list(range(1, 13))


def test_image_size_must_fit_the_patches(small_folder, tmp_path):
    from util.errors import UsageError
    with pytest.raises(UsageError, match='multiple of the patch size 8'):
        run_pretrain(*COMMON[:2], '--input_size', 60, '--data_path', small_folder, '--output_dir', tmp_path)
