"""Loading pre-trained weights into a classifier (--finetune): the official MAE layout, image-size
changes, the key report, and checkpoints that do not fit."""
import pytest
import timm
import torch
import torch.nn.functional as F

import models_mae
import models_vit  # noqa: F401  (registers the vit_* classifiers with timm)
from util import checkpoint
from util.errors import UsageError


def official_encoder_checkpoint(tmp_path, img_size=224):
    """A checkpoint in the layout of the released mae_pretrain_vit_base.pth: {'model': encoder
    weights}, keys from the official model, random values."""
    torch.manual_seed(0)
    mae = models_mae.mae_vit_base_patch16(img_size=img_size)
    encoder = {k: torch.randn_like(v) for k, v in mae.state_dict().items() if k in mae.encoder_keys()}
    path = tmp_path / 'mae_pretrain_vit_base.pth'
    torch.save({'model': encoder}, path)
    return path, encoder


def test_official_encoder_checkpoint_at_another_image_size(tmp_path):
    path, encoder = official_encoder_checkpoint(tmp_path)
    model = timm.create_model('vit_base_patch16', img_size=64, num_classes=10)
    report = checkpoint.load_pretrained(model, str(path))

    assert report['missing'] == ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']
    assert report['unexpected'] == ['norm.bias', 'norm.weight']  # global pooling uses fc_norm instead
    assert report['resized'] == ['pos_embed (1, 197, 768) -> (1, 17, 768)']
    state = model.state_dict()
    torch.testing.assert_close(state['blocks.11.mlp.fc2.weight'], encoder['blocks.11.mlp.fc2.weight'])
    torch.testing.assert_close(state['cls_token'], encoder['cls_token'])
    # the 14x14 grid of the table resampled to 4x4 (bicubic, anti-aliased), the cls row kept
    grid = encoder['pos_embed'][:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode='bicubic', antialias=True, align_corners=False)
    torch.testing.assert_close(state['pos_embed'][:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 16, 768),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state['pos_embed'][:, :1], encoder['pos_embed'][:, :1])
    # the head starts tiny (std 2e-5) with zero bias
    assert 0 < state['head.weight'].std() < 1e-4 and not state['head.bias'].any()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # MaskFeat's recipe (mmpretrain's TruncNormal(std=2e-5, bias=2e-5)) starts the bias at 2e-5
    checkpoint.load_pretrained(model, str(path), head_init_std=2e-5, head_init_bias=2e-5)
    assert torch.equal(model.head.bias, torch.full((10,), 2e-5))


def test_full_pretraining_checkpoint_drops_the_decoder(tmp_path):
    mae = models_mae.mae_vit_tiny_patch8(depth=2)
    torch.save(mae.state_dict(), tmp_path / 'bare.pth')  # a bare state dict, decoder included
    model = timm.create_model('vit_tiny_patch8', depth=2, num_classes=5, global_pool='token')
    report = checkpoint.load_pretrained(model, str(tmp_path / 'bare.pth'))
    assert 'mask_token' in report['dropped'] and 'decoder_pred.weight' in report['dropped']
    assert report['missing'] == ['head.bias', 'head.weight'] and report['unexpected'] == []
    torch.testing.assert_close(model.norm.weight, mae.norm.weight)  # the cls-token form keeps norm


def file_behind(tensor):
    """The file whose mapped pages hold a tensor's data (Linux's /proc/self/maps), or None."""
    address = tensor.untyped_storage().data_ptr()
    with open('/proc/self/maps') as maps:
        for line in maps:
            span, *_, name = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in span.split('-'))
            if start <= address < end:
                return name.strip() if name.startswith('/') else None


