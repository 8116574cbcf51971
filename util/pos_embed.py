"""Fixed 2-D sine-cosine position embeddings (MAE, SimMIM, MaskFeat, HiViT).

The layout is the one of the official MAE code, so that checkpoints and freshly built models
agree: the first half of the channels encodes the column (x) of a patch, the second half its
row (y); each half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 1 / 10000^(k / (D / 4)).
Values are computed in float64 and stored as float32.
"""
import math

import torch


def get_1d_sincos_pos_embed(embed_dim, positions):
    """
    embed_dim: output channels (even)
    positions: (M,) positions
    returns: (M, embed_dim) float64
    """
    assert embed_dim % 2 == 0, f'embed_dim must be even, got {embed_dim}'
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """
    embed_dim: channels (multiple of 4)
    grid_size: int, patches per side
    returns: (grid_size * grid_size [+ 1], embed_dim) float32, row-major over patches; with
             cls_token a zero row comes first.
    """
    assert embed_dim % 4 == 0, f'embed_dim must be a multiple of 4, got {embed_dim}'
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing='ij')
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols.flatten()),
                     get_1d_sincos_pos_embed(embed_dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def table_image_size(model, state):
    """The image size that the absolute position table of `state` (a key ending in pos_embed, with
    a square grid of rows after 0 or 1 class token) is for, where its rows differ from those of
    `model`'s and its width does not; None where no such table differs so."""
    built_at = next((m.img_size for name, m in model.named_modules()
                     if name.endswith('patch_embed') and getattr(m, 'img_size', None)), None)
    side = built_at[-1] if isinstance(built_at, (tuple, list)) else built_at  # timm's PatchEmbed keeps (H, W)
    for key, table in model.state_dict().items():
        theirs = state.get(key)
        if side is None or not key.endswith('pos_embed') or theirs is None or theirs.dim() != 3 \
                or theirs.shape[1] == table.shape[1] or theirs.shape[2] != table.shape[2]:  # or another model's width
            continue
        for class_tokens in (0, 1):
            ours, trained = math.isqrt(table.shape[1] - class_tokens), math.isqrt(theirs.shape[1] - class_tokens)
            if ours and ours ** 2 == table.shape[1] - class_tokens and trained ** 2 == theirs.shape[1] - class_tokens:
                return side // ours * trained
    return None
