"""HiViT as a user runs it: the published recipes as defaults (supervised, MAE-HiViT, fine-tuning
after it), the ModelZoo cases with and without a checkpoint, a demo pre-training whose loss falls,
supervised training from scratch that learns, and fine-tuning from the demo checkpoint."""
import pytest
import torch

from helpers import assert_loss_fell, finetune_demo_checkpoint, read_jsonl, run_demo_pretraining, run_finetune

CPU = ['--num_workers', 0, '--device', 'cpu']


@pytest.fixture(scope='module')
def mae_hivit_pretraining(demo_root, tmp_path_factory):
    """24 steps of 32 demo images with the tiny MAE-HiViT (its loss falls to 75 % of the first)."""
    return run_demo_pretraining('mae_hivit_tiny', tmp_path_factory.mktemp('mae_hivit_tiny'), blr=6e-3, max_steps=24)


def parse(entry_point, *argv):
    import importlib
    module = importlib.import_module(entry_point)
    args = module.get_args_parser().parse_args(['--data_path', 'demo', *map(str, argv)])
    module.fill_recipe(args)
    return args


def test_supervised_defaults_are_the_official_recipe():
    """Official HiViT (Swin's trainer): 5e-4 / 5e-7 / 5e-6 per 512 images for the peak, warm-up start
    and floor, 20 warm-up epochs of 300, timm's cosine over the whole run, AdamW (0.9, 0.999), wd 0.05,
    no clipping, drop path 0.05 / 0.3 / 0.5 for tiny / small / base."""
    for model, drop_path in (('hivit_tiny', 0.05), ('hivit_small', 0.3), ('hivit_base', 0.5)):
        a = parse('main_finetune', '--model', model)
        assert (a.blr * 2, a.warmup_blr * 2, a.min_blr * 2) == pytest.approx((5e-4, 5e-7, 5e-6))
        assert (a.epochs, a.warmup_epochs, a.lr_schedule, a.drop_path) == (300, 20, 'cosine_whole_run', drop_path)
        assert (a.opt_betas, a.weight_decay, a.clip_grad, a.layer_decay) == ([0.9, 0.999], 0.05, None, None)
        assert (a.aa, a.mixup, a.cutmix, a.smoothing, a.reprob) == ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25)
        assert a.recipe_source == f'the supervised recipe published for {model}'
    # other models keep DeiT's (from 1e-6, timm's cosine over the whole run as well); a flag wins
    a = parse('main_finetune', '--model', 'vit_base_patch16')
    assert (a.warmup_epochs, a.warmup_lr, a.min_lr, a.recipe_source) == (5, 1e-6, 1e-5, None)
    assert parse('main_finetune', '--model', 'hivit_base', '--drop_path', 0.1).drop_path == 0.1


def test_mae_hivit_defaults_and_its_fine_tuning_recipe(tmp_path):
    """Official MAE-HiViT: blr 1e-4 (1.6e-3 at 4096), (0.9, 0.95), wd 0.05, 40 warm-up epochs of 1600
    (800 published too), crop (0.2, 1), norm-pix loss; fine-tuning hivit_base: blr 5e-4, layer decay
    0.85, drop path 0.2, 100 epochs, 5 warm-up, min lr 1e-6."""
    a = parse('main_pretrain', '--model', 'mae_hivit_base')
    assert (a.blr * 4096 / 256, a.opt_betas, a.weight_decay) == (pytest.approx(1.6e-3), [0.9, 0.95], 0.05)
    assert (a.epochs, a.warmup_epochs, a.crop_min, a.norm_pix_loss, a.mask_ratio) == (1600, 40, 0.2, True, 0.75)
    assert parse('main_pretrain', '--model', 'mae_hivit_base', '--epochs', 800).epochs == 800
    torch.save({'model': {}, 'args': {'model': 'mae_hivit_base_dec512d6b', 'epochs': 1600}}, tmp_path / 'mae.pth')
    a = parse('main_finetune', '--finetune', tmp_path / 'mae.pth')
    assert (a.model, a.blr, a.layer_decay, a.drop_path, a.epochs, a.warmup_epochs, a.min_lr) == \
        ('hivit_base', 5e-4, 0.85, 0.2, 100, 5, 1e-6)
    assert a.recipe_source == 'the fine-tuning recipe published for mae_hivit_base_dec512d6b checkpoints'