def test_header_reads_map_a_zip_checkpoint_and_read_an_old_pickle_whole(tmp_path, monkeypatch):
    """--eval without --model and --finetune's recipe look at a checkpoint's args alone: its tensors
    are mapped from the file, not read (a ViT-L with AdamW state is gigabytes); a pre-1.6 pickle
    checkpoint cannot be mapped and loads as before."""
    import argparse
    import main_finetune
    state = {'model': {'w': torch.arange(6.)}, 'args': argparse.Namespace(model='vit_tiny_patch8')}
    zipped, pickled = tmp_path / 'zip.pth', tmp_path / 'old.pth'
    torch.save(state, zipped)
    torch.save(state, pickled, _use_new_zipfile_serialization=False)
    mapped, whole = checkpoint.load(str(zipped), mmap=True), checkpoint.load(str(pickled), mmap=True)
    assert file_behind(mapped['model']['w']) == str(zipped)  # the file's pages themselves
    assert file_behind(whole['model']['w']) is None
    for loaded in (mapped, whole):
        assert torch.equal(loaded['model']['w'], torch.arange(6.)) and loaded['args'].model == 'vit_tiny_patch8'
    # the entry point's header read asks for the mapping
    asked = []
    real_load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *a, **kw: asked.append(kw.get('mmap')) or real_load(*a, **kw))
    assert main_finetune.classifier_of_checkpoint(str(zipped)) == {'model': 'vit_tiny_patch8'} and asked == [True]


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    mae = models_mae.mae_vit_tiny_patch8(depth=2)
    torch.save({'model': mae.state_dict()}, tmp_path / 'tiny.pth')
    model = timm.create_model('vit_small_patch16', img_size=64, depth=2, num_classes=5)
    with pytest.raises(UsageError, match=r'does not fit this model: shapes \[.*192.*384') as error:
        checkpoint.load_pretrained(model, str(tmp_path / 'tiny.pth'))
    # the file's position table, (64 / 8)^2 + 1 tokens, not the one resampled to (64 / 16)^2 + 1
    assert 'pos_embed (1, 65, 192) vs (1, 17, 384)' in str(error.value)
    torch.save({'epoch': 3}, tmp_path / 'empty.pth')
    with pytest.raises(UsageError, match='holds no model weights'):
        checkpoint.load_pretrained(model, str(tmp_path / 'empty.pth'))


def test_a_checkpoint_of_another_layout_names_the_keys_that_differ(tmp_path, capsys):
    """MAE's ViT into BEiT went through BEiT's filter, which failed with "'NoneType' object has no
    attribute 'shape'"; SimMIM's BEiT into a ViT listed the checkpoint's first keys (cls_token, which
    the ViT has too) as if they did not fit. Both now name the keys each side lacks; and
    main_finetune says which classifier the checkpoint fine-tunes as."""
    from helpers import run_finetune
    from util.registry import create_classifier, create_pretrain_model
    for name in ('mae_vit_tiny', 'simmim_vit_tiny'):
        torch.save({'model': create_pretrain_model(name, img_size=64).state_dict(),
                    'args': {'model': name, 'input_size': 64}}, tmp_path / f'{name}.pth')
    beit = create_classifier('beit_tiny_patch8_64', img_size=64, num_classes=10)
    with pytest.raises(UsageError) as error:
        checkpoint.load_pretrained(beit, str(tmp_path / 'mae_vit_tiny.pth'))
    assert 'NoneType' not in str(error.value)
    assert "model keys not in the checkpoint ['blocks.0.gamma_1', 'blocks.0.gamma_2', " in str(error.value)
    assert "checkpoint keys not in the model ['pos_embed', 'blocks.0.attn.qkv.bias', " in str(error.value)
    vit = create_classifier('vit_tiny_patch8', img_size=64, num_classes=10)
    with pytest.raises(UsageError) as error:
        checkpoint.load_pretrained(vit, str(tmp_path / 'simmim_vit_tiny.pth'))
    assert "checkpoint keys not in the model ['rel_pos_bias.relative_position_bias_table', " in str(error.value)
    assert 'cls_token' not in str(error.value) and 'shapes' not in str(error.value)  # no empty lists
    with pytest.raises(UsageError, match=r'; it fine-tunes as --model vit_tiny_patch8: leave --model out$'):
        run_finetune('--finetune', tmp_path / 'mae_vit_tiny.pth', '--model', 'beit_tiny_patch8_64', '--device', 'cpu',
                     '--data_path', 'demo', '--max_steps', 1, '--epochs', 1, '--output_dir', tmp_path / 'run')


