"""SimMIM: the model against the official code's numbers, its masking, loss and mask token, and
the loading of official-layout checkpoints."""
import hashlib
import re

import pytest
import torch

import models_simmim
from helpers import formula_state
from util.errors import UsageError
from util.masking import MaskPatches

# Golden values of the official code (microsoft/SimMIM at d3e29bc, models/simmim.py), computed once
# outside this repository: the same tiny architectures, every weight filled by `formula_state`
# over the official key names, the images and masks of `inputs`, fp32 on the CPU. The key hash is
# sha256 of the sorted official names (buffers left out), joined by newlines.
OFFICIAL = {
    'swin': dict(keys=122, key_hash='4dccfa50f8c042b8', loss=1.0801352262496948, rec_abs=16702.45539021498,
                 rec_first=[0.7270565629005432, 1.014439582824707, 1.0812932252883911, 0.9142906665802002],
                 rec_last=[-1.0575743913650513, -1.1010531187057495, -0.9076609015464783, -0.5196817517280579]),
    'vit': dict(keys=39, key_hash='7710d939a6c8bc0f', loss=1.2200857400894165, rec_abs=13172.798814553302,
                rec_first=[1.2795894145965576, -0.10860897600650787, -1.3631590604782104, -1.1216922998428345],
                rec_last=[0.14277799427509308, -0.010133925825357437, -0.11799783259630203, -0.055609866976737976]),
}


def tiny_swin():
    """The official Swin of the golden values: 64 px, patch 4, 32 wide, depths 2-2-2-2, window 4."""
    return models_simmim.simmim_swin_tiny_patch4_window4_64(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 8))


def tiny_vit():
    """The official ViT of the golden values: 64 px, patch 8, 48 x 2, 2 heads, no drop path."""
    return models_simmim.simmim_vit_tiny_patch8_64(embed_dim=48, depth=2, num_heads=2, drop_path_rate=0.0)


