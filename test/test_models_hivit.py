"""HiViT: the classifier and MAE-HiViT against the official code's numbers, the official keys and
sizes, masking through the stem, the decoder's restoring of each unit, rpe, the layer ids, and
the loading of official checkpoints."""
import hashlib
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn

import models_hivit
from helpers import formula_state
from util.checkpoint import load_pretrained
from util.optim import param_groups

# Golden values of the official code (zhangxiaosong18/hivit at 2718339, self_supervised/models),
# computed once outside this repository: the tiny architecture of ARCH, every parameter filled by
# `formula_state` over the official names, the images and noise of `inputs`, fp32 on the CPU. The
# key hash is sha256 of the sorted parameter names joined by newlines. The supervised code
# (supervised/models/hivit.py) has the same parameter names and gives the same logits.
OFFICIAL = {
    'classifier': dict(keys=65, key_hash='98ce6496cadfce13', logits=[
        [-0.43081745505332947, -0.1053517684340477, 0.43164363503456116, 0.20298083126544952, -0.4170236587524414,
         -0.35906243324279785, 0.2577727138996124, 0.33839794993400574, -0.2551463842391968, -0.4608561396598816],
        [-0.43545761704444885, -0.10682674497365952, 0.4359363615512848, 0.20546700060367584, -0.42073071002960205,
         -0.36242184042930603, 0.2606884241104126, 0.34244418144226074, -0.25710898637771606, -0.4653646945953369]]),
    'mae': dict(keys=81, key_hash='049e1475e5c6ec32', loss=1.3501027822494507, pred_abs=10377.614139976911,
                pred_first=[0.6021502017974854, 0.1814776360988617, -0.33289840817451477, -0.6878065466880798],
                pred_last=[-0.6497728228569031, -0.826789915561676, -0.587350606918335, -0.05893801897764206]),
    'mae_rpe': dict(keys=83, key_hash='d48ff54a54f56aa5', loss=1.3198951482772827, pred_abs=10301.040456351591,
                    pred_first=[0.4305228888988495, 0.012942079454660416, -0.4269926846027374, -0.6626735329627991],
                    pred_last=[-0.8426293730735779, -0.8901136517524719, -0.5046428442001343, 0.12337882816791534]),
}
# kept units of the golden noise (its 4 smallest values per image), from the official run
OFFICIAL_KEPT = [[3, 6, 10, 14], [1, 5, 9, 12]]
ARCH = dict(img_size=64, patch_size=16, embed_dim=64, depths=(1, 1, 2), num_heads=2, stem_mlp_ratio=3., mlp_ratio=4.,
            norm_layer=partial(nn.LayerNorm, eps=1e-6))
MAE_DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, hifeat=True)


def inputs():
    imgs = torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float64) * 0.011).reshape(2, 3, 64, 64).float() * 1.5
    noise = torch.sin(torch.arange(2 * 16, dtype=torch.float64) * 1.7 + 0.3).reshape(2, 16).float()
    return imgs, noise


