"""SimMIM as a user runs it: the published recipes as defaults, the schedules against timm's,
weight decay as the official code sets it, masks drawn per sample in the data pipeline, a demo
pre-training whose loss falls, fine-tuning from it at another window size, the ModelZoo cases,
and bad input."""
import sys

import pytest
import torch

from helpers import (assert_loss_fell, finetune_demo_checkpoint, official_simmim_keys, read_jsonl, run_demo_pretraining,
                     run_finetune, run_pretrain, run_script)
from util.errors import UsageError

CPU = ['--num_workers', 0, '--device', 'cpu']


def parse_pretrain(*argv):
    import main_pretrain
    args = main_pretrain.get_args_parser().parse_args(['--data_path', 'demo', *map(str, argv)])
    main_pretrain.fill_recipe(args)
    return args


def test_pretraining_defaults_are_the_published_recipes():
    # microsoft/SimMIM configs: simmim_pretrain__swin_base__img192_window6__100ep.yaml (and 800ep): 192 px,
    # BASE_LR 2e-4 / WARMUP_LR 1e-6 / MIN_LR 1e-5 per 512 images, 10 warm-up epochs, AdamW (0.9, 0.999),
    # wd 0.05, clip 5.0, mask units of 32 px at ratio 0.6, RandomResizedCrop(0.67, 1) bilinear
    a = parse_pretrain('--model', 'simmim_swin_base')
    assert (a.input_size, a.epochs, a.warmup_epochs, a.lr_schedule) == (192, 100, 10, 'cosine_whole_run')
    assert (a.blr * 2, a.warmup_blr * 2, a.min_blr * 2) == pytest.approx((2e-4, 1e-6, 1e-5))
    assert (a.opt_betas, a.weight_decay, a.clip_grad) == ([0.9, 0.999], 0.05, 5.0)
    assert (a.mask_ratio, a.mask_patch_size, a.crop_min, a.interpolation) == (0.6, 32, 0.67, 'bilinear')
    assert a.norm_pix_loss is None
    # the 800-epoch recipe: 1e-4 per 512, warm-up from 5e-7 per 512, x0.1 at epoch 700
    a = parse_pretrain('--model', 'simmim_swin_base', '--epochs', 800)
    assert (a.blr * 2, a.warmup_blr * 2) == pytest.approx((1e-4, 5e-7))
    assert (a.lr_schedule, a.lr_milestones, a.lr_gamma) == ('step', [700], 0.1)
    a = parse_pretrain('--model', 'simmim_vit_base')
    assert (a.input_size, a.epochs, a.lr_schedule, a.lr_milestones, a.blr * 2) == (224, 800, 'step', [700], 1e-4)
    # every flag wins; an absolute bound replaces the per-256 one
    a = parse_pretrain('--model', 'simmim_swin_base', '--blr', 3e-4, '--clip_grad', 0, '--min_lr', 1e-6)
    assert (a.blr, a.clip_grad, a.min_lr, a.min_blr) == (3e-4, None, 1e-6, None)
    # MAE keeps its own
    a = parse_pretrain('--model', 'mae_vit_base')
    assert (a.input_size, a.blr, a.opt_betas, a.mask_ratio, a.norm_pix_loss, a.crop_min, a.clip_grad) == \
        (224, 1.5e-4, [0.9, 0.95], 0.75, True, 0.2, None)


def test_finetuning_recipe_comes_with_a_simmim_checkpoint(tmp_path):
    """A SimMIM checkpoint (ours: its args; official: its keys and yacs config) brings SimMIM's
    fine-tuning recipe: 1.25e-3 per 512, warm-up 20 from 2.5e-7 per 512, clip 5, layer decay 0.9 after
    100 epochs of Swin-B, 0.8 after 800, 0.65 for ViT-B."""
    import main_finetune
    cases = [({'args': {'model': 'simmim_swin_base', 'epochs': 100}}, 'swin_base_patch4_window7_224', 0.9),
             ({'args': {'model': 'simmim_swin_base', 'epochs': 800}}, 'swin_base_patch4_window7_224', 0.8),
             (official_simmim_keys('vit'), 'beit_base_patch16_224', 0.65),
             (official_simmim_keys('swin'), 'swin_base_patch4_window7_224', 0.9)]
    for i, (ckpt, model, layer_decay) in enumerate(cases):
        path = tmp_path / f'{i}.pth'
        torch.save(ckpt, path)
        args = main_finetune.get_args_parser().parse_args(['--data_path', 'demo', '--finetune', str(path)])
        main_finetune.fill_recipe(args)
        assert (args.model, args.layer_decay, args.epochs, args.warmup_epochs, args.clip_grad) == \
            (model, layer_decay, 100, 20, 5.0)
        assert (args.blr * 2, args.warmup_blr * 2, args.min_blr * 2) == pytest.approx((1.25e-3, 2.5e-7, 2.5e-7))
        assert args.min_lr is None and args.input_size == 224
        assert args.layer_lr_bounds == 'shared'  # timm's scheduler: one warm-up start and floor for every layer