def test_modelzoo_cases_reach_the_published_batches(tmp_path):
    import modelzoo
    # supervised from scratch, no --finetune_pth: HiViT's 128 x 8 = 1024; on 4 devices, 2 micro-batches
    case = modelzoo.Case('finetune', 'full', 8, ['--data_path=demo', '--model=hivit_base', '--nproc=4'])
    args = case.entry_point_args()
    assert case.name == 'hivit_base_finetune_bs128_4p_acc' and '--finetune' not in args
    assert args[args.index('--batch_size') + 1] == '128' and args[args.index('--accum_iter') + 1] == '2'
    # a timm model without a recipe of its own: DeiT's 64 x 16 = 1024
    args = modelzoo.Case('finetune', 'full', 8, ['--data_path=demo', '--model=vit_small_patch16']).entry_point_args()
    assert args[args.index('--batch_size') + 1] == '64' and args[args.index('--accum_iter') + 1] == '2'
    # MAE-HiViT: 256 x 8 x 2 = 4096, then 64 x 8 x 2 = 1024 fine-tuning hivit_base
    args = modelzoo.Case('pretrain', 'full', 8, ['--data_path=demo', '--model=mae_hivit_base']).entry_point_args()
    assert args[args.index('--batch_size') + 1] == '256' and args[args.index('--accum_iter') + 1] == '2'
    torch.save({'model': {}, 'args': {'model': 'mae_hivit_base', 'epochs': 1600}}, tmp_path / 'mae.pth')
    case = modelzoo.Case('finetune', 'full', 8, ['--data_path=demo', f'--finetune_pth={tmp_path / "mae.pth"}'])
    args = case.entry_point_args()
    assert case.name == 'hivit_base_finetune_bs64_8p_acc'
    assert args[args.index('--batch_size') + 1] == '64' and args[args.index('--accum_iter') + 1] == '2'


def test_demo_pretraining_loss_falls(mae_hivit_pretraining):
    assert_loss_fell(mae_hivit_pretraining)


def test_the_demo_checkpoint_fine_tunes_with_its_recipe(small_folder, mae_hivit_pretraining, tmp_path, capsys):
    finetune_demo_checkpoint(mae_hivit_pretraining, tmp_path, small_folder)
    out = capsys.readouterr().out
    assert 'fine-tuning recipe published for mae_hivit_tiny checkpoints' in out
    assert 'model hivit_tiny_patch8_64' in out
    assert 'missing: fc_norm.bias, fc_norm.weight, head.bias, head.weight' in out


def test_supervised_training_from_scratch_learns(tmp_path, capsys):
    """hivit_tiny_patch8_64 from random weights with its recipe, shortened for the demo (no
    warm-up, a higher lr, no augmentation or mixing, 32 px: a quarter of its 64's tokens): 60 steps of
    32 images (1,920 of the 2,000) lift the top-1 on the 500 validation images well above chance
    (10 % +- 1.3 %; 25.6 % when measured), and the loss falls."""
    run_finetune('--model', 'hivit_tiny_patch8_64', '--input_size', 32, '--data_path', 'demo', '--batch_size', 32,
                 '--epochs', 1, '--max_steps', 60, '--warmup_epochs', 0, '--blr', 8e-3, '--mixup', 0, '--cutmix', 0, '--aa', 'none',
                 '--reprob', 0, '--smoothing', 0, '--log_freq', 5, *CPU, '--output_dir', tmp_path)
    assert 'the supervised recipe published for hivit_tiny_patch8_64' in capsys.readouterr().out
    steps = read_jsonl(tmp_path / 'log.jsonl')
    assert steps[-1]['loss'] < 0.95 * steps[0]['loss']
    assert read_jsonl(tmp_path / 'log.txt')[-1]['test_acc1'] > 20