def test_weights_in_the_wrappers_other_code_saves_them_in_load_as_the_bare_state(tmp_path):
    """DeepSpeed/BEiT's 'module', PySlowFast's 'model_state', a DDP model saved with its `module.`
    prefix and a safetensors file (timm's hub weights, export.py's output) all give the same weights."""
    from safetensors.torch import save_file
    mae = models_mae.mae_vit_tiny_patch8(depth=2)
    expected = mae.state_dict()
    torch.save({'module': expected, 'epoch': 3}, tmp_path / 'module.pth')
    torch.save({'model_state': expected}, tmp_path / 'model_state.pth')
    torch.save({'model': {f'module.{k}': v for k, v in expected.items()}}, tmp_path / 'ddp.pth')
    save_file({k: v.contiguous() for k, v in expected.items()}, tmp_path / 'weights.safetensors')
    torch.save(expected, tmp_path / 'model.pt.safetensors.pth')  # its name says nothing: the bytes decide
    # torch.compile's `_orig_mod.` (alone, or inside DDP's `module.`), and an AveragedModel's (SWA) `module.` with its
    # count n_averaged: each was refused as another model's keys
    compiled = torch.compile(mae).state_dict()
    torch.save({'model': compiled}, tmp_path / 'compiled.pth')
    torch.save({'model': {f'module.{k}': v for k, v in compiled.items()}}, tmp_path / 'ddp_compiled.pth')
    torch.save(torch.optim.swa_utils.AveragedModel(mae).state_dict(), tmp_path / 'swa.pth')
    for name in ('module.pth', 'model_state.pth', 'ddp.pth', 'weights.safetensors', 'model.pt.safetensors.pth',
                 'compiled.pth', 'ddp_compiled.pth', 'swa.pth'):
        path = str(tmp_path / name)
        state = checkpoint.model_state_of(checkpoint.load(path), path)
        assert state.keys() == expected.keys(), name
        assert all(torch.equal(state[k], v) for k, v in expected.items()), name
    model = timm.create_model('vit_tiny_patch8', depth=2, num_classes=5, global_pool='token')
    report = checkpoint.load_pretrained(model, str(tmp_path / 'weights.safetensors'))
    assert report['missing'] == ['head.bias', 'head.weight']
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, expected['blocks.1.mlp.fc2.weight'])
    # a safetensors file cut short, a 'model' entry without tensors: one line each
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'weights.safetensors').read_bytes()[:5000])
    with pytest.raises(UsageError, match="cannot load '.*cut.safetensors' as a safetensors file"):
        checkpoint.load(str(tmp_path / 'cut.safetensors'))
    torch.save({'model': {'epoch': 3}}, tmp_path / 'not_weights.pth')
    with pytest.raises(UsageError, match='holds no model weights'):
        checkpoint.load_pretrained(model, str(tmp_path / 'not_weights.pth'))
    # EMA weights alone: where they are read (it said "holds no model weights")
    torch.save({'model_ema': expected, 'args': {}}, tmp_path / 'ema_only.pth')
    with pytest.raises(UsageError, match=r"ema_only.pth' holds EMA weights only \(its 'model_ema' entry\): --eval and "
                                         r"export.py read them with --model_ema"):
        checkpoint.load_pretrained(model, str(tmp_path / 'ema_only.pth'))


def test_classifiers_by_name():
    from util.registry import create_classifier
    model = create_classifier('vit_tiny_patch8', num_classes=7, drop_path_rate=0.1)
    assert model.head.out_features == 7 and model.global_pool == 'avg'
    assert create_classifier('resnet18', num_classes=3).fc.out_features == 3  # any timm model
    with pytest.raises(UsageError, match=r"unknown model 'vit_base_patch61'.*vit_base_patch16"):
        create_classifier('vit_base_patch61')


def test_layer_decay_scales():
    """lr_scale = decay ** (depth + 1 - layer_id): embeddings are layer 0, block i is layer i + 1,
    the final norm and head are layer depth + 1."""
    from util.optim import param_groups
    depth, decay = 3, 0.65
    model = timm.create_model('vit_tiny_patch8', depth=depth, num_classes=5)

    def layer_id(name):
        if name.startswith(('cls_token', 'pos_embed', 'patch_embed')):
            return 0
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1
        return depth + 1
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in param_groups(model, 0.05, layer_decay=decay):
        for p in group['params']:
            name = names[id(p)]
            seen.add(name)
            assert group['lr_scale'] == pytest.approx(decay ** (depth + 1 - layer_id(name))), name
            assert group['weight_decay'] == (0.05 if p.ndim > 1 and name not in ('cls_token', 'pos_embed') else 0.0)
    assert seen == set(dict(model.named_parameters()))


