"""Tests of models_mae.MaskedAutoencoderViT against independent computations.

Every expected value here is computed by the test itself (numpy or explicit loops in float64,
the published formulas, a functional re-statement of the official MAE forward, timm's own
VisionTransformer), never copied from the output of the code under test. Small models, CPU,
float32 unless stated otherwise.
"""
import math
import pathlib
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models_mae  # noqa: E402
from models_mae import MaskedAutoencoderViT  # noqa: E402
from util.errors import UsageError  # noqa: E402
from util.pos_embed import get_2d_sincos_pos_embed  # noqa: E402


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add synchronisation, and on a loaded machine
    OpenMP's spinning makes each op 10-100x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------
# small configurations
# ------------------------------------------------------------------------------------------
SMALL = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, mlp_ratio=4.)
# the registered test model, shrunk: 64x64 px, 8x8 patches (L = 64), 192-d / 3 heads,
# decoder 128 x 2 / 4 heads (as its docstring and DESIGN.md describe it)
TINY = dict(img_size=64, patch_size=8, in_chans=3, embed_dim=192, depth=2, num_heads=3,
            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4.)
CONFIGS = {'small': SMALL, 'tiny': TINY}


def build(cfg_name, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = CONFIGS[cfg_name]
    if cfg_name == 'tiny':
        model = models_mae.mae_vit_tiny_patch8(depth=cfg['depth'], **overrides)
    else:
        model = MaskedAutoencoderViT(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), **overrides)
    return model.float().eval()


