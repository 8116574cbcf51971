"""Training FLOPs, MFU in the logs, benchmark.py and --data_path synthetic, on the CPU with tiny
models. Speeds are printed, never asserted: what is checked is that the figures are there and
agree with each other and with a count by hand."""
import argparse
import re
from functools import partial

import pytest
import torch
from timm.loss import SoftTargetCrossEntropy

import main_finetune
from benchmark import build_step
from util.registry import create_classifier
from helpers import read_jsonl, run_finetune, run_pretrain


def mae_training_flops_by_hand(img=224, p=16, dim=768, depth=12, dec_dim=512, dec_depth=8, mlp_ratio=4,
                               mask_ratio=0.75):
    """FLOPs of one MAE training image, from the matrix products alone: the patch embedding of
    every patch, the encoder on the kept patches + cls, the decoder on all patches + cls, the
    prediction head; forward x 3 for forward and backward (the backward computes two products
    for each of the forward's: the gradients of the input and of the weights)."""
    patches = (img // p) ** 2
    encoded = int(patches * (1 - mask_ratio)) + 1  # 49 + 1
    decoded = patches + 1  # 196 + 1

    def block(n, d):  # multiply-adds of one transformer block on n tokens of width d
        qkv, scores, values, proj = n * d * 3 * d, n * n * d, n * n * d, n * d * d
        return qkv + scores + values + proj + 2 * n * d * mlp_ratio * d

    macs = (patches * 3 * p * p * dim + depth * block(encoded, dim) + encoded * dim * dec_dim
            + dec_depth * block(decoded, dec_dim) + decoded * dec_dim * p * p * 3)
    return 3 * 2 * macs


def mae_vit_tiny_gflops_by_hand():
    """GFLOPs of one mae_vit_tiny training image at 64 px (ViT-Ti, 192 x 12 on 8x8 patches, decoder
    128 x 2) as the counter sees them: without the gradient of the images, which nothing asks for
    (one product of the patch embedding: 64 patches of 3 x 8 x 8 values to 192)."""
    image_grad = 2 * 64 * (3 * 8 * 8) * 192
    return (mae_training_flops_by_hand(img=64, p=8, dim=192, dec_dim=128, dec_depth=2) - image_grad) / 1e9


def mae_step(name):
    """The model, loss function and a 2-image batch of the training step, as benchmark.py builds them."""
    return build_step(name, 2, None)[:3]


def test_mae_vit_base_training_flops_agree_with_a_count_by_hand():
    from util.flops import training_flops_per_image
    counted = training_flops_per_image(*mae_step('mae_vit_base'))
    by_hand = mae_training_flops_by_hand()
    assert by_hand == pytest.approx(58.7e9, rel=0.005)  # the figure
    assert counted == pytest.approx(by_hand, rel=0.05)
    # what is left: the images need no gradient, so the patch embedding's backward is half
    assert by_hand - counted == pytest.approx(2 * 196 * 768 * 768, rel=0.01)


def test_counting_changes_neither_the_weights_nor_any_random_state():
    from util.flops import training_flops_per_image
    torch.manual_seed(0)
    model, loss_fn, batch = mae_step('mae_vit_tiny')
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    assert training_flops_per_image(model, loss_fn, batch) > 0
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_meta_tensors_count_what_fake_tensors_count_and_maskfeat_falls_back_to_them():
    """The count runs on meta tensors (the fast way) and, where an op refuses them, on fake CPU
    tensors: both give the same FLOPs (masked windowed attention, fine-tuning on mixup's soft
    targets)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from util.flops import _count_flops, example_batch, training_flops
    classifier = create_classifier('vit_tiny_patch8', img_size=32, num_classes=10)
    steps = {'simmim_swin_tiny': build_step('simmim_swin_tiny', 2, None)[:3]}
    steps['vit_tiny_patch8 with mixup'] = (classifier, partial(main_finetune.classification_loss,
                                                               criterion=SoftTargetCrossEntropy()),
                                           example_batch(2, 32, num_classes=10, soft_targets=True))
    for name, (model, loss_fn, batch) in steps.items():
        with FakeTensorMode():
            on_fake = _count_flops(model, loss_fn, batch, device='cpu')
        assert _count_flops(model, loss_fn, batch, device='meta') == on_fake > 0, name
        assert training_flops(model, loss_fn, batch) == on_fake, name
    # MaskFeat's autocast around its HOG target refuses the meta device: counted on fake tensors
    model, loss_fn, batch = build_step('maskfeat_vit_tiny', 2, None)[:3]
    with pytest.raises(RuntimeError):
        _count_flops(model, loss_fn, batch, device='meta')
    assert training_flops(model, loss_fn, batch) > 0


def test_peak_table_matches_device_names():
    from util.flops import FlopRate, peak_tflops
    assert peak_tflops('NVIDIA H100 80GB HBM3', 'bf16') == 989.4
    assert peak_tflops('NVIDIA H100 PCIe', 'bf16') == 756.0
    assert peak_tflops('NVIDIA H200', 'tf32') == 494.7
    assert peak_tflops('NVIDIA A100-SXM4-80GB', 'fp16') == 312.0
    assert peak_tflops('Ascend910B2', 'bf16') == 320.0
    assert peak_tflops('2 CPU cores', 'fp32') is None
    assert FlopRate(1e12, 100.0, world_size=2).fields(50.0) == {'tflops': 25.0, 'mfu': 0.25}  # per device
    assert FlopRate(1e12, None).fields(1.0, prefix='train_') == {'train_tflops': 1.0}


def figures_table(out):
    """The rows of benchmark.py's closing table: {model: [column values]}"""
    rows = [line.strip('|').split(' | ') for line in out.splitlines() if line.startswith('| ') and '---' not in line]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in rows[1:]}


