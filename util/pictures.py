"""Pictures of what a pre-trained model predicts, as image tensors in [0, 1].

A pre-training model turns one batch of its own output into `Panels` (`model.pictures(imgs,
pred, mask)`): the columns of a figure, one row per image. `reconstruct` runs a model on images
with seeded masks and returns them; `visualize.py` lays them out with matplotlib, and pre-training
sends them to TensorBoard as one grid (`panel_grid`). Nothing here imports matplotlib.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.lr_sched import due_at_epoch

MASKED_GRAY = 0.5  # how a masked pixel is shown in the masked input


@dataclass
class Panels:
    titles: list                               # one per column
    images: list                               # one (N, 3, H, W) tensor in [0, 1] per column, all of one size
    notes: list = field(default_factory=list)  # what a reader must know to read the figure


def to_display(imgs):
    """imgs: (N, 3, H, W) normalised with ImageNet's mean and std -> (N, 3, H, W) in [0, 1]"""
    mean = imgs.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, -1, 1, 1)
    std = imgs.new_tensor(IMAGENET_DEFAULT_STD).view(1, -1, 1, 1)
    return (imgs.float() * std + mean).clamp(0, 1)


def unnormalize_patches(pred, target):
    """Predictions of per-patch normalised pixels (a norm-pix loss) back in pixel space, with
    each patch's mean and variance taken from the original image, as the loss normalised it:
    pred * sqrt(var + 1e-6) + mean.

    pred, target: (N, L, D), target the original image's patches
    returns: (N, L, D)
    """
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred * (var + 1.e-6) ** .5 + mean


def reconstruction_panels(imgs, recon, mask_px):
    """The four panels of a pixel reconstruction.

    imgs, recon: (N, 3, H, W) normalised
    mask_px: (N, 1, H, W), 1 = masked
    returns: Panels of the original, the masked input, the reconstruction, and the
             reconstruction with the visible pixels pasted back
    """
    original, predicted = to_display(imgs), to_display(recon)
    pasted = original * (1 - mask_px) + predicted * mask_px
    return Panels(['original', 'masked input', 'reconstruction', 'reconstruction + visible'],
                  [original, masked_view(original, mask_px), predicted, pasted])


def masked_view(original, mask_px):
    """original: (N, 3, H, W) in [0, 1]; mask_px: (N, 1, H, W), 1 = masked -> the masked pixels gray"""
    return original * (1 - mask_px) + MASKED_GRAY * mask_px


def oriented_gradient_picture(cells, glyph_size):
    """Draw HOG histograms as the usual picture: in each cell, a line through its centre for
    each orientation bin, along the edge that the bin's gradient direction crosses (the
    gradient's normal), as bright as the bin's share of the image's largest value.

    cells: (N, bins, Hc, Wc) histograms; bin b holds gradients at angles [b, b + 1) * pi / bins
           measured as atan2(gx, gy) (util's HOG: gx the horizontal, gy the vertical derivative)
    returns: (N, 3, Hc * glyph_size, Wc * glyph_size) in [0, 1]
    """
    bins = cells.shape[1]
    centre = (torch.arange(glyph_size, dtype=torch.float32) + 0.5) - glyph_size / 2
    y, x = torch.meshgrid(centre, centre, indexing='ij')  # pixel offsets from the cell centre, y down
    theta = (torch.arange(bins, dtype=torch.float32) + 0.5) * math.pi / bins
    # the gradient points along (x, y) = (sin theta, cos theta); its edge along (cos theta, -sin theta)
    edge_x, edge_y = torch.cos(theta).view(-1, 1, 1), -torch.sin(theta).view(-1, 1, 1)
    across = (x * edge_y - y * edge_x).abs()      # distance from the edge line
    along = (x * edge_x + y * edge_y).abs()       # distance along it from the centre
    glyphs = ((1 - across).clamp(0, 1) * (along <= glyph_size / 2 - 0.5)).unsqueeze(1)  # (bins, 1, g, g)
    picture = F.conv_transpose2d(cells.float(), glyphs.to(cells.device), stride=glyph_size)
    peak = picture.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (picture / peak).clamp(0, 1).expand(-1, 3, -1, -1)


def upscale(images, factor):
    """(N, C, H, W) -> (N, C, H * factor, W * factor), each pixel a factor x factor block."""
    return images if factor == 1 else images.repeat_interleave(factor, 2).repeat_interleave(factor, 3)


@torch.no_grad()
def reconstruct(model, imgs, mask_generator, seed=0):
    """Run a pre-training model on a batch with masks drawn from `seed` (image i gets the i-th
    draw of one generator), in eval mode and fp32.

    imgs: (N, 3, H, W) normalised, on the model's device
    returns: model.pictures(imgs, pred, mask): Panels
    """
    generator = torch.Generator().manual_seed(seed)
    draws = [mask_generator(generator) for _ in range(imgs.shape[0])]
    mask_kwargs = {k: torch.stack([d[k] for d in draws]).to(imgs.device) for k in draws[0]}
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs.float(), **mask_kwargs, **mask_generator.forward_kwargs)
    finally:
        model.train(was_training)
    return model.pictures(imgs.float(), pred.float(), mask)


def panel_grid(panels, padding=2):
    """One image of all panels: a row per image, a column per panel.
    returns: (3, H', W') in [0, 1]"""
    from torchvision.utils import make_grid
    rows = torch.stack(panels.images, dim=1).flatten(0, 1)  # image 0's panels, then image 1's, ...
    return make_grid(rows.cpu(), nrow=len(panels.images), padding=padding, pad_value=1.0)


class ReconstructionMonitor:
    """Pre-training: every `every` epochs and at the last, the reconstructions of a fixed batch of
    images with fixed masks, as one grid in TensorBoard (`reconstructions`), so that a run shows
    its model improving on the same inputs. Called as the loop's after_epoch hook."""

    def __init__(self, model, mask_generator, images, logger, every, epochs, seed=0):
        self.model, self.mask_generator, self.images, self.logger = model, mask_generator, images, logger
        self.every, self.epochs, self.seed = every, epochs, seed

    def __call__(self, epoch, stats):
        if due_at_epoch(epoch, self.every, self.epochs):
            panels = reconstruct(self.model, self.images, self.mask_generator, self.seed)
            self.logger.log_image('reconstructions', panel_grid(panels), epoch)
        return {}