def test_evaluate_counts_exactly():
    """Accuracy of a fixed 'model' (the logits are the inputs) against a count by hand, with
    uneven shards from ShardSampler covering every image once."""
    from torch.utils.data import DataLoader, TensorDataset
    from util.datasets import SeededSamples, ShardSampler
    from util.device import Device
    from util.engine import evaluate
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(23, 7, generator=g)
    targets = torch.randint(0, 7, (23,), generator=g)
    dataset = SeededSamples(TensorDataset(logits, targets), seed=0)
    shards = [list(ShardSampler(dataset, 3, r)) for r in range(3)]
    assert sorted(i for shard in shards for i, _ in shard) == list(range(23))

    loader = DataLoader(dataset, sampler=ShardSampler(dataset, 1, 0), batch_size=5)
    stats = evaluate(torch.nn.Identity(), loader, Device('cpu', None), 'fp32')
    ranks = (logits > logits[torch.arange(23), targets][:, None]).sum(1)  # classes scored higher
    assert stats['images'] == 23
    assert stats['acc1'] == pytest.approx(100 * (ranks == 0).float().mean().item())
    assert stats['acc5'] == pytest.approx(100 * (ranks < 5).float().mean().item())
    expected_loss = -torch.log_softmax(logits.double(), 1)[torch.arange(23), targets].mean().item()
    assert stats['loss'] == pytest.approx(expected_loss, rel=1e-6)


def test_layer_decay_scales_for_swin():
    """Hierarchical models too, with SimMIM's layer ids: Swin's blocks, counted in order through
    its stages, are layers 1..n, a patch merging goes with the last block before it (timm's own
    grouping would put it with the next one), the patch embedding is layer 0, the final norm
    and the head layer n + 1."""
    from util.optim import param_groups
    decay, depths = 0.5, (1, 1, 2, 1)
    model = timm.create_model('swin_tiny_patch4_window7_224', img_size=64, window_size=4, embed_dim=24,
                              depths=depths, num_heads=(1, 1, 1, 1), num_classes=3)
    blocks = [f'layers.{s}.blocks.{b}.' for s, n in enumerate(depths) for b in range(n)]
    n = len(blocks)
    names = {id(p): name for name, p in model.named_parameters()}
    scales = {names[id(p)]: g['lr_scale'] for g in param_groups(model, 0.05, layer_decay=decay) for p in g['params']}
    assert scales['patch_embed.proj.weight'] == pytest.approx(decay ** (n + 1))
    for layer, prefix in enumerate(blocks, start=1):
        in_block = [s for name, s in scales.items() if name.startswith(prefix)]
        assert in_block and all(s == pytest.approx(decay ** (n + 1 - layer)) for s in in_block), prefix
    # the merging at the start of timm's stage s is the end of stage s - 1 in SimMIM's (official) layout
    last_block_of_stage = {1: 1, 2: 2, 3: 4}
    for stage, layer in last_block_of_stage.items():
        assert scales[f'layers.{stage}.downsample.reduction.weight'] == pytest.approx(decay ** (n + 1 - layer))
    assert scales['head.fc.weight'] == 1.0 and scales['norm.weight'] == 1.0


def test_a_published_size_that_patches_do_not_divide_is_built():
    """SigLIP's so400m is published at 384 px with 14-px patches (timm leaves the last 6 pixels
    out by design): its own size is built; another size they do not fit is refused."""
    from util.registry import create_classifier
    with torch.device('meta'):  # shapes only: no weights are made
        create_classifier('vit_so400m_patch14_siglip_384', img_size=384, num_classes=10)
        with pytest.raises(UsageError, match='at 380 px: its patches of 14 px every 14 px leave the last pixels out; '
                                             'give an --input_size that fits, e.g. 378 or 392'):
            create_classifier('vit_so400m_patch14_siglip_384', img_size=380, num_classes=10)