def test_benchmark_runs_one_model_of_each_family_on_the_cpu(capsys):
    import benchmark
    results = benchmark.main(benchmark.get_args_parser().parse_args(
        ['--all', '--device', 'cpu', '--steps', '1', '--warmup', '0', '--batch_size', '2', '--peak_tflops', '1']))
    out = capsys.readouterr().out
    table = figures_table(out)
    assert list(table) == ['mae_vit_tiny', 'simmim_vit_tiny', 'simmim_swin_tiny', 'maskfeat_vit_tiny',
                           'mae_hivit_tiny', 'vit_tiny_patch8', 'hivit_tiny_patch8_64']
    assert float(table['mae_vit_tiny'][6]) == pytest.approx(mae_vit_tiny_gflops_by_hand(), abs=5e-4)
    for r in results:
        size, batch, precision, device, ips, ms, gflops, tflops, mfu, memory = table[r['model']]
        assert (size, batch, precision, memory) == ('64', '2', 'fp32', 'n/a')
        assert device.endswith(('CPU core', 'CPU cores'))
        assert r['ips'] == pytest.approx(2 * 1000 / r['ms'], rel=1e-9)
        assert r['tflops'] == pytest.approx(r['gflops'] * r['ips'] / 1000, rel=1e-6)
        assert mfu == f"{100 * r['tflops']:.1f} %"  # against the peak of 1 TFLOP/s given
        assert f"{r['model']}: 64 px, batch 2, fp32 on" in out


def test_benchmark_without_a_known_peak_says_n_a(capsys):
    import benchmark
    benchmark.main(benchmark.get_args_parser().parse_args(
        ['--model', 'mae_vit_tiny', '--device', 'cpu', '--steps', '1', '--warmup', '0', '--batch_size', '2']))
    out = capsys.readouterr().out
    assert 'MFU n/a' in out and 'peak memory n/a' in out
    assert figures_table(out)['mae_vit_tiny'][8] == 'n/a'


