"""mmpretrain's checkpoints (util/mmpretrain.py) against mmpretrain itself.

test/golden/mmpretrain_golden.json was written by mmpretrain 1.2.0 (mmengine 0.10.7, mmcv-lite 2.2.0,
torch 2.14.1, CPU), run in a scratch folder outside the project: for each model below, built by
mmpretrain's registry at this project's tiny test sizes, the keys and shapes of its state dict, and
what it computed with the weights and the input images that `formula` and `image` give (the same
here). The models: MAE (MAEViT ViT-Ti/8 at 64 px, MAEPretrainDecoder 128 x 2, MAEPretrainHead with
norm_pix), MaskFeat (MaskFeatViT, LinearNeck 192 -> 108), MAE-HiViT (MAEHiViT 192 wide, depths 1-1-10,
the same decoder), and three ImageClassifiers: the ViT as MAE and MaskFeat fine-tune it (avg_featmap,
no final norm, LinearClsHead), the ViT as MAE probes it (cls_token, final norm, ClsBatchNormNeck), and
HiViT (ape, rpe, GlobalAveragePooling). mmpretrain is not needed to run these tests.
"""
import json
import math
import os

import pytest
import torch

from helpers import read_jsonl, run_finetune, run_main
from util import checkpoint

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), 'golden', 'mmpretrain_golden.json')))
CPU = ['--num_workers', 0, '--device', 'cpu']


def formula(shape, index):
    n = math.prod(shape)
    wave = 0.02 * torch.sin(0.37 * (torch.arange(n, dtype=torch.float64) + 1) * (index % 7 + 1) + index)
    return wave.float().reshape(shape)


def image(n=2, size=64):
    return torch.sin(torch.arange(n * 3 * size * size, dtype=torch.float64) * 0.013).float().reshape(n, 3, size, size)


def mmpretrain_state(name):
    """The state dict mmpretrain's model `name` had when it computed the golden values: its keys
    and shapes, the i-th float tensor formula(shape, i) (running variances made positive), the HOG
    generator's buffers (which the conversion drops) zero, and the integer buffers as mmpretrain
    computes them (HiViT's relative position index, the official formula)."""
    from models_hivit import relative_position_index
    state = {}
    for i, (key, shape) in enumerate(GOLDEN[name]['keys']):
        shape = tuple(shape)
        if key.endswith('relative_position_index'):
            state[key] = relative_position_index(int(shape[0] ** .5))
        elif key.endswith('num_batches_tracked'):
            state[key] = torch.tensor(0)
        elif key.startswith('target_generator.'):
            state[key] = torch.zeros(shape)
        elif key.endswith('running_var'):
            state[key] = formula(shape, i).abs() + 0.5
        else:
            state[key] = formula(shape, i)
    return state


def release(name, epochs=1600):
    """What mmpretrain's checkpoints hold once published: meta (the configuration as text) and the
    state dict."""
    return {'meta': {'epoch': epochs, 'cfg': f"train_cfg = dict(type='EpochBasedTrainLoop', max_epochs={epochs})\n"},
            'state_dict': mmpretrain_state(name)}


def loaded(model, name):
    """`model` with the weights of mmpretrain's `name`, as the entry points load them."""
    state = checkpoint.in_model_layout(model, checkpoint.model_state_of(release(name), name), name)
    checkpoint.load_weights(model, state, name)
    return model.eval()


