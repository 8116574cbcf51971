"""Learning rate: linear warm-up, then a half-cosine down to min_lr, set every step."""
import math


def lr_at(epoch, lr, min_lr, warmup_epochs, epochs):
    """The learning rate at a fractional epoch (epoch 2.5 = half-way through the third)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch, args):
    """Set every parameter group's lr for this step (times its 'lr_scale' under layer decay)."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
    return lr
