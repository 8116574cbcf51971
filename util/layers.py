"""Running a model's blocks, shared by the model files."""
import torch
from torch.utils.checkpoint import checkpoint


def apply_blocks(blocks, x, checkpointed=False, *args, **kwargs):
    """x through each block in turn: x = block(x, *args, **kwargs).

    With `checkpointed` (--grad_ckpt) and gradients on, a block keeps only its input: its inner
    activations are recomputed in the backward pass, about a third more compute for much less
    memory (what ViT-H and HiViT-L need on one device). The random draws of drop path are replayed
    exactly in the recomputation, so the result is the same either way.
    """
    use_checkpoint = checkpointed and torch.is_grad_enabled()
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False, **kwargs) if use_checkpoint else block(x, *args, **kwargs)
    return x