def test_official_checkpoint_with_its_yacs_configuration(tmp_path, monkeypatch):
    """The official code saves its yacs CfgNode in the checkpoint: it is read as plain dicts with
    weights_only (yacs need not be installed, none of its code runs), and its TRAIN.EPOCHS picks the
    recipe (800 epochs: layer decay 0.8)."""
    import sys
    import types

    import main_finetune
    from util import checkpoint
    yacs, config_module = types.ModuleType('yacs'), types.ModuleType('yacs.config')

    class CfgNode(dict):  # what yacs' node is to pickle: a dict subclass with attributes
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.__dict__['__immutable__'] = True
    CfgNode.__module__, CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    config_module.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, 'yacs', yacs)
    monkeypatch.setitem(sys.modules, 'yacs.config', config_module)
    config = CfgNode(TRAIN=CfgNode(EPOCHS=800), MODEL=CfgNode(TYPE='swin'))
    torch.save({**official_simmim_keys('swin'), 'config': config, 'epoch': 799}, tmp_path / 'official.pth')
    monkeypatch.delitem(sys.modules, 'yacs.config')
    monkeypatch.delitem(sys.modules, 'yacs')

    loaded = checkpoint.load(str(tmp_path / 'official.pth'))
    assert loaded['config'] == {'TRAIN': {'EPOCHS': 800}, 'MODEL': {'TYPE': 'swin'}}
    args = main_finetune.get_args_parser().parse_args(['--data_path', 'demo', '--finetune',
                                                       str(tmp_path / 'official.pth')])
    main_finetune.fill_recipe(args)
    assert (args.model, args.layer_decay) == ('swin_base_patch4_window7_224', 0.8)


def test_a_classifier_is_built_for_its_own_image_size_by_default():
    """Without --input_size, a model registered for 64 or 192 px is trained at that size (and timm's
    at theirs), in every mode; this is what the data transforms are built for too."""
    import main_finetune
    for argv, size in ((['--model', 'beit_tiny_patch8_64'], 64), (['--model', 'swin_base_patch4_window6_192'], 192),
                       (['--model', 'vit_tiny_patch8'], 64), (['--model', 'vit_base_patch16'], 224),
                       (['--model', 'swin_base_patch4_window7_224', '--linprobe', '--finetune', 'x.pth'], 224),
                       (['--model', 'beit_tiny_patch8_64', '--input_size', 96], 96)):
        args = main_finetune.get_args_parser().parse_args(['--data_path', 'demo', *map(str, argv)])
        main_finetune.fill_recipe(args)
        assert args.input_size == size, argv


def test_cosine_whole_run_is_timms_scheduler_without_warmup_prefix():
    """SimMIM's official schedule is timm's CosineLRScheduler(t_initial=all steps, warmup_prefix=False),
    stepped once per optimizer step: compare every step of a short run."""
    from timm.scheduler import CosineLRScheduler
    from util.lr_sched import lr_at
    steps_per_epoch, epochs, warmup, lr, min_lr, warmup_lr = 7, 12, 3, 1e-3, 1e-5, 1e-6
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    timm_sched = CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=min_lr,
                                   warmup_lr_init=warmup_lr, warmup_t=warmup * steps_per_epoch, cycle_limit=1,
                                   t_in_epochs=False)
    for t in range(epochs * steps_per_epoch):
        expected = timm_sched._get_lr(t)[0]
        assert lr_at(t / steps_per_epoch, lr, min_lr, warmup, epochs, warmup_lr=warmup_lr,
                     schedule='cosine_whole_run') == pytest.approx(expected, rel=1e-9), t


def test_step_schedule():
    from util.lr_sched import lr_at
    kwargs = dict(warmup_lr=5e-7, schedule='step', milestones=[700], gamma=0.1)
    assert lr_at(0, 1e-4, 0, 10, 800, **kwargs) == 5e-7
    assert lr_at(5, 1e-4, 0, 10, 800, **kwargs) == pytest.approx((5e-7 + 1e-4) / 2)
    assert lr_at(699.9, 1e-4, 0, 10, 800, **kwargs) == 1e-4
    assert lr_at(700, 1e-4, 0, 10, 800, **kwargs) == pytest.approx(1e-5)