def test_benchmark_loader_mode_times_the_entry_points_pipelines(demo_root, capsys):
    import benchmark
    figures = benchmark.main(benchmark.get_args_parser().parse_args(
        ['--data_path', 'demo', '--model', 'mae_vit_tiny', '--num_workers', '1', '--images', '32', '--batch_size', '8',
         '--compare_official']))
    out = capsys.readouterr().out
    assert 'input pipeline of main_pretrain (mae_vit_tiny, 64 px, tensor pipeline)' in out
    assert figures['per_core'] > 0 and figures['total'] > 0 and figures['official'] > 0
    ratio = float(re.search(r'this pipeline / official: (\S+)x per core', out).group(1))
    assert ratio == pytest.approx(figures['per_core'] / figures['official'], abs=0.01)

    benchmark.main(benchmark.get_args_parser().parse_args(
        ['--data_path', 'synthetic:64', '--finetune_pipeline', '--model', 'vit_tiny_patch8', '--num_workers', '0',
         '--images', '16', '--batch_size', '8']))
    out = capsys.readouterr().out
    assert 'main_finetune (vit_tiny_patch8, 64 px, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25)' in out
    assert '64 images in synthetic:64' in out
    assert re.search(r'DataLoader, 0 workers, batch 8: [0-9.]+ images/s in total, in the main process', out)
    # too few batches to time: the benchmark's own advice, not training's (--accum_iter is no flag of it)
    from util.errors import UsageError
    with pytest.raises(UsageError, match=r'^the data set makes 2 batches of 32, too few to time after the 3 the '
                                         r'workers have ready at the start: lower --batch_size or --num_workers$'):
        benchmark.main(benchmark.get_args_parser().parse_args(
            ['--data_path', 'synthetic:64', '--model', 'mae_vit_tiny', '--num_workers', '1', '--images', '4',
             '--batch_size', '32']))
    # without workers: nothing is ready early but the first batch, and there are no workers to have fewer of
    with pytest.raises(UsageError, match=r'^the data set makes 2 batches of 32, too few to time after the first: '
                                         r'lower --batch_size$'):
        benchmark.main(benchmark.get_args_parser().parse_args(
            ['--data_path', 'synthetic:64', '--model', 'mae_vit_tiny', '--num_workers', '0', '--images', '4',
             '--batch_size', '32']))
    with pytest.raises(UsageError, match=r"^--model vit_tiny_patch8 is a classifier: time main_finetune's pipeline "
                                         r"with --finetune_pipeline$"):
        benchmark.main(benchmark.get_args_parser().parse_args(['--data_path', 'synthetic:64', '--model', 'vit_tiny_patch8']))


def test_synthetic_images_are_made_from_the_index():
    from util.datasets import SyntheticImages, build_image_folder, synthetic_size
    from util.errors import UsageError
    assert (synthetic_size('synthetic', 'train'), synthetic_size('synthetic', 'val')) == (1281167, 50000)
    assert (synthetic_size('synthetic:1000', 'train'), synthetic_size('synthetic:1000', 'val')) == (1000, 39)
    for count in ('ten', ''):  # '': synthetic:$N with N unset is no shorthand for ImageNet's 1.28 M
        with pytest.raises(UsageError, match=f"synthetic:N needs a whole number of training images N above 0, got "
                                             f"'{count}'"):
            synthetic_size(f'synthetic:{count}', 'train')
    folder = build_image_folder('synthetic', 'train', None)
    assert len(folder) == 1281167 and len(folder.classes) == 1000
    image, target = folder[1001]
    assert image.size == (256, 256) and target == 1
    assert (torch.from_numpy(SyntheticImages('train', 2000).image(1001)) == torch.from_numpy(folder.image(1001))).all()
    assert not (folder.image(1001) == folder.image(1002)).all()