def inputs(grid):
    """Two images and their masks: 4 x 4 mask units of 16 px, expanded to the patch grid."""
    imgs = torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float64) * 0.011).reshape(2, 3, 64, 64).float() * 1.5
    units = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 1]], dtype=torch.float32)
    units = torch.stack([units, 1 - units.flip(1)])
    return imgs, units.repeat_interleave(grid // 4, 1).repeat_interleave(grid // 4, 2)


def official_layout(model):
    """The official checkpoint of a model of ours: official key names (a Swin patch merging at the
    end of its stage, not at the start of the next), formula weights, and the buffers the
    official code stores, filled with nonsense to show that they are never read."""
    names = {}
    for k, v in model.state_dict().items():
        k = re.sub(r'^encoder\.layers\.(\d+)\.downsample', lambda m: f'encoder.layers.{int(m[1]) - 1}.downsample', k)
        names[k] = tuple(v.shape)
    state = formula_state(names)
    for k in list(state):
        if k.endswith('relative_position_bias_table'):
            state[k.replace('bias_table', 'index')] = torch.full((7, 7), 12345)
        if re.match(r'encoder\.layers\.\d+\.blocks\.1\.attn\.relative', k):  # shifted blocks keep a mask
            state[k.split('attn.')[0] + 'attn_mask'] = torch.full((3, 3, 3), float('nan'))
    return {'model': state}


@pytest.mark.parametrize('kind, build, grid', [('swin', tiny_swin, 16), ('vit', tiny_vit, 8)])
def test_official_layout_loads_strictly_and_computes_what_the_official_code_does(kind, build, grid):
    golden = OFFICIAL[kind]
    model = build()
    ckpt = official_layout(model)
    names = sorted(k for k in ckpt['model'] if not k.endswith(('relative_position_index', 'attn_mask')))
    assert len(names) == golden['keys']
    assert hashlib.sha256('\n'.join(names).encode()).hexdigest()[:16] == golden['key_hash']

    model.load_state_dict(models_simmim.checkpoint_filter_fn(ckpt, model), strict=True)
    model.eval()
    imgs, mask = inputs(grid)
    with torch.no_grad():
        loss, pred, returned_mask = model(imgs, mask)
    assert torch.equal(returned_mask, mask)
    assert loss.item() == pytest.approx(golden['loss'], rel=1e-5)
    assert pred.double().abs().sum().item() == pytest.approx(golden['rec_abs'], rel=1e-5)
    assert pred[0, 0, 0, :4].tolist() == pytest.approx(golden['rec_first'], rel=1e-5, abs=1e-6)
    assert pred[1, 2, -1, -4:].tolist() == pytest.approx(golden['rec_last'], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize('build', [tiny_swin, tiny_vit])
def test_loss_is_the_mean_l1_over_masked_pixels(build):
    """The loss against a direct computation: the mean absolute error over every masked pixel and
    channel (the 1e-5 of the formula aside)."""
    torch.manual_seed(0)
    model = build()
    imgs = torch.randn(3, 3, 64, 64)
    loss, pred, mask = model(imgs)
    p = 64 // mask.shape[-1]
    masked = torch.zeros(3, 64, 64, dtype=torch.bool)
    for n, i, j in mask.nonzero().tolist():
        masked[n, i * p:(i + 1) * p, j * p:(j + 1) * p] = True
    errors = (pred - imgs).abs().permute(0, 2, 3, 1)[masked]  # (masked pixels, channels)
    assert loss.item() == pytest.approx(errors.mean().item(), rel=1e-4)
    assert pred.shape == imgs.shape


def test_mask_generator_masks_exactly_ceil_of_the_ratio():
    """192 px Swin (patch 4), units of 32 px: 36 units, 22 masked (ceil 21.6), each unit 8 x 8
    patches; 224 px ViT (patch 16): 49 units, 30 masked (ceil 29.4), each 2 x 2 patches."""
    for size, patch, units, masked in ((192, 4, 36, 22), (224, 16, 49, 30)):
        generator = MaskPatches(size, 32, patch, 0.6)
        for seed in range(5):
            mask = generator(torch.Generator().manual_seed(seed))['mask']
            assert mask.shape == (size // patch, size // patch)
            assert mask.sum().item() == masked * (32 // patch) ** 2
            unit_view = mask.reshape(int(units ** .5), 32 // patch, int(units ** .5), 32 // patch)
            assert (unit_view.amin((1, 3)) == unit_view.amax((1, 3))).all()  # whole units
    drawn = [MaskPatches(64, 16, 4, 0.6)(torch.Generator().manual_seed(s))['mask'] for s in range(2)]
    assert not torch.equal(*drawn)


@pytest.mark.parametrize('args, message', [
    ((192, 24, 16, 0.6), 'must be a positive multiple of the model\'s patch size 16'),
    ((192, 0, 4, 0.6), '--mask_patch_size 0 must be a positive multiple'),
    # 36 units of 32 px: ceil(0.99 x 36) = 36 masked; the bound 35 / 36 = 0.97222 cut to 4 decimals
    ((192, 32, 4, 0.99), 'a mask ratio of 0.99 masks all 36 mask units of 32 px (SimMIM masks ceil(ratio x units)), '
                         'leaving nothing visible: give --mask_ratio 0.9722 or less'),
    ((64, 64, 8, 0.6), 'give a --mask_patch_size below 64 (the image is one mask unit)'),
    ((200, 32, 4, 0.6), 'does not fit a 200-pixel image'),
    ((192, 32, 4, 1.5), '--mask_ratio must be in [0, 1]'),
])
def test_mask_generator_refuses_masks_that_do_not_fit(args, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        MaskPatches(*args)


def test_a_mask_of_the_wrong_grid_is_a_clear_error():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r'one entry per patch, \(2, 8, 8\)'):
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 16, 16))


@pytest.mark.parametrize('build', [tiny_swin, tiny_vit])
def test_mask_token_replaces_masked_embeddings_only(build):
    """The encoder's input: a masked patch's embedding is the mask token, exactly; a visible
    patch's is untouched, whatever the mask token holds."""
    torch.manual_seed(0)
    encoder = build().encoder
    torch.nn.init.normal_(encoder.mask_token, std=1.0)
    imgs = torch.randn(2, 3, 64, 64)
    _, mask = inputs(encoder.patch_embed.grid_size[0])
    seen = {}
    first = encoder.layers[0] if hasattr(encoder, 'layers') else encoder.pos_drop
    first.register_forward_pre_hook(lambda module, args: seen.setdefault('x', args[0]))
    encoder.forward_masked(imgs, mask)
    x = seen['x']
    if x.dim() == 3:  # ViT: (N, 1 + L, D), the cls token first
        x = x[:, 1:].reshape(2, *mask.shape[1:], -1)
    embeddings = encoder.patch_embed(imgs).reshape(x.shape)
    masked = mask.bool()
    assert torch.equal(x[~masked], embeddings[~masked])
    assert torch.equal(x[masked], encoder.mask_token.reshape(1, -1).expand(int(masked.sum()), -1))


def test_factories_are_the_published_architectures():
    swin = models_simmim.simmim_swin_base_patch4_window6_192()
    assert (swin.encoder.embed_dim, [len(s.blocks) for s in swin.encoder.layers]) == (128, [2, 2, 18, 2])
    assert [s.blocks[0].attn.num_heads for s in swin.encoder.layers] == [4, 8, 16, 32]
    assert swin.encoder.layers[0].blocks[0].window_size == (6, 6) and swin.encoder.stride == 32
    assert swin.decoder[0].out_channels == 32 ** 2 * 3
    vit = models_simmim.simmim_vit_base_patch16_224()
    enc = vit.encoder
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads, enc.stride) == (768, 12, 12, 16)
    assert enc.pos_embed is None and enc.rel_pos_bias is not None
    assert all(b.attn.relative_position_bias_table is None for b in enc.blocks)
    assert torch.allclose(enc.blocks[0].gamma_1, torch.full((768,), 0.1))
    assert enc.norm.eps == 1e-6 and isinstance(enc.fc_norm, torch.nn.Identity)
    assert enc.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_official_checkpoints_load_into_the_classifiers_they_fine_tune(tmp_path):
    """An official-layout pre-training checkpoint initialises timm's classifiers: the Swin patch
    mergings land in timm's places and the tables are resized to window 7; the ViT's shared table
    becomes every block's own. The decoder and the mask token are left out."""
    import timm

    from util.checkpoint import load_pretrained
    swin_ckpt = official_layout(tiny_swin())
    torch.save(swin_ckpt, tmp_path / 'swin.pth')
    classifier = timm.create_model('swin_tiny_patch4_window7_224', img_size=64, embed_dim=32, depths=(2, 2, 2, 2),
                                   num_heads=(2, 2, 4, 8), num_classes=5)
    report = load_pretrained(classifier, str(tmp_path / 'swin.pth'))
    official = swin_ckpt['model']
    assert torch.equal(classifier.layers[1].downsample.reduction.weight,
                       official['encoder.layers.0.downsample.reduction.weight'])
    assert torch.equal(classifier.layers[2].blocks[1].mlp.fc1.weight, official['encoder.layers.2.blocks.1.mlp.fc1.weight'])
    assert classifier.layers[0].blocks[0].attn.relative_position_bias_table.shape == (13 * 13, 2)
    assert {'decoder.0.weight', 'mask_token'} <= set(report['dropped']) and report['missing'] == ['head.fc.bias',
                                                                                                  'head.fc.weight']
    # resized: the tables of the stages whose window grew, not the mergings, which only moved a stage on.
    # (2w - 1)^2 rows a table, a column a head (2, 2, 4, 8); w is the window, at most the stage's grid (16, 8,
    # 4, 2 patches): 4, 4, 4, 2 in the checkpoint, 7, 7, 4, 2 in the classifier
    assert report['resized'] == ['*.relative_position_bias_table (49, 2) -> (169, 2)']

    vit_ckpt = official_layout(tiny_vit())
    torch.save(vit_ckpt, tmp_path / 'vit.pth')
    classifier = timm.create_model('beit_tiny_patch8_64', embed_dim=48, depth=2, num_heads=2, num_classes=5)
    report = load_pretrained(classifier, str(tmp_path / 'vit.pth'))
    shared = vit_ckpt['model']['encoder.rel_pos_bias.relative_position_bias_table']
    assert all(torch.equal(b.attn.relative_position_bias_table, shared) for b in classifier.blocks)
    assert torch.equal(classifier.blocks[1].gamma_2, vit_ckpt['model']['encoder.blocks.1.gamma_2'])
    assert sorted(report['missing']) == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert report['resized'] == []  # the shared table became each block's, at its size
    # at 96 px: 12 x 12 patches, (2 x 12 - 1)^2 + 3 rows, from (2 x 8 - 1)^2 + 3 (it was not reported)
    classifier = timm.create_model('beit_tiny_patch8_64', img_size=96, embed_dim=48, depth=2, num_heads=2, num_classes=5)
    report = load_pretrained(classifier, str(tmp_path / 'vit.pth'))
    assert report['resized'] == ['*.relative_position_bias_table (228, 2) -> (532, 2)']


def test_official_checkpoints_are_named_by_their_released_sizes_only():
    """Swin-B (128 wide, 18 blocks in stage 3), Swin-L (192, 18) and ViT-B (768, 12 blocks) are the
    released sizes; an official-layout checkpoint of another size (any Swin not 192 wide was named
    Swin-B, any ViT ViT-B) names no model: its --model must be given."""
    from helpers import official_simmim_keys
    from models_simmim import official_pretraining
    assert official_pretraining(official_simmim_keys('swin'))[0] == 'simmim_swin_base_patch4_window6_192'
    assert official_pretraining(official_simmim_keys('swin', 192))[0] == 'simmim_swin_large_patch4_window12_192'
    assert official_pretraining(official_simmim_keys('vit'))[0] == 'simmim_vit_base_patch16_224'
    assert official_pretraining(official_layout(tiny_swin())) is None
    assert official_pretraining(official_layout(tiny_vit())) is None
    assert official_pretraining(official_simmim_keys('swin', 96)) is None  # a Swin-T


def test_beit_classifier_layer_ids_are_the_usual_vit_ones():
    """SimMIM's ViT ids: embeddings 0, block i is i + 1, fc_norm and the head depth + 1."""
    import timm

    from util.optim import param_groups
    decay, depth = 0.5, 3
    model = timm.create_model('beit_tiny_patch8_64', embed_dim=48, depth=depth, num_heads=2, num_classes=5)
    names = {id(p): name for name, p in model.named_parameters()}
    scales = {names[id(p)]: g['lr_scale'] for g in param_groups(model, 0.05, layer_decay=decay) for p in g['params']}
    assert scales['patch_embed.proj.weight'] == scales['cls_token'] == pytest.approx(decay ** (depth + 1))
    for i in range(depth):
        assert scales[f'blocks.{i}.attn.relative_position_bias_table'] == pytest.approx(decay ** (depth - i))
    assert scales['fc_norm.weight'] == scales['head.weight'] == 1.0


def test_every_recipe_names_a_classifier_that_exists_at_its_size():
    """The fine-tuning recipe of each SimMIM model names a timm classifier, built at its own size."""
    import timm

    from util.registry import native_input_size, pretrain_model_names, pretrain_recipe
    simmim = [name for name in pretrain_model_names() if name.startswith('simmim_')]
    assert len(simmim) == 10  # 5 models, each by its name and its alias
    for name in simmim:
        classifier = pretrain_recipe(name)['finetune']['model']
        assert timm.is_model(classifier), (name, classifier)
        expected = 64 if name.endswith(('tiny', '_64')) else 224
        assert native_input_size(classifier) == expected, (name, classifier)