def test_weight_decay_as_the_official_code():
    """The official get_pretrain_param_groups: no decay for 1-D parameters, biases, the names of
    model.no_weight_decay() and the names containing a keyword of no_weight_decay_keywords(); the
    official SimMIM prefixes both sets with 'encoder.'. Its Swin's sets are {'absolute_pos_embed',
    'mask_token'} and the keyword {'relative_position_bias_table'} (which, prefixed, matches no
    name: the tables are decayed); its ViT's {'pos_embed', 'cls_token'} and no keyword."""
    import models_simmim
    from util.optim import param_groups

    def official_exempt(name, param, skip, keywords):
        prefixed = {f'encoder.{k}' for k in keywords}
        return (len(param.shape) == 1 or name.endswith('.bias') or name in {f'encoder.{k}' for k in skip}
                or any(k in name for k in prefixed))

    for model, skip, keywords in (
            (models_simmim.simmim_swin_tiny_patch4_window4_64(depths=(1, 1, 1, 1)),
             {'absolute_pos_embed', 'mask_token'}, {'relative_position_bias_table'}),
            (models_simmim.simmim_vit_tiny_patch8_64(depth=2), {'pos_embed', 'cls_token'}, set())):
        names = {id(p): n for n, p in model.named_parameters()}
        no_decay = {names[id(p)] for g in param_groups(model, 0.05) if g['weight_decay'] == 0 for p in g['params']}
        expected = {n for n, p in model.named_parameters() if official_exempt(n, p, skip, keywords)}
        assert no_decay == expected
        assert any('relative_position_bias_table' in n for n in set(names.values()) - no_decay)


def test_masks_are_drawn_per_sample_from_seed_epoch_and_index():
    import models_simmim
    from util.datasets import SeededSamples, build_image_folder, pretrain_transform
    model = models_simmim.simmim_vit_tiny_patch8_64(depth=1)
    args = type('Args', (), dict(mask_ratio=0.6, mask_patch_size=16))()
    dataset = SeededSamples(build_image_folder('demo', 'train', pretrain_transform(64)), 0,
                            mask_generator=model.mask_generator(args))
    image, kwargs = dataset[(3, 1)]
    again = dataset[(3, 1)][1]['mask']
    assert torch.equal(kwargs['mask'], again) and kwargs['mask'].shape == (8, 8)
    assert kwargs['mask'].sum() == 10 * 4  # ceil(0.6 x 16 units) of 2 x 2 patches
    assert not torch.equal(kwargs['mask'], dataset[(3, 2)][1]['mask'])
    assert not torch.equal(kwargs['mask'], dataset[(4, 1)][1]['mask'])


@pytest.fixture(scope='module')
def vit_pretraining(demo_root, tmp_path_factory):
    """12 steps of 32 demo images with the tiny BEiT-style ViT, a log line every 2 (the loss falls to 0.73 of its
    first value)."""
    return run_demo_pretraining('simmim_vit_tiny', tmp_path_factory.mktemp('simmim_vit_tiny'), blr=3e-3, max_steps=12,
                                log_freq=2)


def test_demo_pretraining_loss_falls(vit_pretraining):
    assert_loss_fell(vit_pretraining)


def test_finetuning_from_the_demo_pretraining_expands_the_shared_table(small_folder, vit_pretraining, tmp_path):
    """The recipe's classifier (beit_tiny_patch8_64, a table per block) starts from the shared one."""
    from util import checkpoint
    finetune_demo_checkpoint(vit_pretraining, tmp_path, small_folder)
    epoch = read_jsonl(tmp_path / 'log.txt')[-1]
    assert epoch['test_acc1'] >= 0 and torch.isfinite(torch.tensor(epoch['train_loss']))
    shared = checkpoint.load(vit_pretraining / 'checkpoint-last.pth')['model'][
        'encoder.rel_pos_bias.relative_position_bias_table']
    import main_finetune
    args = main_finetune.get_args_parser().parse_args(
        ['--data_path', 'demo', '--finetune', str(vit_pretraining / 'checkpoint-last.pth')])
    main_finetune.fill_recipe(args)
    model = main_finetune.build_model(args, 10, resuming=False)
    for block in model.blocks:
        assert torch.equal(block.attn.relative_position_bias_table.detach(), shared)


def test_swin_pretraining_fine_tunes_at_another_window_size(small_folder, tmp_path, capsys):
    """Pre-trained with window 4 at 64 px, fine-tuned as timm's Swin-T with window 7: the tables of
    the stages where the window grows are resized (7 x 7 -> 13 x 13 entries) and training runs (on
    small_folder: the evaluation of 17 images, not the demo's 500, with a full-width Swin-T)."""
    run_pretrain('--model', 'simmim_swin_tiny', '--data_path', small_folder, '--epochs', 1, '--max_steps', 2,
                 '--batch_size', 16, *CPU, '--output_dir', tmp_path / 'pre')
    capsys.readouterr()
    run_finetune('--model', 'swin_tiny_patch4_window7_224', '--input_size', 64, '--data_path', small_folder,
                 '--finetune', tmp_path / 'pre' / 'checkpoint-last.pth', '--batch_size', 16, '--epochs', 1,
                 '--max_steps', 2, '--log_freq', 1, *CPU, '--output_dir', tmp_path / 'ft')
    out = capsys.readouterr().out
    assert 'layers.0.blocks.0.attn.relative_position_bias_table (49, 3) -> (169, 3)' in out
    assert 'layers.3.blocks.0.attn.relative_position_bias_table' not in out.split('resized:')[1].split('\n')[0]
    steps = read_jsonl(tmp_path / 'ft' / 'log.jsonl')
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s['loss'])) for s in steps)