def test_synthetic_data_trains_and_fine_tunes_with_tflops_and_mfu_logged(tmp_path):
    common = ['--epochs', 1, '--max_steps', 2, '--log_freq', 1, '--num_workers', 0, '--device', 'cpu', '--batch_size', 8,
              '--peak_tflops', 0.5]
    run_pretrain('--model', 'mae_vit_tiny', '--data_path', 'synthetic:64', '--output_dir', tmp_path / 'pre', *common)
    steps = read_jsonl(tmp_path / 'pre' / 'log.jsonl')
    epochs = read_jsonl(tmp_path / 'pre' / 'log.txt')
    flops = mae_vit_tiny_gflops_by_hand() * 1e9
    assert [s['step'] for s in steps] == [1, 2]
    for s in steps:
        assert s['tflops'] == pytest.approx(flops * s['ips'] / 1e12, rel=1e-6)
        assert s['mfu'] == pytest.approx(s['tflops'] / 0.5, rel=1e-9)
    assert epochs[-1]['train_tflops'] == pytest.approx(flops * epochs[-1]['train_ips'] / 1e12, rel=1e-6)
    assert epochs[-1]['train_mfu'] == pytest.approx(epochs[-1]['train_tflops'] / 0.5, rel=1e-9)

    run_finetune('--model', 'vit_tiny_patch8', '--data_path', 'synthetic:64', '--output_dir', tmp_path / 'ft', *common)
    steps = read_jsonl(tmp_path / 'ft' / 'log.jsonl')
    epochs = read_jsonl(tmp_path / 'ft' / 'log.txt')
    assert len(steps) == 2 and all('tflops' in s and 'mfu' in s for s in steps)
    assert 'test_acc1' in epochs[-1] and 'train_mfu' in epochs[-1]


@pytest.mark.parametrize('flags, message', [
    (['--checkpoint_stall', '--saves', '0'], '--saves must be at least 1, got 0'),  # was a FileNotFoundError
    (['--steps', '1', '--warmup', '-1'], '--warmup must be 0 or more, got -1'),
    (['--steps', '1', '--peak_tflops', '-1'], "--peak_tflops (the device's peak TFLOP/s, the denominator of MFU) "
                                              "must lie in (0, inf), got -1.0"),  # was an MFU of -2.5 %
])
def test_impossible_counts_and_peaks_are_one_line(flags, message):
    import benchmark
    from util.errors import UsageError
    with pytest.raises(UsageError) as error:
        benchmark.main(benchmark.get_args_parser().parse_args(
            ['--model', 'mae_vit_tiny', '--device', 'cpu', '--batch_size', '2', *flags]))
    assert str(error.value) == message


@pytest.mark.parametrize('flags, message', [  # each was ignored without a word
    (['--all', '--model', 'mae_vit_tiny'], '--all times one model of each family: leave out --model (or --all)'),
    (['--sizes', 'small'], '--sizes chooses the models of --all: add --all'),
    (['--compare_official'], '--compare_official is for timing the input pipeline: give --data_path'),
    (['--data_path', 'demo', '--official', 'official/mae'], '--official is for timing the training step: leave out '
                                                             '--data_path'),
    (['--checkpoint_stall', '--data_path', 'demo'], "--checkpoint_stall times saves of --model's weights and AdamW "
                                                    "state: leave out --data_path"),
    (['--data_path', 'demo', '--steps', '5'], '--steps is for timing the training step: leave out --data_path'),
    (['--model', 'mae_vit_tiny', '--images', '10'], '--images is for timing the input pipeline: give --data_path'),
    (['--model', 'mae_vit_tiny', '--saves', '2'], '--saves is for timing checkpoint saves: add --checkpoint_stall'),
    (['--data_path', 'demo', '--finetune_pipeline', '--input_pipeline', 'nvjpeg'],
     "--input_pipeline nvjpeg chooses main_pretrain's pipeline: leave it out with --finetune_pipeline"),
])
def test_a_flag_of_another_mode_is_refused(flags, message):
    import benchmark
    from util.errors import UsageError
    with pytest.raises(UsageError) as error:
        benchmark.main(benchmark.get_args_parser().parse_args(flags))
    assert str(error.value) == message


