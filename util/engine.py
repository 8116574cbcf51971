"""THE training loop, shared by pre-training and fine-tuning.

What is particular to a method stays behind `loss_fn(model, batch) -> loss`; the loop does
the rest: the per-step learning rate, autocast, loss scaling (fp16), gradient accumulation
(DDP gradients synchronised on the last micro-batch only), clipping, and logging every
`--log_freq` steps. The host waits for the device only at those log steps, where the loss is
read, checked for NaN/inf and reported with the images/s of the interval.
"""
import contextlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils._pytree import tree_map

from util import checkpoint, dist, signals
from util.checkpoint_writer import CheckpointWriter
from util.datasets import JpegBatch, normalize_images
from util.errors import EXIT_DIVERGED, RESUME_ADVICE, Preempted, RunEnded
from util.lr_sched import adjust_learning_rate, due_at_epoch


class TrainingDiverged(RunEnded):
    """The loss became NaN or infinite."""
    exit_code = EXIT_DIVERGED


@dataclass
class Progress:
    step: int = 0       # optimizer steps since training began (carried in checkpoints)
    run_steps: int = 0  # optimizer steps of this invocation (--max_steps counts these)
    # the unfinished epoch's logged losses: (sum of loss x images, images), carried in checkpoints
    # so that an epoch stopped and resumed reports the mean over all its steps
    epoch_loss: tuple = (0.0, 0)
    # the logged part of a --log_freq interval that a stop cut: (sum of loss x steps, steps), carried
    # in checkpoints so that the resumed run logs the whole interval's loss where it ends
    interval_loss: tuple = (0.0, 0)
    saved: bool = False  # a checkpoint of this launch is written, or being written in the background


class Throughput:
    """Images per second between log steps. The first interval of a run holds start-up
    (workers, compilation, autotuning) and is left out of the steady-state figure whenever a
    later interval exists."""

    def __init__(self):
        self.first = None
        self.images = 0
        self.seconds = 0.0

    def add(self, images, seconds):
        if self.first is None:
            self.first = (images, seconds)
        else:
            self.images += images
            self.seconds += seconds
        return images / max(seconds, 1e-9)

    @property
    def holds_start_up(self):
        """Whether steady_state is the first interval's alone, start-up included."""
        return self.seconds == 0

    @property
    def steady_state(self):
        if self.seconds > 0:
            return self.images / self.seconds
        return self.first[0] / max(self.first[1], 1e-9) if self.first else 0.0


def out_of_steps(progress, args, ahead=0):
    """--max_steps optimizer steps have run in this invocation (after `ahead` more)."""
    return args.max_steps is not None and progress.run_steps + ahead >= args.max_steps