def with_formula_weights(model, golden):
    """The model with the official formula weights, after checking its parameter names are the
    official ones; buffers keep their computed values."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert len(shapes) == golden['keys']
    assert hashlib.sha256('\n'.join(sorted(shapes)).encode()).hexdigest()[:16] == golden['key_hash']
    model.load_state_dict(formula_state(shapes), strict=False)
    return model.eval()


def test_classifier_computes_the_official_logits():
    model = with_formula_weights(models_hivit.HiViT(num_classes=10, **ARCH), OFFICIAL['classifier'])
    with torch.no_grad():
        logits = model(inputs()[0])
    torch.testing.assert_close(logits, torch.tensor(OFFICIAL['classifier']['logits']), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind, rpe', [('mae', False), ('mae_rpe', True)])
def test_mae_computes_the_official_loss_prediction_and_mask(kind, rpe):
    golden = OFFICIAL[kind]
    model = with_formula_weights(models_hivit.HiViTMaskedAutoencoder(rpe=rpe, **MAE_DECODER, **ARCH), golden)
    imgs, noise = inputs()
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    assert pred.shape == (2, 16, 16 * 16 * 3)
    assert [row.nonzero().flatten().tolist() for row in (1 - mask)] == OFFICIAL_KEPT
    assert loss.item() == pytest.approx(golden['loss'], rel=1e-5)
    assert pred.double().abs().sum().item() == pytest.approx(golden['pred_abs'], rel=1e-5)
    assert pred[0, 0, :4].tolist() == pytest.approx(golden['pred_first'], rel=1e-5, abs=1e-6)
    assert pred[1, -1, -4:].tolist() == pytest.approx(golden['pred_last'], rel=1e-5, abs=1e-6)


def test_official_supervised_checkpoints_load():
    """The supervised code keeps a relative_position_index in every attention block (no model-level
    one): its checkpoints load, the stored indices (nonsense here) are never read."""
    model = models_hivit.HiViT(num_classes=10, **ARCH)
    state = formula_state({n: tuple(p.shape) for n, p in model.named_parameters()})
    for i in (6, 7):
        state[f'blocks.{i}.attn.relative_position_index'] = torch.full((16, 16), 12345)
    model.load_state_dict(models_hivit.checkpoint_filter_fn(state, model), strict=True)
    with torch.no_grad():
        logits = model.eval()(inputs()[0])
    torch.testing.assert_close(logits, torch.tensor(OFFICIAL['classifier']['logits']), rtol=1e-5, atol=1e-6)


def test_sizes_and_official_keys():
    """66.4 M parameters for HiViT-B (the paper's 66.42 M; the official code's count for every size),
    the official names, and 28 blocks that are not merges (4 + 4 stem MLP blocks, 20 attention)."""
    counts = {name: sum(p.numel() for p in timm.create_model(name).parameters())
              for name in ('hivit_tiny', 'hivit_small', 'hivit_base')}
    assert counts == {'hivit_tiny': 19181668, 'hivit_small': 37526464, 'hivit_base': 66418952}
    base = timm.create_model('hivit_base')
    keys = base.state_dict()
    for key in ('patch_embed.proj.weight', 'patch_embed.norm.weight', 'blocks.0.mlp.fc1.weight',
                'blocks.4.reduction.weight', 'blocks.9.norm.weight', 'blocks.29.attn.relative_position_bias_table',
                'absolute_pos_embed', 'relative_position_index', 'fc_norm.weight', 'head.weight'):
        assert key in keys, key
    assert keys['blocks.10.attn.relative_position_bias_table'].shape == (27 * 27, 8)
    assert len(base.blocks) == 30
    assert [i for i, b in enumerate(base.blocks) if isinstance(b, models_hivit.PatchMerge)] == [4, 9]
    mae = models_hivit.mae_hivit_base_dec512d6b()
    assert sum(p.numel() for p in mae.parameters()) == 87041152  # the official model's count
    assert mae.norm.normalized_shape == (2048 + 1024 + 512,) and len(mae.decoder_blocks) == 6


def test_without_masking_the_mae_encoder_is_the_classifiers():
    """All units kept in a shuffled order: the MAE form's tokens are the classifier's, in that order
    (the relative position bias follows the units, not their slots)."""
    torch.manual_seed(0)
    mae = models_hivit.HiViTMaskedAutoencoder(rpe=True, **MAE_DECODER, **ARCH).eval()
    for p in mae.parameters():  # the tables start at zero: make them matter
        nn.init.normal_(p, std=0.05) if p.dim() == 2 and p.shape[1] == 2 else None
    classifier = models_hivit.HiViT(num_classes=10, **ARCH).eval()
    load_report = classifier.load_state_dict(mae.state_dict(), strict=False)
    assert load_report.missing_keys == ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']
    imgs = torch.randn(2, 3, 64, 64)
    order = torch.stack([torch.randperm(16), torch.randperm(16)])
    with torch.no_grad():
        expected = classifier.forward_features(imgs)
        got = mae.forward_features(imgs, ids_keep=order)
    torch.testing.assert_close(got, torch.stack([expected[i, order[i]] for i in range(2)]), rtol=1e-5, atol=1e-5)


def per_unit_mae():
    """An MAE-HiViT whose attention adds nothing (zero output projections): every unit is encoded
    on its own, so its encoding does not depend on which other units are kept."""
    torch.manual_seed(0)
    model = models_hivit.HiViTMaskedAutoencoder(rpe=False, **MAE_DECODER, **ARCH).eval()
    for blk in model.blocks:
        if getattr(blk, 'attn', None) is not None:
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.attn.proj.bias)
    return model


def test_masking_keeps_the_units_of_the_smallest_noise_and_the_decoder_puts_each_back():
    """With units encoded on their own, the decoder's input at unit j must be the embedding of
    unit j's own encoding (computed with nothing masked) when j is kept, and the mask token when
    it is masked, whatever the order of the noise. Checked against the noise's ranks, not the
    model's indices."""
    model = per_unit_mae()
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    kept = noise < noise.sort(dim=1).values[:, 4:5]  # the 4 smallest values (int(16 x 0.25))
    captured = {}
    model.decoder_blocks[0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        _, _, mask = model(imgs, mask_ratio=0.75, noise=noise)
        alone = model.forward_encoder(imgs, 0.0, noise=torch.arange(16.).expand(2, -1))[0]  # all units, in order
        expected = torch.where(kept[..., None], model.decoder_embed(alone), model.mask_token.expand(2, 16, -1))
    assert torch.equal(mask, (~kept).float())
    torch.testing.assert_close(captured['x'] - model.decoder_pos_embed, expected, rtol=1e-5, atol=1e-5)


def test_the_loss_is_the_normalised_pixel_mse_of_the_masked_units():
    model = per_unit_mae()
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    errors = []
    for n in range(2):
        for unit in mask[n].nonzero().flatten().tolist():
            r, c = divmod(unit, 4)
            patch = imgs[n, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16].permute(1, 2, 0).flatten()  # (p, p, C)
            target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            errors.append(((pred[n, unit] - target) ** 2).mean())
    assert loss.item() == pytest.approx(torch.stack(errors).mean().item(), rel=1e-5)


def test_relative_position_bias_acts_when_on():
    torch.manual_seed(0)
    with_rpe = models_hivit.HiViT(num_classes=10, rpe=True, **ARCH).eval()
    without = models_hivit.HiViT(num_classes=10, rpe=False, **ARCH).eval()
    without.load_state_dict(with_rpe.state_dict(), strict=False)
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(with_rpe(imgs), without(imgs), atol=1e-4)
        for blk in with_rpe.blocks[-2:]:
            nn.init.zeros_(blk.attn.relative_position_bias_table)
        torch.testing.assert_close(with_rpe(imgs), without(imgs))
    assert not any('relative_position' in k for k in without.state_dict())


def test_layer_ids_are_the_official_ones():
    """hivit_base: 28 blocks that are not merges get ids 1..28 in order, a merge the id of the block
    before it, the embeddings 0, the rest 29; lr scale 0.85 ** (29 - id)."""
    model = timm.create_model('hivit_base', num_classes=10)
    not_merges = [i for i in range(30) if i not in (4, 9)]
    expected = {'patch_embed.proj.weight': 0, 'absolute_pos_embed': 0, 'blocks.4.reduction.weight': 4,
                'blocks.9.norm.weight': 8, 'fc_norm.weight': 29, 'head.weight': 29}
    expected.update({f'blocks.{b}.norm2.weight': rank + 1 for rank, b in enumerate(not_merges)})
    assert {k: model.layer_id(k) for k in expected} == expected
    names = {id(p): n for n, p in model.named_parameters()}
    scales = {names[id(p)]: g['lr_scale'] for g in param_groups(model, 0.05, 0.85) for p in g['params']}
    for key, layer in expected.items():
        assert scales[key] == pytest.approx(0.85 ** (29 - layer)), key


def test_weight_decay_spares_norms_biases_and_position_tables_but_not_in_mae_pre_training():
    model = timm.create_model('hivit_tiny_patch8_64', num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in param_groups(model, 0.05) if g['weight_decay'] == 0 for p in g['params']}
    assert {'absolute_pos_embed', 'blocks.13.attn.relative_position_bias_table', 'fc_norm.weight',
            'blocks.0.mlp.fc1.bias'} <= no_decay
    assert 'blocks.2.reduction.weight' not in no_decay and 'blocks.13.attn.qkv.weight' not in no_decay
    # the official MAE-HiViT pre-training decays all but 1-D parameters and biases
    mae = models_hivit.mae_hivit_tiny_patch8_64(depths=(1, 1, 2))
    names = {id(p): n for n, p in mae.named_parameters()}
    no_decay = {names[id(p)] for g in param_groups(mae, 0.05) if g['weight_decay'] == 0 for p in g['params']}
    assert no_decay == {n for n, p in mae.named_parameters() if p.requires_grad and (p.ndim == 1 or n.endswith('.bias'))}


def test_an_mae_hivit_checkpoint_fine_tunes_with_zero_tables(tmp_path):
    """The pre-training has no relative position bias: the classifier's tables start at zero, the
    features' norm and the decoder are dropped, every encoder weight is loaded."""
    torch.manual_seed(0)
    mae = models_hivit.mae_hivit_tiny_patch8_64(depths=(1, 1, 2))
    torch.save({'model': mae.state_dict(), 'args': {'model': 'mae_hivit_tiny'}}, tmp_path / 'mae.pth')
    classifier = timm.create_model('hivit_tiny_patch8_64', depths=(1, 1, 2), num_classes=10)
    report = load_pretrained(classifier, str(tmp_path / 'mae.pth'))
    assert report['missing'] == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert report['unexpected'] == []
    own = classifier.state_dict()
    for key, value in mae.state_dict().items():
        if key.startswith(('patch_embed', 'blocks', 'absolute_pos_embed')):
            assert torch.equal(own[key], value), key
    for blk in classifier.blocks[-2:]:
        assert torch.count_nonzero(blk.attn.relative_position_bias_table) == 0
    # the report says so: tables counted as loaded and the norm left out without a word before
    tables = sorted(n for n, _ in classifier.named_parameters() if n.endswith('relative_position_bias_table'))
    assert report['started at zero'] == tables and len(tables) == 2
    assert {'norm.weight', 'norm.bias'} <= set(report['dropped'])
    assert report['loaded'] == sum(k.startswith(('patch_embed', 'blocks', 'absolute_pos_embed')) for k in mae.state_dict())


def test_checkpoints_of_another_resolution_are_resized(tmp_path):
    small = timm.create_model('hivit_tiny_patch8_64', depths=(1, 1, 2), num_classes=10)
    torch.save({'model': small.state_dict()}, tmp_path / 'small.pth')
    large = timm.create_model('hivit_tiny_patch8_64', depths=(1, 1, 2), num_classes=10, img_size=96)
    report = load_pretrained(large, str(tmp_path / 'small.pth'))
    assert 'absolute_pos_embed (1, 64, 192) -> (1, 144, 192)' in report['resized']
    assert 'blocks.6.attn.relative_position_bias_table (225, 3) -> (529, 3)' in report['resized']
    assert large(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match='multiple of the patch size 16'):
        models_hivit.HiViT(**{**ARCH, 'img_size': 72})
    with pytest.raises(ValueError, match='no cls token'):
        timm.create_model('hivit_tiny_patch8_64', global_pool='token')


def test_without_hifeat_the_encoder_output_is_not_normalised():
    """The official MAE-HiViT normalises the encoder's output only with hifeat (its forward_encoder);
    without, the latent is the main stage's tokens as they are, and the unused norm is not trained."""
    model = models_hivit.HiViTMaskedAutoencoder(**ARCH, **{**MAE_DECODER, 'hifeat': False}).eval()
    imgs, noise = inputs()
    ids_keep = torch.argsort(noise, dim=1)[:, :4]
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(imgs, 0.75, noise)
        torch.testing.assert_close(latent, model.forward_features(imgs, ids_keep))
    assert 'norm.weight' in model.state_dict() and not model.norm.weight.requires_grad