@torch.no_grad()
def test_mae_computes_what_mmpretrain_computed():
    """The same noise decides the same mask; loss and reconstruction are mmpretrain's."""
    import models_mae
    model = loaded(models_mae.mae_vit_tiny_patch8(norm_pix_loss=True), 'mae')  # mmpretrain's norm_pix head
    noise = torch.sin(torch.arange(2 * 64, dtype=torch.float64) * 1.7).abs().float().reshape(2, 64)
    loss, pred, mask = model(image(), mask_ratio=0.75, noise=noise)
    golden = GOLDEN['mae']
    assert torch.equal(mask, torch.tensor(golden['mask']))
    assert loss.item() == pytest.approx(golden['loss'], rel=1e-5)
    torch.testing.assert_close(pred[:, :3, :5], torch.tensor(golden['pred']), rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_maskfeat_predicts_what_mmpretrain_predicted():
    import models_maskfeat
    model = loaded(models_maskfeat.maskfeat_vit_tiny_patch8(), 'maskfeat')
    golden = GOLDEN['maskfeat']
    mask = torch.tensor(golden['mask']).reshape(2, 8, 8)
    _, pred, _ = model(image(), mask=mask)
    torch.testing.assert_close(pred[:, :4, :6], torch.tensor(golden['pred']), rtol=1e-4, atol=1e-6)
    assert pred.sum().item() == pytest.approx(golden['pred_sum'], rel=1e-4)


@torch.no_grad()
def test_mae_hivit_encodes_what_mmpretrain_encoded():
    """mmpretrain's MAE-HiViT has no hifeat and no norm on the encoder's output: the main stage's
    tokens are mmpretrain's."""
    import models_hivit
    model = loaded(models_hivit.mae_hivit_tiny_patch8_64_mmpretrain(), 'mae_hivit')
    features = model.forward_features(image())
    golden = GOLDEN['mae_hivit']
    torch.testing.assert_close(features[:, :3, :5], torch.tensor(golden['features']), rtol=1e-4, atol=1e-6)
    assert features.sum().item() == pytest.approx(golden['features_sum'], rel=1e-4)
    # mmpretrain's decoder puts patch i at row i + 1 of its position table (row 0 is a cls slot)
    assert torch.equal(model.decoder_pos_embed, mmpretrain_state('mae_hivit')['neck.decoder_pos_embed'][:, 1:])


@torch.no_grad()
@pytest.mark.parametrize('name, build', [
    ('vit_classifier', lambda timm: timm.create_model('vit_tiny_patch8', num_classes=10, global_pool='avg')),
    ('hivit_classifier', lambda timm: timm.create_model('hivit_tiny_patch8_64_mmpretrain', num_classes=10)),
    ('vit_linear_probe', lambda timm: probe(timm.create_model('vit_tiny_patch8', num_classes=10,
                                                              global_pool='token'))),
])
def test_classifiers_give_mmpretrains_logits(name, build):
    import timm
    model = loaded(build(timm), name)  # as --eval loads a release: every key, nothing else
    torch.testing.assert_close(model(image()), torch.tensor(GOLDEN[name]['logits']), rtol=1e-4, atol=1e-6)


def probe(model):
    import main_finetune
    main_finetune.add_probe_head(model)
    return model


def test_pretraining_checkpoints_are_recognised_with_their_recipe():
    from util.registry import finetune_recipe_of, pretraining_of
    assert pretraining_of(release('mae', 800)) == ('mae_vit_tiny_patch8', 800)
    assert pretraining_of(release('maskfeat', 300)) == ('maskfeat_vit_tiny_patch8', 300)
    assert pretraining_of(release('mae_hivit')) == ('mae_hivit_tiny_patch8_64_mmpretrain', 1600)
    assert pretraining_of(release('vit_classifier')) == (None, None)
    assert finetune_recipe_of(release('mae_hivit'))[1]['model'] == 'hivit_tiny_patch8_64_mmpretrain'


def test_mmpretrain_checkpoints_fine_tune_evaluate_and_serve_the_tools(small_folder, tmp_path, capsys):
    """As a user runs them: a pre-training checkpoint fine-tunes (with the recipe that goes with it,
    the classifier included, and an evaluation at the end of the epoch), the fine-tuned one evaluates
    with --eval, a classifier of mmpretrain's evaluates as it is, and the pre-training checkpoints
    serve --knn, visualize.py and export.py."""
    for name in ('mae', 'maskfeat', 'mae_hivit', 'hivit_classifier'):
        torch.save(release(name), tmp_path / f'{name}.pth')
    common = ['--data_path', small_folder, '--batch_size', 16, '--epochs', 1, '--max_steps', 2, *CPU]
    # MAE's and MaskFeat's recognition and conversion are the tests above; one run shows the wiring
    run_finetune('--finetune', tmp_path / 'mae_hivit.pth', *common, '--output_dir', tmp_path / 'ft_mae_hivit')
    assert read_jsonl(tmp_path / 'ft_mae_hivit' / 'log.jsonl')[-1]['step'] == 2
    with open(tmp_path / 'ft_mae_hivit' / 'log.txt') as f:
        assert 'test_acc1' in f.read()
    run_finetune('--eval', '--resume', tmp_path / 'ft_mae_hivit' / 'checkpoint-last.pth', '--data_path', small_folder, *CPU,
                 '--output_dir', tmp_path / 'eval_ft')
    run_finetune('--eval', '--resume', tmp_path / 'hivit_classifier.pth', '--model', 'hivit_tiny_patch8_64_mmpretrain',
                 '--nb_classes', 10, '--data_path', small_folder, *CPU, '--output_dir', tmp_path / 'eval_mm')
    run_finetune('--knn', '--finetune', tmp_path / 'mae_hivit.pth', '--data_path', small_folder, *CPU,
                 '--output_dir', tmp_path / 'knn')
    # the tools in this process: a new interpreter costs seconds of imports
    run_main('visualize', '--checkpoint', tmp_path / 'mae.pth', '--data_path', 'demo', '--output', tmp_path / 'mae.png')
    assert os.path.getsize(tmp_path / 'mae.png') > 0
    capsys.readouterr()
    run_main('export', '--checkpoint', tmp_path / 'maskfeat.pth', '--output', tmp_path / 'enc.safetensors')
    assert 'vit_tiny_patch8' in capsys.readouterr().out


def test_an_mmengine_training_checkpoint_evaluates_and_its_logger_state_runs_no_code(tmp_path, monkeypatch, capsys):
    """mmengine's epoch_N.pth also holds the message hub: HistoryBuffer objects of numpy arrays. Its
    weights evaluate (the logger's objects are stood in for); a file that names any other class is
    still refused as a Python object."""
    import sys
    import types

    import numpy as np
    module = types.ModuleType('mmengine.logging.history_buffer')

    class HistoryBuffer:  # what mmengine pickles: an object whose state holds numpy arrays
        def __init__(self):
            self._log_history, self._count_history, self.max_length = np.array([2.3, 2.1]), np.array([1, 1]), 1000000
    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, 'HistoryBuffer'
    module.HistoryBuffer = HistoryBuffer
    for name in ('mmengine', 'mmengine.logging', 'mmengine.logging.history_buffer'):
        monkeypatch.setitem(sys.modules, name, module)
    model = torch.nn.Linear(2, 2)
    training_state = {**release('vit_classifier'), 'message_hub': {'log_scalars': {'train/loss': HistoryBuffer()},
                                                                   'runtime_info': {'epoch': 3}},
                      'optimizer': torch.optim.AdamW(model.parameters()).state_dict()}
    torch.save(training_state, tmp_path / 'epoch_3.pth')
    torch.save({**training_state, 'other': types.SimpleNamespace()}, tmp_path / 'other.pth')
    for name in ('mmengine', 'mmengine.logging', 'mmengine.logging.history_buffer'):
        monkeypatch.delitem(sys.modules, name)

    stats = run_finetune('--eval', '--resume', tmp_path / 'epoch_3.pth', '--model', 'vit_tiny_patch8', '--nb_classes', 10,
                         '--data_path', 'demo', *CPU, '--output_dir', '')
    assert 'acc1' in stats
    with pytest.raises(Exception, match=r'holds a Python object \(types.SimpleNamespace\)'):
        checkpoint.load(str(tmp_path / 'other.pth'))