def seed_model_randomness(seed, epoch, iteration):
    """Seed the generators the model draws from (drop path, dropout) for one micro-batch from
    (seed, epoch, micro-batch, rank): a resumed run draws what the uninterrupted one drew, and
    each rank draws differently."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, iteration, dist.get_rank()]).generate_state(1)[0]))


def to_device(batch, device):
    """Move the tensors of a (nested) batch to the device, without waiting for the copy (a
    JpegBatch is decoded there)."""
    return tree_map(lambda x: x.to(device, non_blocking=True) if isinstance(x, (torch.Tensor, JpegBatch)) else x, batch)


def model_input(batch):
    """The batch the model takes: uint8 image batches (N, 3, H, W) of the fast input path, sent
    to the device as they were decoded (a quarter of the bytes of floats, and no normalising in
    the workers), become normalised float32 there (util.datasets.normalize_images)."""
    return tree_map(lambda x: normalize_images(x) if isinstance(x, torch.Tensor) and x.dtype == torch.uint8
                    and x.dim() == 4 else x, batch)


def iters_per_epoch(loader, accum_iter):
    """Micro-batches in a full epoch of this rank, a whole number of optimizer steps."""
    full_batches = loader.sampler.num_samples // loader.batch_size
    return full_batches // accum_iter * accum_iter


def log_step_values(mean_loss, loader, args):
    """The loss of the interval averaged over all ranks, and the samples replaced for unreadable
    images in all ranks since the run started (util.images; the run stops past
    --max_bad_images), in one reduction.
    returns: (loss, replaced images)"""
    bad_images = getattr(loader.dataset, 'bad_images', None)
    replaced = bad_images.poll() if bad_images is not None else 0
    values = torch.stack([mean_loss.float(), torch.tensor(float(replaced), device=mean_loss.device)])
    mean_loss, mean_replaced = dist.all_reduce_mean(values).tolist()
    replaced = round(mean_replaced * dist.get_world_size())
    if bad_images is not None:
        bad_images.check(replaced, args.max_bad_images)
    return mean_loss, replaced


def weights_finite(model):
    """Whether every parameter is finite: their largest magnitude, read on the host (before saves
    only: a checkpoint written after the loss was logged finite must not keep NaN weights)."""
    params = [p.detach() for p in model.parameters()]
    return math.isfinite(torch.nn.utils.get_total_norm(params, norm_type=math.inf).item())


def diverged_message(what, precision, args, saved):
    """The line for a loss or weights that became NaN or infinite (`what` says which, and when):
    what is kept (`saved`: a checkpoint of this launch, perhaps still being written, which the exit
    waits for), and the changes this run can still make (no --precision fp32 advice to an fp32 run)."""
    written = saved or bool(args.output_dir) and os.path.isfile(os.path.join(args.output_dir, checkpoint.LAST))
    kept = 'the last checkpoint written is the last good one' if written else 'no checkpoint had been written'
    changes = ['lower the lr (--blr or --lr)', 'lower --clip_grad' if args.clip_grad else 'set --clip_grad']
    changes += {'fp16': ['use --precision bf16 (or fp32)'], 'bf16': ['use --precision fp32']}.get(precision, [])
    advice = f'{", ".join(changes[:-1])} or {changes[-1]}'
    return f'{what}: training stopped; {kept}. {advice[0].upper()}{advice[1:]}'


def train_one_epoch(model, loss_fn, loader, optimizer, scaler, device, precision, epoch, args,
                    progress, throughput, logger, start_iter=0, ema=None, save_progress=None, flop_rate=None):
    """Train for one epoch (or what remains of it after `start_iter` micro-batches).
    `ema` (timm ModelEmaV3), when given, follows the weights after every optimizer step;
    `flop_rate` (util.flops.FlopRate), when given, adds tflops and mfu to each logged step;
    `save_progress(epoch, iters)` writes checkpoint-last.pth every --save_every_steps steps.
    A pre-emption signal (util.signals) ends the epoch after the step it arrived in.

    returns: {'loss': mean over the epoch's logged steps (those before a resumption included), 'lr': last lr,
              'ips': steady-state
              images/s so far, 'iters': micro-batches done in this epoch, 'complete': bool,
              'preempted': bool}
    """
    model.train()
    accum = args.accum_iter
    epoch_iters = iters_per_epoch(loader, accum)
    steps_per_epoch = epoch_iters // accum
    images_per_step = dist.effective_batch_size(args)
    dev = device.torch_device

    loss_sum = torch.zeros((), device=dev)  # micro-batch losses since the last log, on the device
    micro_batches = 0
    if not start_iter:
        progress.epoch_loss = (0.0, 0)
    images, tic = 0, time.perf_counter()
    lr, preempted = max(group['lr'] for group in optimizer.param_groups), False  # the lr set last, until a step
    it = start_iter
    data = iter(loader)
    for it in range(start_iter, epoch_iters):
        batch = model_input(to_device(next(data), dev))
        seed_model_randomness(args.seed, epoch, it)
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, epoch + it / epoch_iters, args)

        last_micro_batch = (it + 1) % accum == 0
        sync_grads = contextlib.nullcontext() if last_micro_batch or not hasattr(model, 'no_sync') \
            else model.no_sync()
        with sync_grads:
            with device.autocast(precision):
                loss = loss_fn(model, batch)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach().float()
        micro_batches += 1
        if not last_micro_batch:
            continue

        step_in_epoch = (it + 1) // accum
        last_step = out_of_steps(progress, args, ahead=1)
        saving_step = bool(args.save_every_steps) and not (progress.step + 1) % args.save_every_steps \
            and step_in_epoch < steps_per_epoch and save_progress is not None
        # a step that saves ends an interval too: a run resumed from it logs the same intervals
        interval_ends = not (progress.step + 1) % args.log_freq or step_in_epoch == steps_per_epoch or saving_step
        logging_step = interval_ends or last_step
        grad_norm = None
        if args.clip_grad or logging_step:  # the norm is logged: measured at log steps, or wherever it clips
            if scaler is not None:
                scaler.unscale_(optimizer)  # the true gradients, not the scaled ones
            if args.clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            else:  # measured only: the gradients are not touched
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        progress.step += 1
        progress.run_steps += 1
        images += images_per_step

        preempted = signals.stop_agreed()
        stopping = last_step or preempted
        if logging_step or stopping:
            # a log step: the one place where the host waits for the device
            mean_loss, bad_images = log_step_values(loss_sum / micro_batches, loader, args)
            toc = time.perf_counter()
            ips = throughput.add(images, toc - tic)
            steps = images // images_per_step
            # a stop logs its part of the interval, and the run resumed from it the whole interval
            carried_sum, carried_steps = progress.interval_loss
            interval_sum = carried_sum + mean_loss * steps
            progress.interval_loss = (0.0, 0) if interval_ends else (interval_sum, carried_steps + steps)
            logged_loss = interval_sum / (carried_steps + steps) if carried_steps else mean_loss
            record = {'epoch': epoch, 'step': progress.step, 'loss': logged_loss, 'lr': lr, 'ips': ips,
                      'time': round(time.time(), 3)}
            if not interval_ends:
                record['partial'] = True  # log readers (compare_loss) drop it where the resumed run logs on
            if flop_rate is not None:
                record.update(flop_rate.fields(ips))
            if grad_norm is not None:
                record['grad_norm'] = grad_norm.item()
            if bad_images:
                record['bad_images'] = bad_images
            if device.max_memory_allocated():
                record['mem_mb'] = round(device.max_memory_allocated() / 2 ** 20)
            seconds_per_step = (toc - tic) / (images / images_per_step)
            logger.log_step(record, steps_per_epoch, step_in_epoch, (steps_per_epoch - step_in_epoch) * seconds_per_step)
            if not math.isfinite(mean_loss):  # logged first: a loss-curve comparison sees where the run diverged
                interval = f' (the mean of steps {progress.step - steps + 1} to {progress.step})' if steps > 1 else ''
                raise TrainingDiverged(diverged_message(f'the loss is {mean_loss} at epoch {epoch}, step '
                                                        f'{progress.step}{interval}', precision, args, progress.saved))
            loss_images, images_so_far = progress.epoch_loss
            progress.epoch_loss = (loss_images + mean_loss * images, images_so_far + images)
            loss_sum.zero_()
            micro_batches, images, tic = 0, 0, time.perf_counter()
        if saving_step and not stopping:
            save_progress(epoch, it + 1)  # after the log line: a step is never missing from log.jsonl
        if stopping:
            break

    done = it + 1 if epoch_iters > start_iter else start_iter
    loss_images, images_so_far = progress.epoch_loss
    return {'loss': loss_images / max(images_so_far, 1), 'lr': lr, 'ips': throughput.steady_state,
            'ips_holds_start_up': throughput.holds_start_up, 'iters': done, 'complete': done >= epoch_iters,
            'preempted': preempted}


class StoppedInEvaluation(Preempted):
    """A stop signal agreed on during an evaluation after an epoch (evaluate(stoppable=True)): a
    grace time before the kill may be shorter than a pass over the validation set."""


def evaluate_keeping_the_epoch(after_epoch, epoch, stats, keep_unfinished, args):
    """after_epoch(epoch, stats), and where it fails (an unreadable validation image, say) or a stop
    signal ends it, the epoch's training kept first (keep_unfinished), as for a stop in its last
    step: the run started again evaluates the epoch and goes on, without training it again."""
    try:
        return after_epoch(epoch, stats)
    except StoppedInEvaluation:
        keep_unfinished(epoch, stats)
        raise
    except Exception:
        keep_unfinished(epoch, stats)
        if args.output_dir:
            print(f'the training of epoch {epoch} is kept in checkpoint-last.pth: once the error is mended, the '
                  f'same command evaluates the epoch and goes on', flush=True)
        raise


def train(model, model_without_ddp, loss_fn, loader, optimizer, scaler, device, precision, args, logger,
          start_epoch=0, start_iter=0, progress=None, after_epoch=None, ema=None, flop_rate=None):
    """The epoch loop: train, write `checkpoint-last.pth` (and `checkpoint-{epoch}.pth` every
    --save_freq epochs and at the end), log the epoch, stop at --epochs or --max_steps. A
    pre-emption signal stops it after the current step and its checkpoint: util.errors.Preempted.
    Checkpoints are written in the background (util.checkpoint_writer); every file is complete
    when this returns or raises.

    after_epoch(epoch, stats) -> dict of extra epoch results (fine-tuning evaluates there); its
        'checkpoint_files' entry, {path: state}, is written with the epoch's checkpoint, from the
        same copy (fine-tuning's checkpoint-best.pth)
    flop_rate: util.flops.FlopRate, for tflops and mfu in the step and epoch logs (None: neither)
    returns: the stats of the last epoch run ({} when there was nothing left to train)
    """
    progress = progress or Progress()
    if start_epoch and not progress.step:  # --start_epoch, nothing resumed: steps numbered as a resumed run's are
        progress.step = start_epoch * (iters_per_epoch(loader, args.accum_iter) // args.accum_iter)
    throughput = Throughput()
    stats = {}
    writer = CheckpointWriter(synchronous=args.sync_checkpoints, synchronize=device.synchronize)
    stall = 0.0  # seconds the saves of this epoch held training up

    def save(epoch, stats, epoch_files=True):
        nonlocal stall
        if not weights_finite(model_without_ddp):  # on every rank: their weights are the same
            raise TrainingDiverged(diverged_message(f'the weights became NaN or infinite by step {progress.step} '
                                                    f'(epoch {epoch}), before the loss logged did', precision, args,
                                                    progress.saved))
        stall += save_training_checkpoints(model_without_ddp, optimizer, scaler, epoch, stats, progress, args, writer,
                                           ema, epoch_files=epoch_files)
        progress.saved = progress.saved or bool(args.output_dir)

    def save_progress(epoch, iters):
        save(epoch, {'complete': False, 'iters': iters}, epoch_files=False)

    def keep_unfinished(epoch, stats):
        """Save an epoch whose samples are all consumed as unfinished, and wait for the file: the
        run started again evaluates, logs and keeps it, as an uninterrupted one does."""
        save(epoch, {**stats, 'complete': False}, epoch_files=False)
        writer.wait()  # the file complete (or its failure raised) before the exit code says it is

    with signals.training():  # a stop signal is acted on after the step it arrives in
        try:
            for epoch in range(start_epoch, args.epochs):
                epoch_start, stall = time.perf_counter(), 0.0
                loader.sampler.set_epoch(epoch, start=start_iter * dist.micro_batch_images(args))
                stats = train_one_epoch(model, loss_fn, loader, optimizer, scaler, device, precision, epoch, args,
                                        progress, throughput, logger, start_iter=start_iter, ema=ema,
                                        save_progress=save_progress, flop_rate=flop_rate)
                start_iter = 0
                if stats['preempted']:  # no evaluation: the grace time before a kill is short
                    keep_unfinished(epoch, stats)  # an epoch stopped at its last step, too
                    dist.barrier()
                    raise stopped(progress, f'epoch {epoch}')
                if after_epoch is not None:
                    stats.update(evaluate_keeping_the_epoch(after_epoch, epoch, stats, keep_unfinished, args))
                save(epoch, stats)
                logger.log_epoch({**{f'train_{k}': v for k, v in stats.items() if k in ('loss', 'lr', 'ips')},
                                  **{k: v for k, v in stats.items() if k.startswith(('test_', 'knn'))},
                                  'epoch': epoch, 'step': progress.step,
                                  **(flop_rate.fields(stats['ips'], prefix='train_') if flop_rate else {}),
                                  'epoch_seconds': round(time.perf_counter() - epoch_start, 1),
                                  **checkpoint_times(stall, writer)})
                if not stats['complete'] or out_of_steps(progress, args):
                    break
                if signals.stop_agreed():  # it came during the evaluation or the saves: no step of the next epoch
                    writer.wait()
                    raise stopped(progress, f'the end of epoch {epoch}')
            writer.wait()  # the end of the run: every file complete, a failed write raised here
        finally:
            writer.close()  # after an error too: the write in flight ends before the process does
    return stats


def stopped(progress, where):
    """The Preempted error of a stop signal acted on after `progress.step`, once checkpoint-last.pth
    is written."""
    return Preempted(f'stopped by {signals.received() or "a signal to another process"} after step {progress.step} '
                     f'({where}); {RESUME_ADVICE}')


def checkpoint_times(stall, writer):
    """For log.txt: the seconds this epoch's saves held training up (the copy, and any wait for
    the write before), and how long the last finished write took (in the background: the previous
    save's). Nothing on the ranks that do not write."""
    if writer.write_seconds is None and not stall:
        return {}
    times = {'checkpoint_stall_s': round(stall, 3)}
    if writer.write_seconds is not None:
        times['checkpoint_write_s'] = round(writer.write_seconds, 3)
    return times


def save_training_checkpoints(model, optimizer, scaler, epoch, stats, progress, args, writer, ema=None,
                              epoch_files=True):
    """checkpoint-last.pth always; checkpoint-{epoch}.pth on --save_freq epochs and the last one;
    stats['checkpoint_files'] too. An epoch cut short (--max_steps, a signal, --save_every_steps)
    is recorded with the number of its samples consumed by all processes together, so a resume
    finishes it, on any number of processes at the same effective batch.
    returns: the seconds training was held up (0 on the ranks that do not write)"""
    if not args.output_dir or not dist.is_main_process():
        return 0.0
    completed = epoch if stats['complete'] else epoch - 1
    epoch_samples = 0 if stats['complete'] else stats['iters'] * dist.micro_batch_images(args)
    unfinished = None if stats['complete'] else {'epoch_loss': progress.epoch_loss,
                                                 'interval_loss': progress.interval_loss}
    state = checkpoint.training_state(model, optimizer, scaler, completed, progress.step, args,
                                      epoch_samples=epoch_samples, ema=ema, logged_losses=unfinished)
    files = {os.path.join(args.output_dir, checkpoint.LAST): state}
    if epoch_files and stats['complete'] and due_at_epoch(epoch, args.save_freq, args.epochs):
        files[os.path.join(args.output_dir, f'checkpoint-{epoch}.pth')] = state
    files.update(stats.pop('checkpoint_files', {}))
    return writer.save(files)


def topk_correct(scores, labels):
    """How many rows of `scores` (N, C) have their label first, and among the first five.
    returns: (2,) int64 on the scores' device"""
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top5 == labels[:, None]
    return torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])