@pytest.mark.parametrize('flags, wrong', [
    (['--model', 'maskfeat_vit_tiny', '--input_size', '16', '--steps', '1'], 'cannot mask 2 of 4 patches with blocks'),
    (['--model', 'simmim_vit_tiny', '--input_size', '40', '--data_path', 'demo'],
     'a mask of 16-pixel units does not fit a 40-pixel image'),
    (['--model', 'mae_vit_tiny', '--input_size', '8', '--steps', '1'],
     'a mask ratio of 0.75 leaves none of the 1 patches visible'),
])
def test_a_size_the_recipes_masking_refuses_asks_for_another_size(flags, wrong):
    """benchmark.py has no masking flags: the error of a size the recipe cannot mask says what is
    wrong and names only flags benchmark.py takes (it advised main_pretrain's --mask_count)."""
    import benchmark
    from util.errors import UsageError
    parser = benchmark.get_args_parser()
    with pytest.raises(UsageError) as error:
        benchmark.main(parser.parse_args(['--device', 'cpu', '--batch_size', '2', *flags]))
    message = str(error.value)
    assert wrong in message and message.endswith("give another --input_size (the recipe's is 64)")
    assert set(re.findall(r'--\w+', message)) <= set(parser._option_string_actions), message


def test_an_unknown_model_names_the_closest_of_both_kinds():
    """A typo of a pre-training model was matched against timm's names alone (davit_tiny, ...)."""
    import benchmark
    from util.errors import UsageError
    with pytest.raises(UsageError, match=r"unknown model 'mae_vit_tinyy' \(closest: mae_vit_tiny"):
        benchmark.main(benchmark.get_args_parser().parse_args(['--model', 'mae_vit_tinyy', '--device', 'cpu']))


def test_checkpoint_mode_times_both_writers(capsys):
    import benchmark
    benchmark.main(benchmark.get_args_parser().parse_args(
        ['--checkpoint_stall', '--model', 'mae_vit_tiny', '--device', 'cpu', '--saves', '2']))
    out = capsys.readouterr().out
    sync = re.search(r'synchronous: training held up ([0-9.]+), ([0-9.]+) s per save; writes ([0-9.]+), ([0-9.]+) s', out)
    background = re.search(r'background: training held up ([0-9.]+), ([0-9.]+) s per save; writes', out)
    assert sync and background, out
    # synchronous: the training thread waits for the whole write (the stall also holds the wait's own
    # bookkeeping, so the two printed values may round apart by one unit of 0.01 s)
    assert [float(s) for s in sync.groups()[:2]] == pytest.approx([float(w) for w in sync.groups()[2:]], abs=0.011)


def test_grad_ckpt_counts_the_models_flops_not_the_recomputation(capsys):
    import benchmark
    flags = ['--model', 'mae_vit_tiny', '--device', 'cpu', '--steps', '1', '--warmup', '0', '--batch_size', '2']
    [plain] = benchmark.main(benchmark.get_args_parser().parse_args(flags))
    [checkpointed] = benchmark.main(benchmark.get_args_parser().parse_args([*flags, '--grad_ckpt']))
    by_hand = mae_vit_tiny_gflops_by_hand()
    assert [plain['gflops'], checkpointed['gflops']] == pytest.approx([by_hand, by_hand], rel=1e-6)