def test_modelzoo_full_cases_reach_simmims_effective_batch(tmp_path):
    import modelzoo
    case = modelzoo.Case('pretrain', 'full', 8, ['--data_path=demo', '--model=simmim_swin_base'])
    args = case.entry_point_args()
    # 128 images x 8 devices x 2 micro-batches = 2048
    assert args[args.index('--batch_size') + 1] == '128' and args[args.index('--accum_iter') + 1] == '2'
    # fine-tuning a SimMIM checkpoint: SimMIM's classifier and batch (2048), not MAE's (1024)
    torch.save({'model': {}, 'args': {'model': 'simmim_swin_base', 'epochs': 100}}, tmp_path / 'simmim.pth')
    case = modelzoo.Case('finetune', 'full', 8, ['--data_path=demo', f'--finetune_pth={tmp_path / "simmim.pth"}'])
    args = case.entry_point_args()
    assert case.name == 'swin_base_patch4_window7_224_finetune_bs128_8p_acc'
    assert args[args.index('--batch_size') + 1] == '128' and args[args.index('--accum_iter') + 1] == '2'


def test_bad_input_is_one_line(vit_pretraining, tmp_path):
    with pytest.raises(UsageError, match='multiple of the model\'s patch size 8'):
        run_pretrain('--model', 'simmim_vit_tiny', '--data_path', 'demo', '--mask_patch_size', 12, *CPU,
                     '--output_dir', tmp_path)
    with pytest.raises(UsageError, match='does not fit a 72-pixel image'):
        run_pretrain('--model', 'simmim_vit_tiny', '--data_path', 'demo', '--input_size', 72, *CPU,
                     '--output_dir', tmp_path)
    # 80 px: 2.5 tokens of 32 px at Swin's last stage, which timm pads to 3 (the loss met a 96-px rebuild)
    from util.registry import create_pretrain_model
    with pytest.raises(UsageError, match='the image size 80 must be a multiple of 32, the pixels one token'):
        create_pretrain_model('simmim_swin_tiny', img_size=80)
    # a ViT checkpoint into a Swin classifier: one line naming the keys that do not fit
    result = run_script(sys.executable, 'main_finetune.py', '--model', 'swin_tiny_patch4_window4_64', '--data_path', 'demo',
                        '--finetune', vit_pretraining / 'checkpoint-last.pth', *CPU, '--output_dir', tmp_path)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert last_line.startswith('error: ') and 'does not fit this model' in last_line
    assert "'blocks.0." in last_line and "'layers.0." in last_line


def test_eval_of_an_official_layout_fine_tuned_swin(small_folder, tmp_path):
    """--eval reads a fine-tuned Swin in the official layout (patch merging at the end of a stage,
    'head.*', stored buffers) as the same weights in timm's: the same accuracy and loss."""
    import re

    import main_finetune
    from util.registry import create_classifier
    torch.manual_seed(0)
    model = create_classifier('swin_tiny_patch4_window4_64', num_classes=2)
    ours = model.state_dict()
    official = {re.sub(r'^layers\.(\d+)\.downsample', lambda m: f'layers.{int(m[1]) - 1}.downsample', k)
                .replace('head.fc.', 'head.'): v for k, v in ours.items()}
    official['layers.0.blocks.0.attn.relative_position_index'] = torch.zeros(16, 16, dtype=torch.long)
    torch.save({'model': ours}, tmp_path / 'ours.pth')
    torch.save({'model': official}, tmp_path / 'official.pth')
    results = []
    for name in ('ours', 'official'):
        args = main_finetune.get_args_parser().parse_args(
            ['--eval', '--model', 'swin_tiny_patch4_window4_64', '--data_path', small_folder, '--nb_classes', '2',
             '--resume', str(tmp_path / f'{name}.pth'), '--batch_size', '8', '--num_workers', '0', '--device', 'cpu',
             '--output_dir', str(tmp_path / name)])
        results.append(main_finetune.main(args))
    assert results[0]['images'] == 17
    assert results[0]['acc1'] == results[1]['acc1'] and results[0]['loss'] == pytest.approx(results[1]['loss'], rel=1e-6)