def perturb_(model, seed=1, scale=0.05):
    """Move every parameter (LayerNorm scales/shifts, biases, tokens, position tables too) away
    from its initial value, so a term that is left out or mis-wired cannot hide behind a zero
    bias or a unit scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def rand_imgs(n, cfg, seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = cfg['img_size']
    return torch.randn(n, cfg['in_chans'], s, s, generator=g, dtype=dtype)


def num_patches(cfg):
    return (cfg['img_size'] // cfg['patch_size']) ** 2


def rand_noise(n, L, seed=3):
    return torch.rand(n, L, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------
# 1. patchify / unpatchify
# ------------------------------------------------------------------------------------------
def test_patchify_unpatchify_round_trip_and_direct_slices():
    model = build('small')
    cfg = SMALL
    p = cfg['patch_size']
    g = cfg['img_size'] // p
    imgs = rand_imgs(2, cfg)

    x = model.patchify(imgs)
    assert x.shape == (2, g * g, p * p * cfg['in_chans'])
    assert torch.equal(model.unpatchify(x), imgs)
    assert torch.equal(model.patchify(model.unpatchify(x)), x)

    # patch k = i * g + j is the (p, p, C) flattening of the pixel block at row i, column j
    for n in range(imgs.shape[0]):
        for i in range(g):
            for j in range(g):
                block = imgs[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                assert torch.equal(x[n, i * g + j], block.permute(1, 2, 0).reshape(-1))


# ------------------------------------------------------------------------------------------
# 2. masking
# ------------------------------------------------------------------------------------------
def test_a_ratio_that_leaves_no_patch_visible_is_refused():
    """int(L * (1 - ratio)) patches stay visible: at least one must (MAE-HiViT's encoder failed on
    none with a reshape error); the bound given is the largest ratio that keeps one."""
    from util.masking import UniformNoise
    for L, largest in ((16, 0.9375), (196, 0.9948)):  # 1 - 1/16; 1 - 1/196 = 0.99490 keeps 0.9996: rounded down
        assert int(L * (1 - largest)) == 1
        UniformNoise(L, largest)
        with pytest.raises(UsageError, match=f'a mask ratio of 0.9999 leaves none of the {L} patches visible: give '
                                             f'--mask_ratio {largest} or less$'):
            UniformNoise(L, 0.9999)


@pytest.mark.parametrize('mask_ratio', [0.0, 0.25, 0.5, 0.6, 0.75, 0.9])
def test_mask_count_and_which_patches_are_masked(mask_ratio):
    model = build('small')
    L = num_patches(SMALL)
    N = 3
    imgs = rand_imgs(N, SMALL)
    noise = rand_noise(N, L)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)

    len_keep = int(L * (1 - mask_ratio))
    assert mask.shape == (N, L)
    assert torch.equal(mask.sum(dim=1), torch.full((N,), float(L - len_keep)))

    # independently: the rank of each patch's noise; ranks >= len_keep are masked
    ranks = np.argsort(np.argsort(noise.numpy(), axis=1, kind='stable'), axis=1, kind='stable')
    expected = (ranks >= len_keep).astype(np.float32)
    np.testing.assert_array_equal(mask.numpy(), expected)
    assert pred.shape == (N, L, SMALL['patch_size'] ** 2 * SMALL['in_chans'])


def test_same_noise_same_result_and_different_noise_different_mask():
    model = build('small')
    L = num_patches(SMALL)
    imgs = rand_imgs(2, SMALL)
    noise = rand_noise(2, L, seed=10)
    with torch.no_grad():
        torch.manual_seed(100)
        a = model(imgs, mask_ratio=0.75, noise=noise)
        torch.manual_seed(200)  # the global generator must not matter when noise is given
        b = model(imgs, mask_ratio=0.75, noise=noise.clone())
        c = model(imgs, mask_ratio=0.75, noise=rand_noise(2, L, seed=11))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[2], c[2])


def test_random_masking_keeps_smallest_noise_and_ids_restore_undoes_shuffle():
    model = build('small')
    N, L, D = 3, 16, 5
    x = torch.randn(N, L, D, generator=torch.Generator().manual_seed(4))
    noise = rand_noise(N, L, seed=5)
    mask_ratio = 0.75
    len_keep = int(L * (1 - mask_ratio))
    x_masked, mask, ids_restore = model.random_masking(x, mask_ratio, noise)

    assert x_masked.shape == (N, len_keep, D)
    noise_np = noise.numpy()
    for n in range(N):
        order = np.argsort(noise_np[n], kind='stable')  # ascending: small noise is kept
        kept = order[:len_keep]
        # the kept tokens, in increasing order of their noise
        assert torch.equal(x_masked[n], x[n, torch.from_numpy(kept)])
        # ids_restore is the inverse permutation of the noise sort
        inverse = np.empty(L, dtype=np.int64)
        inverse[order] = np.arange(L)
        np.testing.assert_array_equal(ids_restore[n].numpy(), inverse)
        # shuffled sequence (kept first, then the dropped ones) gathered by ids_restore = x
        shuffled = x[n, torch.from_numpy(order)]
        assert torch.equal(shuffled[ids_restore[n]], x[n])
        # the mask marks exactly the dropped positions
        expected_mask = np.ones(L, dtype=np.float32)
        expected_mask[kept] = 0
        np.testing.assert_array_equal(mask[n].numpy(), expected_mask)


@pytest.mark.parametrize('bad_shape', [(2, 15), (3, 16), (2, 16, 1), (16,)])
def test_noise_of_wrong_shape_is_rejected(bad_shape):
    model = build('small')
    imgs = rand_imgs(2, SMALL)
    with pytest.raises(ValueError):
        model(imgs, mask_ratio=0.75, noise=torch.rand(*bad_shape))


# ------------------------------------------------------------------------------------------
# 3. loss
# ------------------------------------------------------------------------------------------
def loss_by_loops(pred, imgs, mask, p, norm_pix):
    """The MAE loss with explicit loops in float64: per patch, the mean squared error over its
    pixels (target = the patch in (p, p, C) order, optionally normalised by its own mean and
    unbiased variance), averaged over the masked patches."""
    pred = pred.detach().double().numpy()
    imgs = imgs.detach().double().numpy()
    mask = mask.detach().double().numpy()
    N, C, H, W = imgs.shape
    g = H // p
    total, count = 0.0, 0.0
    for n in range(N):
        for i in range(g):
            for j in range(g):
                k = i * g + j
                target = imgs[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p].transpose(1, 2, 0).reshape(-1)
                if norm_pix:
                    target = (target - target.mean()) / math.sqrt(target.var(ddof=1) + 1e-6)
                err = float(np.mean((pred[n, k] - target) ** 2))
                total += mask[n, k] * err
                count += mask[n, k]
    return total / count


@pytest.mark.parametrize('norm_pix', [False, True])
def test_forward_loss_matches_loops(norm_pix):
    model = build('small', norm_pix_loss=norm_pix)
    cfg = SMALL
    N, L = 3, num_patches(cfg)
    imgs = rand_imgs(N, cfg) * 2.0 + 0.3
    g = torch.Generator().manual_seed(6)
    pred = torch.randn(N, L, cfg['patch_size'] ** 2 * cfg['in_chans'], generator=g)
    mask = (torch.rand(N, L, generator=g) < 0.6).float()
    mask[0, 0] = 1  # at least one masked patch
    got = model.forward_loss(imgs, pred, mask)
    assert got.dim() == 0
    want = loss_by_loops(pred, imgs, mask, cfg['patch_size'], norm_pix)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-7)

    # and the loss forward() returns is that of its own pred and mask
    with torch.no_grad():
        loss, pred2, mask2 = model(imgs, mask_ratio=0.75, noise=rand_noise(N, L))
    want2 = loss_by_loops(pred2, imgs, mask2, cfg['patch_size'], norm_pix)
    assert loss.item() == pytest.approx(want2, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------
# 4. state_dict keys and shapes of the official checkpoints; loading them
# ------------------------------------------------------------------------------------------
def official_mae_shapes(img_size, patch_size, in_chans, embed_dim, depth, decoder_embed_dim,
                        decoder_depth, mlp_ratio=4):
    """Names and shapes of an official MAE checkpoint's `model` dict, written from the published
    architecture (facebookresearch/mae models_mae.py built on timm 0.3.2 Block/PatchEmbed)."""
    T = (img_size // patch_size) ** 2 + 1  # patches + cls
    out = {
        'cls_token': (1, 1, embed_dim),
        'pos_embed': (1, T, embed_dim),
        'patch_embed.proj.weight': (embed_dim, in_chans, patch_size, patch_size),
        'patch_embed.proj.bias': (embed_dim,),
    }

    def block(prefix, d):
        h = int(d * mlp_ratio)
        return {
            prefix + 'norm1.weight': (d,), prefix + 'norm1.bias': (d,),
            prefix + 'attn.qkv.weight': (3 * d, d), prefix + 'attn.qkv.bias': (3 * d,),
            prefix + 'attn.proj.weight': (d, d), prefix + 'attn.proj.bias': (d,),
            prefix + 'norm2.weight': (d,), prefix + 'norm2.bias': (d,),
            prefix + 'mlp.fc1.weight': (h, d), prefix + 'mlp.fc1.bias': (h,),
            prefix + 'mlp.fc2.weight': (d, h), prefix + 'mlp.fc2.bias': (d,),
        }

    for i in range(depth):
        out.update(block(f'blocks.{i}.', embed_dim))
    out.update({'norm.weight': (embed_dim,), 'norm.bias': (embed_dim,)})
    out.update({
        'decoder_embed.weight': (decoder_embed_dim, embed_dim),
        'decoder_embed.bias': (decoder_embed_dim,),
        'mask_token': (1, 1, decoder_embed_dim),
        'decoder_pos_embed': (1, T, decoder_embed_dim),
    })
    for i in range(decoder_depth):
        out.update(block(f'decoder_blocks.{i}.', decoder_embed_dim))
    out.update({
        'decoder_norm.weight': (decoder_embed_dim,), 'decoder_norm.bias': (decoder_embed_dim,),
        'decoder_pred.weight': (patch_size ** 2 * in_chans, decoder_embed_dim),
        'decoder_pred.bias': (patch_size ** 2 * in_chans,),
    })
    return out


def is_decoder_key(name):
    # what the released encoder-only checkpoints (mae_pretrain_vit_*.pth) leave out
    return name.startswith('decoder_') or name == 'mask_token'


VIT_B = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
             decoder_embed_dim=512, decoder_depth=8, mlp_ratio=4)


def shapes_of(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope='module')
def vit_b_meta():
    with torch.device('meta'):
        return models_mae.mae_vit_base_patch16()


def test_vit_b_state_dict_keys_and_shapes_are_official(vit_b_meta):
    expected = official_mae_shapes(**VIT_B)
    got = shapes_of(vit_b_meta.state_dict())
    assert set(got) == set(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    assert got == expected
    # spot checks with the published numbers written out
    assert len(got) == 4 + 12 * 12 + 2 + 4 + 8 * 12 + 4 == 254
    assert got['cls_token'] == (1, 1, 768)
    assert got['pos_embed'] == (1, 197, 768)
    assert got['patch_embed.proj.weight'] == (768, 3, 16, 16)
    assert got['blocks.11.attn.qkv.weight'] == (2304, 768)
    assert got['blocks.0.mlp.fc1.weight'] == (3072, 768)
    assert got['blocks.5.mlp.fc2.weight'] == (768, 3072)
    assert got['decoder_embed.weight'] == (512, 768)
    assert got['mask_token'] == (1, 1, 512)
    assert got['decoder_pos_embed'] == (1, 197, 512)
    assert got['decoder_blocks.7.attn.qkv.weight'] == (1536, 512)
    assert got['decoder_blocks.7.mlp.fc1.weight'] == (2048, 512)
    assert got['decoder_pred.weight'] == (768, 512)
    assert got['decoder_pred.bias'] == (768,)
    assert 'decoder_blocks.8.norm1.weight' not in got and 'blocks.12.norm1.weight' not in got


def test_vit_b_official_checkpoints_load(vit_b_meta):
    # shapes-only tensors (meta) stand in for the released files' values
    expected = official_mae_shapes(**VIT_B)
    full = {'model': {k: torch.empty(s, device='meta') for k, s in expected.items()}}
    vit_b_meta.load_state_dict(full['model'], strict=True)  # *_full.pth, mae_visualize_*.pth
    encoder = {k: v for k, v in full['model'].items() if not is_decoder_key(k)}
    assert len(encoder) == 150
    assert set(vit_b_meta.encoder_keys()) == set(encoder)
    vit_b_meta.load_encoder_state_dict(encoder)  # mae_pretrain_vit_base.pth
    wrong = dict(encoder)
    wrong['blocks.3.attn.qkv.weight'] = torch.empty(768, 768, device='meta')
    with pytest.raises(UsageError):
        vit_b_meta.load_encoder_state_dict(wrong)


def test_small_model_keys_full_load_roundtrip_through_file(tmp_path):
    model = build('small')
    cfg = SMALL
    expected = official_mae_shapes(cfg['img_size'], cfg['patch_size'], cfg['in_chans'],
                                   cfg['embed_dim'], cfg['depth'], cfg['decoder_embed_dim'],
                                   cfg['decoder_depth'], cfg['mlp_ratio'])
    assert shapes_of(model.state_dict()) == expected

    g = torch.Generator().manual_seed(7)
    sd = {k: torch.randn(s, generator=g) for k, s in expected.items()}
    path = tmp_path / 'mae_visualize_small.pth'
    torch.save({'model': sd}, path)
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    result = model.load_state_dict(ckpt['model'], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    # the loaded weights are really used: the fixed tables now hold the loaded values
    assert torch.equal(model.pos_embed.detach(), sd['pos_embed'])


def test_encoder_only_load_changes_exactly_the_encoder():
    model = build('small')
    cfg = SMALL
    expected = official_mae_shapes(cfg['img_size'], cfg['patch_size'], cfg['in_chans'],
                                   cfg['embed_dim'], cfg['depth'], cfg['decoder_embed_dim'],
                                   cfg['decoder_depth'], cfg['mlp_ratio'])
    enc_names = {k for k in expected if not is_decoder_key(k)}
    assert set(model.encoder_keys()) == enc_names

    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(8)
    enc = {k: torch.randn(expected[k], generator=g) for k in sorted(enc_names)}
    model.load_encoder_state_dict(enc)
    after = model.state_dict()
    for k in expected:
        if k in enc_names:
            assert torch.equal(after[k], enc[k]), k
            assert not torch.equal(after[k], before[k]), k
        else:
            assert torch.equal(after[k], before[k]), k


def test_encoder_only_load_rejects_extra_missing_or_misshaped_keys():
    model = build('small')
    own = model.state_dict()
    enc = {k: torch.randn(v.shape) for k, v in own.items() if not is_decoder_key(k)}
    before = {k: v.clone() for k, v in own.items()}

    extra_decoder = dict(enc, **{'decoder_embed.weight': own['decoder_embed.weight'].clone()})
    extra_head = dict(enc, **{'head.weight': torch.randn(10, SMALL['embed_dim'])})
    missing = {k: v for k, v in enc.items() if k != 'norm.bias'}
    misshaped = dict(enc, **{'norm.bias': torch.randn(SMALL['embed_dim'] + 1)})
    for bad in (extra_decoder, extra_head, missing, misshaped):
        with pytest.raises(UsageError):
            model.load_encoder_state_dict(bad)
        # a rejected dict leaves the model as it was
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


def test_position_tables_are_frozen_parameters():
    model = build('small')
    params = dict(model.named_parameters())
    for name in ('pos_embed', 'decoder_pos_embed'):
        assert name in params and isinstance(params[name], nn.Parameter)
        assert params[name].requires_grad is False
    assert params['cls_token'].requires_grad and params['mask_token'].requires_grad


# ------------------------------------------------------------------------------------------
# 5. fixed 2-D sin-cos position embedding
# ------------------------------------------------------------------------------------------
def sincos_by_loops(D, g, cls_token):
    """MAE's table: patch (row i, column j) at index i * g + j; channels
    [0, D/4) sin(j w_k), [D/4, D/2) cos(j w_k), [D/2, 3D/4) sin(i w_k), [3D/4, D) cos(i w_k),
    w_k = 1 / 10000 ** (k / (D / 4)); a zero row first for the cls token."""
    q = D // 4
    rows = [[0.0] * D] if cls_token else []
    for i in range(g):
        for j in range(g):
            row = [0.0] * D
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                row[k] = math.sin(j * w)
                row[q + k] = math.cos(j * w)
                row[2 * q + k] = math.sin(i * w)
                row[3 * q + k] = math.cos(i * w)
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize('D,g,cls_token', [(16, 3, True), (16, 3, False), (8, 5, True), (64, 4, False)])
def test_2d_sincos_pos_embed_matches_formula(D, g, cls_token):
    got = get_2d_sincos_pos_embed(D, g, cls_token=cls_token)
    want = sincos_by_loops(D, g, cls_token)
    assert tuple(got.shape) == tuple(want.shape) == (g * g + int(cls_token), D)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    if cls_token:
        assert torch.equal(got[0], torch.zeros(D, dtype=got.dtype))


def test_model_position_tables_match_formula():
    model = build('small')
    g = SMALL['img_size'] // SMALL['patch_size']
    torch.testing.assert_close(model.pos_embed.detach()[0].double(),
                               sincos_by_loops(SMALL['embed_dim'], g, True), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decoder_pos_embed.detach()[0].double(),
                               sincos_by_loops(SMALL['decoder_embed_dim'], g, True), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# 6. the encoder is a timm VisionTransformer
# ------------------------------------------------------------------------------------------
def test_encoder_weights_load_into_timm_vit_and_agree():
    from timm.models.vision_transformer import VisionTransformer

    cfg = SMALL
    model = perturb_(build('small'))
    vit = VisionTransformer(img_size=cfg['img_size'], patch_size=cfg['patch_size'],
                            in_chans=cfg['in_chans'], embed_dim=cfg['embed_dim'], depth=cfg['depth'],
                            num_heads=cfg['num_heads'], mlp_ratio=4, qkv_bias=True,
                            norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
                            global_pool='token').eval()
    own = model.state_dict()
    vit.load_state_dict({k: own[k] for k in model.encoder_keys()}, strict=True)

    N, L = 2, num_patches(cfg)
    imgs = rand_imgs(N, cfg)
    keep_order = torch.arange(L, dtype=torch.float32).div(L).expand(N, L)  # argsort = identity
    with torch.no_grad():
        want = vit.forward_features(imgs)
        latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio=0.0, noise=keep_order)
    assert torch.equal(mask, torch.zeros(N, L))
    assert torch.equal(ids_restore, torch.arange(L).expand(N, L))
    assert latent.shape == want.shape == (N, L + 1, cfg['embed_dim'])
    torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# 7. equivalence with the official MAE algorithm (functional reference)
# ------------------------------------------------------------------------------------------
def ref_layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_linear(x, weight, bias):
    return x @ weight.t() + bias


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_softmax(x):
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_block(x, P, prefix, num_heads):
    """timm 0.3.2 Block: x + attn(norm1(x)), then x + mlp(norm2(x)); qkv is one linear map whose
    output is laid out (3, heads, head_dim); softmax(q k^T * head_dim^-0.5) v; exact GELU."""
    B, T, C = x.shape
    hd = C // num_heads
    h = ref_layer_norm(x, P[prefix + 'norm1.weight'], P[prefix + 'norm1.bias'])
    qkv = ref_linear(h, P[prefix + 'attn.qkv.weight'], P[prefix + 'attn.qkv.bias'])
    qkv = qkv.reshape(B, T, 3, num_heads, hd)
    q = qkv[:, :, 0].transpose(1, 2)  # (B, heads, T, hd)
    k = qkv[:, :, 1].transpose(1, 2)
    v = qkv[:, :, 2].transpose(1, 2)
    attn = ref_softmax(torch.matmul(q, k.transpose(-2, -1)) * hd ** -0.5)
    o = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, C)
    x = x + ref_linear(o, P[prefix + 'attn.proj.weight'], P[prefix + 'attn.proj.bias'])
    h = ref_layer_norm(x, P[prefix + 'norm2.weight'], P[prefix + 'norm2.bias'])
    h = ref_gelu(ref_linear(h, P[prefix + 'mlp.fc1.weight'], P[prefix + 'mlp.fc1.bias']))
    return x + ref_linear(h, P[prefix + 'mlp.fc2.weight'], P[prefix + 'mlp.fc2.bias'])


def ref_mae_forward(P, cfg, imgs, mask_ratio, noise, norm_pix_loss):
    """The official MAE forward, restated: returns (loss, pred, mask)."""
    N, C, H, W = imgs.shape
    p = cfg['patch_size']
    g = H // p
    L = g * g
    D, Dd = cfg['embed_dim'], cfg['decoder_embed_dim']

    # patch embedding: a stride-p convolution is a linear map of each (C, p, p) pixel block
    blocks_cpp = imgs.reshape(N, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(N, L, C * p * p)
    x = ref_linear(blocks_cpp, P['patch_embed.proj.weight'].reshape(D, C * p * p),
                   P['patch_embed.proj.bias'])
    x = x + P['pos_embed'][:, 1:, :]

    # random masking: keep the len_keep patches of smallest noise, in increasing noise order
    len_keep = int(L * (1 - mask_ratio))
    keep = torch.argsort(noise, dim=1)[:, :len_keep]
    x = torch.stack([x[n, keep[n]] for n in range(N)])
    mask = torch.ones(N, L, dtype=imgs.dtype)
    for n in range(N):
        mask[n, keep[n]] = 0

    # encoder on [cls] + visible patches
    cls = (P['cls_token'] + P['pos_embed'][:, :1, :]).expand(N, 1, D)
    x = torch.cat([cls, x], dim=1)
    for i in range(cfg['depth']):
        x = ref_block(x, P, f'blocks.{i}.', cfg['num_heads'])
    x = ref_layer_norm(x, P['norm.weight'], P['norm.bias'])

    # decoder: every position gets the mask token, the visible ones their encoded token
    y = ref_linear(x, P['decoder_embed.weight'], P['decoder_embed.bias'])
    full = P['mask_token'].expand(N, L, Dd).clone()
    for n in range(N):
        full[n, keep[n]] = y[n, 1:]
    y = torch.cat([y[:, :1], full], dim=1) + P['decoder_pos_embed']
    for i in range(cfg['decoder_depth']):
        y = ref_block(y, P, f'decoder_blocks.{i}.', cfg['decoder_num_heads'])
    y = ref_layer_norm(y, P['decoder_norm.weight'], P['decoder_norm.bias'])
    pred = ref_linear(y, P['decoder_pred.weight'], P['decoder_pred.bias'])[:, 1:]

    # loss: per-patch MSE against the (p, p, C) pixels, mean over the masked patches
    target = imgs.reshape(N, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(N, L, p * p * C)
    if norm_pix_loss:
        mu = target.mean(dim=-1, keepdim=True)
        var = ((target - mu) ** 2).sum(dim=-1, keepdim=True) / (target.shape[-1] - 1)
        target = (target - mu) / torch.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    loss = (per_patch * mask).sum() / mask.sum()
    return loss, pred, mask


@pytest.mark.parametrize('cfg_name', ['small', 'tiny'])
@pytest.mark.parametrize('mask_ratio', [0.75, 0.5])
@pytest.mark.parametrize('norm_pix_loss', [False, True])
def test_forward_matches_official_algorithm(cfg_name, mask_ratio, norm_pix_loss):
    cfg = CONFIGS[cfg_name]
    model = perturb_(build(cfg_name, norm_pix_loss=norm_pix_loss))
    N, L = 2, num_patches(cfg)
    imgs = rand_imgs(N, cfg)
    noise = rand_noise(N, L)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        P = {k: v.clone() for k, v in model.state_dict().items()}
        ref_loss, ref_pred, ref_mask = ref_mae_forward(P, cfg, imgs, mask_ratio, noise, norm_pix_loss)
    assert torch.equal(mask, ref_mask)
    assert pred.shape == ref_pred.shape
    torch.testing.assert_close(pred, ref_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('norm_pix_loss', [False, True])
def test_forward_matches_official_algorithm_float64(norm_pix_loss):
    # in float64 the only differences left are rounding: agree to ~1e-12
    cfg = TINY
    model = perturb_(build('tiny', norm_pix_loss=norm_pix_loss)).double()
    N, L = 2, num_patches(cfg)
    imgs = rand_imgs(N, cfg, dtype=torch.float64)
    noise = rand_noise(N, L)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
        P = {k: v.clone() for k, v in model.state_dict().items()}
        ref_loss, ref_pred, ref_mask = ref_mae_forward(P, cfg, imgs, 0.75, noise, norm_pix_loss)
    assert torch.equal(mask.double(), ref_mask)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)


def test_gradients_flow_to_trainable_parameters_only():
    # the frozen tables get no gradient; every other parameter (encoder, decoder, tokens) does
    model = perturb_(build('small'))
    imgs = rand_imgs(2, SMALL)
    loss, _, _ = model(imgs, mask_ratio=0.75, noise=rand_noise(2, num_patches(SMALL)))
    loss.backward()
    for name, p in model.named_parameters():
        if name in ('pos_embed', 'decoder_pos_embed'):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