def batches_until_stopped(loader, stoppable):
    """The loader's batches. stoppable: a stop signal noted while training (util.signals) ends them
    with StoppedInEvaluation, agreed on by the ranks at each of the batches all of them have
    (ShardSampler's counts may differ by one), so that no rank is left waiting in a collective."""
    agreed_batches = signals.fewest_over_ranks(len(loader)) if stoppable else 0
    for batch, item in enumerate(loader):
        if batch < agreed_batches and signals.stop_agreed():
            raise StoppedInEvaluation(f'stopped by {signals.received() or "a signal to another process"} in the '
                                      f'evaluation after an epoch, whose training is kept for the resumed run to '
                                      f'evaluate; {RESUME_ADVICE}')
        yield item


@torch.no_grad()
def evaluate(model, loader, device, precision, sum_over_ranks=True, label=None, stoppable=False):
    """Top-1, top-5 accuracy (%) and mean cross-entropy over the loader's images, summed over all
    ranks when `sum_over_ranks` (exact when each image is on one rank: util.datasets.ShardSampler;
    else every rank has evaluated every image). Prints the line `* Acc@1 X Acc@5 Y loss Z` that
    log readers grep (`label`, as for the EMA weights, is put after it in parentheses).
    stoppable: a stop signal noted while training (util.signals) ends the evaluation with
    StoppedInEvaluation, agreed on by the ranks at each of the batches all of them have."""
    model.eval()
    dev = device.torch_device
    # counts in int64 and the loss in float32: no float64 on MPS, and exact counts at any size
    correct = torch.zeros(2, dtype=torch.int64, device=dev)  # correct@1, correct@5
    loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
    seen = 0  # images, counted on the host: a device tensor of a count made per batch is a copy per batch
    for images, targets in batches_until_stopped(loader, stoppable):
        images, targets = model_input(to_device(images, dev)), to_device(targets, dev)
        with device.autocast(precision):
            logits = model(images)
        logits = logits.float()
        correct += topk_correct(logits, targets)
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction='sum')
        seen += len(targets)
    counts = torch.cat([correct, torch.tensor([seen], device=dev)])
    if sum_over_ranks:
        counts, loss_sum = dist.all_reduce_sum(counts), dist.all_reduce_sum(loss_sum)
    correct1, correct5, count = counts.tolist()
    count = max(count, 1)
    stats = {'acc1': 100 * correct1 / count, 'acc5': 100 * correct5 / count, 'loss': loss_sum.item() / count,
             'images': int(count)}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f}" +
          (f'  ({label})' if label else ''))
    return stats
