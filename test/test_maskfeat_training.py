"""MaskFeat as a user runs it: a demo pre-training whose loss falls, fine-tuning its checkpoint with
the published recipe, and bad input."""
import pytest
import torch

from helpers import assert_loss_fell, finetune_demo_checkpoint, run_demo_pretraining, run_pretrain
from util.errors import UsageError

CPU = ['--num_workers', 0, '--device', 'cpu']


@pytest.fixture(scope='module')
def maskfeat_pretraining(demo_root, tmp_path_factory):
    """12 steps of 32 demo images with the tiny MaskFeat ViT, a log line every 2 (the loss falls to 0.45 of its first
    value)."""
    return run_demo_pretraining('maskfeat_vit_tiny', tmp_path_factory.mktemp('maskfeat_vit_tiny'), max_steps=12,
                                log_freq=2)


def test_demo_pretraining_loss_falls(maskfeat_pretraining):
    assert_loss_fell(maskfeat_pretraining)


def test_a_maskfeat_checkpoint_fine_tunes_with_its_recipe(small_folder, maskfeat_pretraining, tmp_path, capsys):
    finetune_demo_checkpoint(maskfeat_pretraining, tmp_path, small_folder)
    out = capsys.readouterr().out
    assert 'fine-tuning recipe published for maskfeat_vit_tiny checkpoints' in out
    assert 'model vit_tiny_patch8' in out  # the recipe's classifier, at its own 64 px


@pytest.mark.parametrize('flags, message', [
    (['--mask_count', 100], 'cannot mask 100 of 64 patches'),
    (['--mask_count', 0], 'cannot mask 0 of 64 patches'),  # was read as unset: the default count trained
    (['--mask_count', 10, '--mask_ratio', 0.3], '--mask_count 10 and --mask_ratio 0.3 both say how many patches'),
    (['--input_size', 60], 'must be a multiple of the patch size 8'),
])
def test_bad_input_is_one_line(flags, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        run_pretrain('--model', 'maskfeat_vit_tiny', '--data_path', 'demo', *flags, '--epochs', 1, '--max_steps', 1, *CPU,
                     '--output_dir', tmp_path)


def test_modelzoo_full_cases_reach_maskfeats_effective_batch(tmp_path):
    import modelzoo
    case = modelzoo.Case('pretrain', 'full', 8, ['--data_path=demo', '--model=maskfeat_vit_base'])
    args = case.entry_point_args()
    # mmpretrain's 8xb256: 256 images x 8 devices, no accumulation = 2048
    assert args[args.index('--batch_size') + 1] == '256' and args[args.index('--accum_iter') + 1] == '1'
    assert case.name == 'maskfeat_vit_base_pretrain_bs256_8p_acc'
    # fine-tuning a MaskFeat checkpoint: its recipe's ViT-B and batch (8 x 256 = 2048), not MAE's (1024);
    # on 4 devices the batch is reached with 2 micro-batches
    torch.save({'model': {}, 'args': {'model': 'maskfeat_vit_base', 'epochs': 300}}, tmp_path / 'maskfeat.pth')
    case = modelzoo.Case('finetune', 'full', 8, ['--data_path=demo', f'--finetune_pth={tmp_path / "maskfeat.pth"}',
                                                 '--nproc=4'])
    args = case.entry_point_args()
    assert case.name == 'vit_base_patch16_finetune_bs256_4p_acc'
    assert args[args.index('--batch_size') + 1] == '256' and args[args.index('--accum_iter') + 1] == '2'
