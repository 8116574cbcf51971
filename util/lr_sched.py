"""Learning rate, set every step: a linear warm-up from warmup_lr to lr, then one of

    cosine            a half-cosine from lr down to min_lr over the epochs after the warm-up (MAE)
    cosine_whole_run  a half-cosine over all the epochs, the warm-up replacing its start: what
                      SimMIM's official code does (timm's CosineLRScheduler without warmup_prefix),
                      so the lr just after the warm-up is already a little below lr
    step              lr times gamma at each milestone epoch passed (SimMIM's 800-epoch recipe)
"""
import bisect
import math

SCHEDULES = ('cosine', 'cosine_whole_run', 'step')


def lr_at(epoch, lr, min_lr, warmup_epochs, epochs, warmup_lr=0.0, schedule='cosine', milestones=(), gamma=0.1):
    """The learning rate at a fractional epoch (epoch 2.5 = half-way through the third)."""
    if epoch < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    if schedule == 'step':
        return lr * gamma ** bisect.bisect_right(sorted(milestones), epoch)
    start = 0 if schedule == 'cosine_whole_run' else warmup_epochs
    progress = (epoch - start) / max(epochs - start, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# How layer-wise lr decay treats the two bounds of the schedule, the lr the warm-up starts from
# and the floor (min_lr): {name: (warm-up start scaled, floor scaled)} by each group's lr_scale.
LAYER_LR_BOUNDS = {
    'scaled': (True, True),  # MAE (and MAE-HiViT): the whole schedule times lr_scale
    'shared': (False, False),  # SimMIM: timm's schedulers, from and to the same values in every group
    'warmup_scaled': (True, False),  # MaskFeat: mmpretrain's LinearLR (a factor) and CosineAnnealingLR (eta_min)
}


def adjust_learning_rate(optimizer, epoch, args):
    """Set every parameter group's lr for this step: the schedule of its peak lr (args.lr times its
    'lr_scale' under layer decay), from and to the bounds that args.layer_lr_bounds scales.
    returns: the lr of a group of scale 1 (the one logged)"""
    scale_warmup, scale_floor = LAYER_LR_BOUNDS[getattr(args, 'layer_lr_bounds', None) or 'scaled']
    schedule = dict(warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                    schedule=getattr(args, 'lr_schedule', 'cosine'),
                    milestones=getattr(args, 'lr_milestones', None) or (), gamma=getattr(args, 'lr_gamma', 0.1))
    warmup_lr = getattr(args, 'warmup_lr', 0.0)

    def lr_of(scale):
        return lr_at(epoch, args.lr * scale, args.min_lr * (scale if scale_floor else 1.0),
                     warmup_lr=warmup_lr * (scale if scale_warmup else 1.0), **schedule)
    for group in optimizer.param_groups:
        group['lr'] = lr_of(group.get('lr_scale', 1.0))
    return lr_of(1.0)


def due_at_epoch(epoch, every, epochs):
    """Whether something done every `every` epochs and at the last (checkpoint-{epoch}.pth, the
    monitors' pictures and k-NN) is due after `epoch` of `epochs`; never with every = 0."""
    return bool(every) and (epoch % every == 0 or epoch + 1 == epochs)