# A stand-in for a clone of facebookresearch/mae, in the idioms of 2021 that the real one uses:
# names that shadow this project's (models_mae.py, a util/ folder without __init__.py), np.float,
# and timm's ViT block given qk_scale. Its model is this project's class (put in sys.modules by the
# test as `project_models_mae`), so that this project's weights load into it strictly.
STAND_IN_MODELS_MAE = '''
import sys
import numpy as np
from timm.models.vision_transformer import Block
from util.pos_embed import width_of_float

Block(8, 2, 4., qkv_bias=True, qk_scale=None)  # what the official constructor does per block
IMPORTED_WITH = {'float width': width_of_float(), 'project util': 'util' in sys.modules
                 and hasattr(sys.modules['util'], 'device')}


class MaskedAutoencoderViT(sys.modules['project_models_mae'].MaskedAutoencoderViT):
    def forward(self, imgs, mask_ratio=0.75):
        return super().forward(imgs, mask_ratio)
'''
STAND_IN_POS_EMBED = '''
import numpy as np


def width_of_float():
    return np.arange(2, dtype=np.float).itemsize
'''


def test_benchmark_times_the_official_code_beside_this_project(tmp_path, monkeypatch, capsys):
    """--official: the clone's model is built with the keywords this project's factory used and
    loads its weights; its files shadow this project's only while it is imported (ours are the
    modules afterwards, np.float and timm's block as they were); the table gives both steps; a
    model without official code says why; a folder that is not a clone is one line."""
    import sys

    import numpy as np
    import timm.models.vision_transformer as timm_vit

    import benchmark
    import models_mae
    import util.pos_embed
    from util.errors import UsageError
    clone = tmp_path / 'mae'
    (clone / 'util').mkdir(parents=True)
    (clone / 'models_mae.py').write_text(STAND_IN_MODELS_MAE)
    (clone / 'engine_pretrain.py').write_text('')  # what tells a clone of facebookresearch/mae
    (clone / 'util' / 'pos_embed.py').write_text(STAND_IN_POS_EMBED)
    monkeypatch.setitem(sys.modules, 'project_models_mae', models_mae)
    block = timm_vit.Block

    results = benchmark.main(benchmark.get_args_parser().parse_args(
        ['--model', 'mae_vit_tiny', '--device', 'cpu', '--steps', '1', '--warmup', '0', '--batch_size', '2',
         '--rounds', '2', '--official', str(clone)]))
    out = capsys.readouterr().out
    assert sys.modules['models_mae'] is models_mae and sys.modules['util.pos_embed'] is util.pos_embed
    assert not hasattr(np, 'float') and timm_vit.Block is block
    [result] = results
    assert set(result['official']) == {'official', 'official model, this step', 'this project'}
    official_ips = result['official']['official'][0]
    assert f"| mae_vit_tiny | same weights | {official_ips:.1f} (n/a) |" in out
    assert f"{result['ips'] / official_ips:.2f}x |" in out

    from util import official
    with official.recording_constructors() as constructed:
        ours = models_mae.mae_vit_tiny_patch8()
    recipe = argparse.Namespace(mask_ratio=0.75)
    theirs, loss_fn, weights = official.official_counterpart(ours, constructed, {'MAE': str(clone)}, recipe)
    assert type(theirs).forward.__globals__['IMPORTED_WITH'] == {'float width': 8, 'project util': False}
    assert weights == 'same weights'
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()))
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    expected = ours(images, mask_ratio=0.75)[0]
    torch.manual_seed(1)
    assert loss_fn(theirs, (images, {})) == expected

    benchmark.main(benchmark.get_args_parser().parse_args(
        ['--model', 'maskfeat_vit_tiny', '--device', 'cpu', '--steps', '1', '--warmup', '0', '--batch_size', '2',
         '--official', str(clone)]))
    assert "official: none for MaskFeat: the official code compared is MAE's, SimMIM's and HiViT's pre-training" \
        in capsys.readouterr().out
    with pytest.raises(UsageError, match=f'--official {tmp_path}: not a clone of one of https://github.com/'):
        benchmark.main(benchmark.get_args_parser().parse_args(['--device', 'cpu', '--official', str(tmp_path)]))
    with pytest.raises(UsageError, match=f'--official {tmp_path / "none"} does not exist'):  # was 'not a clone'
        benchmark.main(benchmark.get_args_parser().parse_args(['--device', 'cpu', '--official', str(tmp_path / 'none')]))
