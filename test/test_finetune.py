"""main_finetune.py as a user runs it: the published recipes as defaults, fine-tuning from a demo
pre-training, linear probing, evaluation of saved checkpoints, exact resumption with RandAugment
and mixup, the EMA of the weights, other timm models, and bad input."""
import contextlib
import io
import math
import os
import shutil
import sys

import pytest
import torch

from helpers import read_jsonl, run_finetune, run_script
from util import checkpoint
from util.errors import UsageError
from util.registry import create_classifier

TINY = ['--model', 'vit_tiny_patch8', '--input_size', 64, '--num_workers', 0, '--device', 'cpu']
# the README's demo fine-tuning: a short schedule wants a higher lr and no heavy regularisation
DEMO_FINETUNE = ['--batch_size', 64, '--blr', 2e-3, '--layer_decay', 0.75, '--aa', 'none', '--reprob', 0,
                 '--mixup', 0, '--cutmix', 0, '--crop_min', 0.4]


def parse(*argv):
    import main_finetune
    args = main_finetune.get_args_parser().parse_args(['--data_path', 'demo', *map(str, argv)])
    return main_finetune.fill_recipe(args), args


def test_defaults_are_the_published_recipes():
    # MAE fine-tuning of ViT-B (He et al. 2022, Table 9): AdamW (0.9, 0.999), blr 5e-4, layer decay 0.65,
    # wd 0.05, 100 epochs, 5 warm-up, drop path 0.1, RandAug (9, 0.5), mixup 0.8, cutmix 1.0,
    # label smoothing 0.1, random erasing 0.25, global average pooling
    mode, a = parse('--finetune', 'mae_pretrain_vit_base.pth')
    assert mode == 'finetune'
    assert (a.blr, a.layer_decay, a.weight_decay, a.epochs, a.warmup_epochs, a.min_lr, a.drop_path) == \
        (5e-4, 0.65, 0.05, 100, 5, 1e-6, 0.1)
    assert (a.aa, a.mixup, a.cutmix, a.smoothing, a.reprob, a.global_pool) == \
        ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25, True)
    # MAE linear probing (Table 10): LARS, blr 0.1, wd 0, 90 epochs, 10 warm-up, no mixing or RandAug,
    # the cls token
    mode, a = parse('--linprobe', '--finetune', 'mae_pretrain_vit_base.pth')
    assert mode == 'linprobe'
    assert (a.blr, a.weight_decay, a.epochs, a.warmup_epochs, a.layer_decay, a.drop_path) == (0.1, 0, 90, 10, None, 0)
    assert (a.aa, a.mixup, a.cutmix, a.smoothing, a.reprob, a.global_pool) == (None, 0, 0, 0, 0, False)
    # DeiT-B from scratch: 300 epochs, lr 5e-4 per 512 images, min lr 1e-5, 5 warm-up, wd 0.05
    mode, a = parse()
    assert mode == 'scratch'
    assert (a.blr * 512 / 256, a.epochs, a.min_lr, a.warmup_epochs, a.weight_decay, a.layer_decay) == \
        (5e-4, 300, 1e-5, 5, 0.05, None)
    # its lr at each epoch is that of DeiT's scheduler (timm's cosine from --warmup-lr 1e-6, over the whole
    # run: no warm-up prefix); it warmed up from 0 and started its cosine after the warm-up
    from timm.scheduler import CosineLRScheduler
    from util.lr_sched import lr_at
    deit = CosineLRScheduler(torch.optim.SGD([torch.zeros(1)], lr=1e-3), t_initial=300, lr_min=1e-5, warmup_t=5,
                             warmup_lr_init=1e-6)
    ours = [lr_at(e, 1e-3, a.min_lr, a.warmup_epochs, a.epochs, a.warmup_lr, a.lr_schedule) for e in range(300)]
    assert ours == pytest.approx([deit._get_lr(e)[0] for e in range(300)], rel=1e-9, abs=1e-15)
    # any flag given wins over the recipe; "none" turns RandAugment off; decay 1 is no decay
    _, a = parse('--finetune', 'x.pth', '--blr', 1e-3, '--aa', 'none', '--layer_decay', 1, '--cls_token')
    assert (a.blr, a.aa, a.layer_decay, a.global_pool) == (1e-3, None, None, False)
    assert parse('--finetune', 'x.pth', '--layer_decay', 'none')[1].layer_decay is None  # as --help says (was refused)


def test_large_and_huge_fine_tune_with_their_own_recipe():
    # MAE's FINETUNE.md: ViT-L and ViT-H 50 epochs, blr 1e-3, layer decay 0.75, drop path 0.2 / 0.3
    for model, drop_path in (('vit_large_patch16', 0.2), ('vit_huge_patch14', 0.3)):
        _, a = parse('--model', model, '--finetune', 'x.pth')
        assert (a.epochs, a.blr, a.layer_decay, a.drop_path, a.weight_decay) == (50, 1e-3, 0.75, drop_path, 0.05)
    _, a = parse('--model', 'vit_large_patch16', '--finetune', 'x.pth', '--epochs', 30)
    assert (a.epochs, a.layer_decay) == (30, 0.75)
    # other timm models of that size (DINOv2, CLIP) are not MAE's: the base recipe
    _, a = parse('--model', 'vit_large_patch14_dinov2', '--finetune', 'x.pth')
    assert (a.epochs, a.layer_decay) == (100, 0.65)
    # probing and training from scratch keep their recipes whatever the size
    _, a = parse('--model', 'vit_large_patch16', '--linprobe', '--finetune', 'x.pth')
    assert (a.epochs, a.blr, a.layer_decay) == (90, 0.1, None)


def test_without_model_the_checkpoints_encoder_picks_the_classifier(tmp_path):
    """A pre-training checkpoint of this project fine-tunes and probes as the classifier of its
    encoder (ViT-L/16 for MAE ViT-L, with MAE's ViT-L recipe; the demo's ViT-Ti/8 at 64 px);
    probing keeps MAE's probe recipe after any pre-training."""
    for pretraining, classifier in (('mae_vit_large', 'vit_large_patch16'), ('mae_vit_tiny', 'vit_tiny_patch8'),
                                    ('simmim_swin_base', 'swin_base_patch4_window7_224')):
        path = tmp_path / f'{pretraining}.pth'
        torch.save({'model': {}, 'args': {'model': pretraining}}, path)
        _, a = parse('--finetune', path)
        assert a.model == classifier
        _, probe = parse('--finetune', path, '--linprobe')
        assert (probe.model, probe.epochs, probe.blr, probe.layer_decay) == (classifier, 90, 0.1, None)
        if pretraining.startswith('mae'):  # MAE's own recipe, as for the released checkpoints
            assert a.recipe_source is None
    assert (a.epochs, a.layer_decay) == (100, 0.9)  # SimMIM Swin-B's published fine-tuning
    _, a = parse('--finetune', tmp_path / 'mae_vit_large.pth')
    assert (a.epochs, a.blr, a.layer_decay, a.drop_path) == (50, 1e-3, 0.75, 0.2)
    assert parse('--finetune', tmp_path / 'mae_vit_tiny.pth')[1].input_size == 64
    # a fine-tuning run's checkpoint, trained on (or probed): the classifier it records, with MAE's recipe
    torch.save({'model': {}, 'args': {'model': 'swin_tiny_patch4_window7_224', 'finetune': 'x.pth'}},
               tmp_path / 'finetuned.pth')
    _, a = parse('--finetune', tmp_path / 'finetuned.pth')
    assert (a.model, a.input_size, a.recipe_source) == ('swin_tiny_patch4_window7_224', 224, None)
    assert parse('--finetune', tmp_path / 'finetuned.pth', '--model', 'vit_tiny_patch8')[1].model == 'vit_tiny_patch8'
    torch.save({'model': {}, 'args': {'model': 'another_repos_vit', 'finetune': 'x.pth'}}, tmp_path / 'foreign.pth')
    assert parse('--finetune', tmp_path / 'foreign.pth')[1].model == 'vit_base_patch16'  # a name timm does not know


def test_crop_min_bounds_the_random_crop():
    """--crop_min is the smallest crop area: 0.08 by default (Inception, as MAE and DeiT use),
    and every crop drawn covers at least that share of the image."""
    from util.datasets import finetune_transform
    assert parse('--finetune', 'x.pth')[1].crop_min == 0.08
    _, args = parse('--finetune', 'x.pth', '--aa', 'none', '--reprob', 0, '--crop_min', 0.5, '--input_size', 32)
    crop = finetune_transform(args).transforms[0]
    image = torch.zeros(3, 64, 64)
    areas = [h * w / 64 ** 2 for _, _, h, w in (crop.get_params(image, crop.scale, crop.ratio) for _ in range(200))]
    assert 0.47 <= min(areas) < 0.6 and max(areas) > 0.9  # 0.47: crop sides are rounded to pixels


def test_lars_step_matches_the_mae_formula():
    """build_lars against MAE's LARS written out: weight matrices get momentum SGD on
    g * 0.001 * |w| / |g|, 1-D parameters plain momentum SGD."""
    from util.optim import build_lars
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {n: torch.zeros_like(p) for n, p in reference.items()}
    optimizer = build_lars(model, lr=0.5, weight_decay=0.0)
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in reference.items()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        optimizer.step()
        for n, w in reference.items():
            step = grads[n]
            if w.ndim > 1:
                step = step * (0.001 * w.norm() / step.norm())
            momentum[n] = 0.9 * momentum[n] + step
            w -= 0.5 * momentum[n]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n], rtol=1e-5, atol=1e-7)


def test_mixup_targets_are_smoothed_mixtures_and_seeded_per_batch():
    import main_finetune
    from util.datasets import MixupCollate
    _, args = parse('--finetune', 'x.pth')
    collate = MixupCollate(main_finetune.build_mixup(args, num_classes=4))
    samples = [(torch.full((3, 8, 8), float(i)), i % 4, 1234) for i in range(6)]
    images, targets = collate(samples)
    assert images.shape == (6, 3, 8, 8) and targets.shape == (6, 4)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert targets.min() >= 0.1 / 4 - 1e-6  # label smoothing 0.1 spreads 0.1 over the 4 classes
    again_images, again_targets = collate(samples)
    torch.testing.assert_close(again_images, images)  # the same seed mixes the same way
    torch.testing.assert_close(again_targets, targets)
    mixes = {tuple(collate([(x, y, seed) for x, y, _ in samples])[1][0].tolist()) for seed in range(8)}
    assert len(mixes) > 1  # other seeds, other mixes


def test_finetuning_a_demo_pretraining_beats_chance(demo_finetuning):
    """The README pipeline, shortened (conftest's demo_finetuning): the 10-class validation accuracy
    must be far above chance: 10 % +- 1.3 % (one standard deviation of guessing on 500 images), so
    more than 20 % (29.2 % when measured, 40 steps at 32 px; the README's 3 epochs at 64 px with a
    warm-up epoch: 25.0 %)."""
    _, finetuning = demo_finetuning
    epochs = read_jsonl(finetuning / 'log.txt')
    assert [r['epoch'] for r in epochs] == [0]
    assert epochs[-1]['test_acc1'] > 20, epochs
    assert os.path.isfile(finetuning / checkpoint.BEST)


def test_a_resumption_without_model_builds_the_classifier_its_run_trained(demo_finetuning, tmp_path, capsys):
    """demo_finetuning trained vit_tiny_patch8 at 32 px (its published 64 by default): resumed without --model and
    --input_size, it was built at 64 px (or as the default ViT-B where the start names no model) and refused."""
    last = demo_finetuning[1] / checkpoint.LAST
    capsys.readouterr()
    run_finetune('--resume', last, '--data_path', 'demo', '--num_workers', 0, '--device', 'cpu', '--batch_size', 32,
                 '--epochs', 1, '--max_steps', 1, '--output_dir', tmp_path)
    out = capsys.readouterr().out
    assert f'resumed from {last}: epoch 0, 1280 of its samples done, step 40' in out  # 40 steps of 32
    assert '\nmodel vit_tiny_patch8: ' in out
    assert checkpoint.load(tmp_path / checkpoint.LAST)['args']['input_size'] == 32


def test_linear_probe_trains_only_the_head(small_folder, tmp_path, capsys):
    import main_finetune
    from models_mae import mae_vit_tiny_patch8
    torch.manual_seed(1)
    pretrained = mae_vit_tiny_patch8().state_dict()
    torch.save({'model': pretrained}, tmp_path / 'pretrained.pth')

    # in the model: BatchNorm without affine before the linear head, gradients only in the head
    _, args = parse('--linprobe', '--finetune', tmp_path / 'pretrained.pth', '--model', 'vit_tiny_patch8',
                    '--input_size', 64)
    torch.manual_seed(args.seed)  # as main() does: this is the head the run below starts from
    model = main_finetune.build_model(args, num_classes=2, resuming=False)
    initial_head = model.head[1].weight.detach().clone()
    assert isinstance(model.head[0], torch.nn.BatchNorm1d) and model.head[0].weight is None
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {'head.1.weight', 'head.1.bias'}

    # through the entry point: after training, every encoder tensor is the pre-trained one
    run_finetune(*TINY, '--linprobe', '--finetune', tmp_path / 'pretrained.pth', '--data_path', small_folder,
                 '--batch_size', 16, '--epochs', 2, '--warmup_epochs', 1, '--output_dir', tmp_path / 'probe')
    out = capsys.readouterr().out
    assert f'{192 * 2 + 2:,} trained, 2 classes' in out  # the head: 192 x 2 + 2 (it read '0.00 M trained')
    # the decoder's keys grouped by their first name, each group with its count (a line of 30 keys at ViT-Ti)
    decoder_blocks = sum(k.startswith('decoder_blocks.') for k in pretrained)
    assert f'decoder_blocks.* ({decoder_blocks})' in out.split('  dropped: ')[1].splitlines()[0]
    state = checkpoint.load(tmp_path / 'probe' / checkpoint.LAST)['model']
    for key, value in state.items():
        if not key.startswith('head.'):
            torch.testing.assert_close(value, pretrained[key], msg=key)
    assert state['head.0.num_batches_tracked'] == 8  # BatchNorm statistics of the 8 training steps
    assert not torch.equal(state['head.1.weight'], initial_head)  # the head did train
    assert all(math.isfinite(r['test_acc1']) for r in read_jsonl(tmp_path / 'probe' / 'log.txt'))


@pytest.fixture(scope='module')
def two_epochs(small_folder, tmp_path_factory):
    """Fine-tuning with the recipe's augmentation (RandAugment, random erasing, mixup/cutmix, drop
    path): 2 epochs of 4 steps, every step logged. Tests read its folder and leave it as it is.
    returns: (its flags without --output_dir, its folder)"""
    flags = [*TINY, '--data_path', small_folder, '--batch_size', 16, '--epochs', 2, '--warmup_epochs', 1,
             '--log_freq', 1]
    out = tmp_path_factory.mktemp('two_epochs')
    run_finetune(*flags, '--output_dir', out)
    return flags, out


def test_eval_reproduces_the_accuracy_at_the_end_of_training(small_folder, two_epochs, capsys):
    _, out = two_epochs
    last = read_jsonl(out / 'log.txt')[-1]
    # in batches of 7: --eval mixes nothing, so an odd batch is no error (the recipe's mixup refused it);
    # training flags (a fine-tuning command with --eval added) are named as ignored
    capsys.readouterr()
    stats = run_finetune(*TINY, '--data_path', small_folder, '--eval', '--resume', out / checkpoint.LAST,
                         '--batch_size', 7, '--mixup', 0.5, '--blr', 1e-3, '--output_dir', '')
    assert 'warning: --blr, --mixup shape training, which --eval does not do: ignored' in capsys.readouterr().out
    assert stats['images'] == 17
    assert (stats['acc1'], stats['acc5']) == (last['test_acc1'], last['test_acc5'])
    assert stats['loss'] == pytest.approx(last['test_loss'], rel=1e-6)

    best = checkpoint.load(out / checkpoint.BEST)
    assert best['acc1'] == max(r['test_acc1'] for r in read_jsonl(out / 'log.txt'))


def test_an_evaluation_that_fails_keeps_the_epoch_it_follows(small_folder, two_epochs, tmp_path, capsys):
    """An unreadable validation image stopped the run after its first epoch's training, and the
    epoch was lost (the checkpoint is written after the evaluation). It is kept now: mended, the same
    command evaluates it without training it again and goes on, logging what the run without the
    broken file logged."""
    flags, uninterrupted = two_epochs
    data = tmp_path / 'data'
    shutil.copytree(small_folder, data)
    broken = data / 'val' / sorted(os.listdir(data / 'val'))[0] / 'broken.jpg'
    broken.write_bytes(b'')
    flags = [*flags, '--data_path', data, '--output_dir', tmp_path / 'out']
    with pytest.raises(UsageError, match='unreadable image .*broken.jpg'):
        run_finetune(*flags)
    assert 'the training of epoch 0 is kept in checkpoint-last.pth' in capsys.readouterr().out
    assert checkpoint.load(tmp_path / 'out' / checkpoint.LAST)['step'] == 4  # the 4 steps of epoch 0
    broken.unlink()
    run_finetune(*flags)
    steps = [r['step'] for r in read_jsonl(tmp_path / 'out' / 'log.jsonl')]
    assert steps == list(range(1, 9))  # each of the 8 steps trained once
    keys = ('epoch', 'train_loss', 'test_acc1', 'test_acc5')
    assert [{k: e[k] for k in keys} for e in read_jsonl(tmp_path / 'out' / 'log.txt')] == \
        [{k: e[k] for k in keys} for e in read_jsonl(uninterrupted / 'log.txt')]


def test_resuming_training_from_weights_alone(small_folder, two_epochs, tmp_path, capsys):
    """--resume of checkpoint-best.pth (the best epoch's weights, no optimizer) restarted training at
    epoch 0 without a word and overwrote the run's checkpoint-last.pth: refused, saying what to resume.
    Weights alone of another kind (a release) start a run at epoch 0 from them, with a line saying
    so, but not in a folder whose run's checkpoint they would overwrite."""
    flags, out = two_epochs
    with pytest.raises(UsageError, match=r"holds the weights of a run's best epoch, without the optimizer and the "
                                         r"schedule to go on from: --resume that run's checkpoint-last.pth"):
        run_finetune(*flags, '--resume', out / checkpoint.BEST, '--output_dir', tmp_path / 'best')
    weights = tmp_path / 'release.pth'
    torch.save({'model': checkpoint.load(out / checkpoint.BEST)['model']}, weights)
    shutil.copy(out / checkpoint.LAST, tmp_path / checkpoint.LAST)
    with pytest.raises(UsageError, match=f'{tmp_path} holds the checkpoint-last.pth of a run, which this one, '
                                         f'starting afresh from the weights of {weights}, would overwrite'):
        run_finetune(*flags, '--resume', weights, '--output_dir', tmp_path)
    capsys.readouterr()
    run_finetune(*flags, '--resume', weights, '--max_steps', 1, '--output_dir', tmp_path / 'afresh')
    out_lines = capsys.readouterr().out.splitlines()
    assert f'{weights} holds weights only (no optimizer state, no epoch): training starts at epoch 0 from them' \
        in out_lines
    assert not any(line.startswith(('no --finetune', 'resumed from')) for line in out_lines)
    assert [r['step'] for r in read_jsonl(tmp_path / 'afresh' / 'log.jsonl')] == [1]


def test_eval_on_other_classes_is_refused(small_folder, two_epochs, tmp_path):
    """A fine-tuning checkpoint records its classes: --eval on a val/ (without train/) whose class
    folders have other names gave 0 % without a word. A checkpoint that records none (a release)
    with another number of outputs than val/ has classes: the mismatch says so."""
    _, out = two_epochs
    classes = sorted(os.listdir(os.path.join(small_folder, 'val')))
    assert checkpoint.load(out / checkpoint.LAST)['args']['classes'] == classes
    for name, links in (('renamed', {'x': classes[1], 'y': classes[0]}),
                        ('three', {c: c for c in classes})):
        for link, target in links.items():
            (tmp_path / name / 'val').mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.join(small_folder, 'val', target), tmp_path / name / 'val' / link)
    # a third class: a copy (a link to a class folder reached by another is refused)
    shutil.copytree(os.path.join(small_folder, 'val', classes[0]), tmp_path / 'three' / 'val' / 'z')
    eval_flags = [*TINY, '--eval', '--output_dir', '']
    with pytest.raises(UsageError, match=rf'was trained on other classes than the class folders of val/ \(only in its '
                                         rf'training data: {classes[0]}, {classes[1]}; only in val/: x, y\)'):
        run_finetune(*eval_flags, '--data_path', tmp_path / 'renamed', '--resume', out / checkpoint.LAST)
    release = tmp_path / 'release.pth'
    torch.save({'model': checkpoint.load(out / checkpoint.LAST)['model']}, release)
    with pytest.raises(checkpoint.WeightsDoNotFit, match='its classifier has 2 outputs and val/ 3 class folders'):
        run_finetune(*eval_flags, '--data_path', tmp_path / 'three', '--resume', release)
    # an encoder alone (the official mae_pretrain_vit_base.pth is one): it listed the classifier's keys as missing
    torch.save({'model': {k: v for k, v in torch.load(release)['model'].items() if not k.startswith('head')}}, release)
    with pytest.raises(UsageError, match=r'holds no classifier \(head\.\*\): an encoder, or a pre-training checkpoint'):
        run_finetune(*eval_flags, '--data_path', small_folder, '--resume', release)


def test_eval_of_weights_at_another_image_size_names_the_size(small_folder, tmp_path):
    """A release of a classifier trained at 96 px (8 px patches: 1 + 144 position rows) evaluated at
    the model's own 64 px: the mismatch says which --input_size to give."""
    release = tmp_path / 'release.pth'
    classes = len(os.listdir(os.path.join(small_folder, 'val')))
    torch.save({'model': create_classifier('vit_tiny_patch8', num_classes=classes, img_size=96).state_dict()}, release)
    with pytest.raises(checkpoint.WeightsDoNotFit, match=r'pos_embed.*; its position table is for 96 px images: give '
                                                         r'--input_size 96$'):
        run_finetune(*TINY, '--eval', '--output_dir', '', '--data_path', small_folder, '--resume', release)


def test_two_process_evaluation_is_exact(small_folder, tmp_path, capsys):
    """--eval with 2 processes over 17 images (9 + 8, no padding) = 1 process (in this one)."""
    from models_vit import vit_tiny_patch8
    torch.manual_seed(0)
    torch.save({'model': vit_tiny_patch8(num_classes=2).state_dict()}, tmp_path / 'weights.pth')
    flags = [*TINY, '--data_path', small_folder, '--eval', '--resume', tmp_path / 'weights.pth', '--batch_size', 4,
             '--output_dir', '', '--mixup', 0.5]  # a training flag: warned about before the processes meet
    capsys.readouterr()
    run_finetune(*flags)
    one = capsys.readouterr().out
    two = run_script(sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', 2, '--standalone',
                     'main_finetune.py', *flags)
    assert two.returncode == 0, two.stderr[:3000]  # the start: a failing rank's own message comes before torchrun's
    # rank 0's alone, as every line of the run (each rank printed it)
    assert two.stdout.count('warning: --mixup shapes training') == 1, two.stdout
    line = [ln for ln in one.splitlines() if ln.startswith('* Acc@1')]
    assert len(line) == 1 and 'on the 17 validation images' in one
    assert [ln for ln in two.stdout.splitlines() if ln.startswith('* Acc@1')] == line
    assert 'on the 17 validation images' in two.stdout


def test_resumed_finetuning_with_randaugment_and_mixup_continues_exactly(two_epochs, tmp_path, capsys):
    """RandAugment, random erasing, mixup/cutmix and drop path are all drawn from seeded
    generators: a run stopped part-way and resumed gives the same losses, bit for bit."""
    flags, straight_dir = two_epochs
    run_finetune(*flags, '--output_dir', tmp_path / 'resumed', '--max_steps', 3)
    # another split of the same effective batch draws other mixes and drops: a note says so (a copy, one step)
    shutil.copytree(tmp_path / 'resumed', tmp_path / 'split')
    capsys.readouterr()
    run_finetune(*flags, '--batch_size', 8, '--accum_iter', 2, '--max_steps', 1, '--output_dir', tmp_path / 'split')
    assert 'note: resumed with another split of the same effective batch' in capsys.readouterr().out
    run_finetune(*flags, '--output_dir', tmp_path / 'resumed')
    straight = {r['step']: r['loss'] for r in read_jsonl(straight_dir / 'log.jsonl')}
    resumed = {r['step']: r['loss'] for r in read_jsonl(tmp_path / 'resumed' / 'log.jsonl')}
    assert sorted(straight) == list(range(1, 9)) and resumed == straight


def test_a_resumed_run_keeps_the_weights_it_started_from(small_folder, tmp_path, capsys):
    """A run resumed with another --finetune went on from its own checkpoint, silently, and its
    checkpoints then named the other file as their start; resumed without --finetune it called
    itself a run from scratch and took DeiT's recipe."""
    from models_vit import vit_tiny_patch8
    for seed, name in enumerate(('start.pth', 'other.pth')):
        torch.manual_seed(seed)
        torch.save({'model': vit_tiny_patch8(num_classes=2).state_dict()}, tmp_path / name)
    flags = [*TINY, '--data_path', small_folder, '--batch_size', 8, '--epochs', 1, '--warmup_epochs', 0,
             '--max_steps', 1, '--output_dir', tmp_path / 'run']
    run_finetune(*flags, '--finetune', tmp_path / 'start.pth')
    with pytest.raises(UsageError, match=rf"is of a run that started from --finetune {tmp_path / 'start.pth'}, .*: the "
                                         rf"weights of --finetune {tmp_path / 'other.pth'} would not be loaded. To "
                                         rf"resume the run, leave --finetune out; to start from .*other.pth, give "
                                         rf"another --output_dir$"):
        run_finetune(*flags, '--finetune', tmp_path / 'other.pth')
    capsys.readouterr()
    run_finetune(*flags)  # one more step, of the run started from start.pth
    out = capsys.readouterr().out
    assert 'mode: finetune' in out and 'warning: resumed with other flags' not in out, out
    ckpt = checkpoint.load(tmp_path / 'run' / checkpoint.LAST)
    assert ckpt['step'] == 2 and ckpt['args']['finetune'] == str(tmp_path / 'start.pth')


def test_model_ema_follows_the_weights(small_folder, tmp_path, capsys):
    """After one step from w0 to w1, the EMA holds decay * w0 + (1 - decay) * w1 (timm ModelEmaV3,
    no warm-up); it is checkpointed and evaluated. Its accuracy line is labelled and comes before
    the model's, which log readers take as the last `* Acc@1` line."""
    from models_vit import vit_tiny_patch8
    torch.manual_seed(0)
    start = vit_tiny_patch8(num_classes=2).state_dict()
    torch.save({'model': start}, tmp_path / 'start.pth')
    decay = 0.9
    run_finetune(*TINY, '--data_path', small_folder, '--finetune', tmp_path / 'start.pth', '--batch_size', 16,
                 '--epochs', 1, '--warmup_epochs', 0, '--lr', 1e-3, '--max_steps', 1, '--model_ema',
                 '--model_ema_decay', decay, '--output_dir', tmp_path / 'ema')
    ckpt = checkpoint.load(tmp_path / 'ema' / checkpoint.LAST)
    key = 'blocks.0.attn.qkv.weight'
    assert not torch.equal(ckpt['model'][key], start[key])
    torch.testing.assert_close(ckpt['model_ema'][key], decay * start[key] + (1 - decay) * ckpt['model'][key])
    epoch = read_jsonl(tmp_path / 'ema' / 'log.txt')[-1]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith('* Acc@1')]
    # --eval --model_ema evaluates the checkpoint's EMA weights: the run's own figures of them (not the model's)
    assert epoch['test_ema_loss'] != pytest.approx(epoch['test_loss'], rel=1e-4)
    stats = run_finetune(*TINY, '--data_path', small_folder, '--eval', '--model_ema', '--resume',
                         tmp_path / 'ema' / checkpoint.LAST, '--output_dir', '')
    assert (stats['acc1'], stats['loss']) == (epoch['test_ema_acc1'], pytest.approx(epoch['test_ema_loss'], rel=1e-6))
    # the same weights in the layout of timm's train.py (state_dict, state_dict_ema): its EMA was not found
    torch.save({'epoch': 0, 'arch': 'vit_tiny_patch8', 'state_dict': ckpt['model'], 'state_dict_ema': ckpt['model_ema']},
               tmp_path / 'timm.pth.tar')
    assert run_finetune(*TINY, '--data_path', small_folder, '--eval', '--model_ema', '--resume',
                        tmp_path / 'timm.pth.tar', '--output_dir', '')['loss'] == stats['loss']
    with pytest.raises(UsageError, match='holds no EMA weights'):
        run_finetune(*TINY, '--data_path', small_folder, '--eval', '--model_ema', '--resume', tmp_path / 'start.pth',
                     '--output_dir', '')
    # checkpoint-best.pth keeps the model's weights alone: its run had --model_ema (it said the run had none)
    with pytest.raises(UsageError, match=r"holds no EMA weights: its run had --model_ema, but this file keeps the "
                                         r"best epoch's model weights only; leave --model_ema out to use them, or "
                                         r"give checkpoint-last.pth"):
        run_finetune(*TINY, '--data_path', small_folder, '--eval', '--model_ema', '--resume',
                     tmp_path / 'ema' / checkpoint.BEST, '--output_dir', '')
    assert lines == [f"* Acc@1 {epoch['test_ema_acc1']:.3f} Acc@5 {epoch['test_ema_acc5']:.3f} "
                     f"loss {epoch['test_ema_loss']:.3f}  (EMA weights)",
                     f"* Acc@1 {epoch['test_acc1']:.3f} Acc@5 {epoch['test_acc5']:.3f} loss {epoch['test_loss']:.3f}"]
    # resumed (a step more, in copies) without --model_ema, or with it from a checkpoint without EMA weights: said
    flags = [*TINY, '--data_path', small_folder, '--finetune', tmp_path / 'start.pth', '--batch_size', 16, '--epochs', 1,
             '--warmup_epochs', 0, '--lr', 1e-3, '--max_steps', 1]
    for copy, with_ema in (('dropped', False), ('started', True)):
        shutil.copytree(tmp_path / 'ema', tmp_path / copy)
        if with_ema:
            torch.save({k: v for k, v in ckpt.items() if k != 'model_ema'}, tmp_path / copy / checkpoint.LAST)
        capsys.readouterr()
        run_finetune(*flags, *(['--model_ema'] if with_ema else []), '--output_dir', tmp_path / copy)
        assert ('holds no EMA weights: --model_ema starts its average from the resumed weights' if with_ema else
                'holds EMA weights, which this run without --model_ema does not carry on') in capsys.readouterr().out


def test_any_timm_model_trains_from_scratch(small_folder, tmp_path):
    run_finetune('--model', 'resnet10t', '--input_size', 64, '--num_workers', 0, '--device', 'cpu',
                 '--data_path', small_folder, '--batch_size', 16, '--epochs', 1, '--max_steps', 2,
                 '--output_dir', tmp_path)
    record = read_jsonl(tmp_path / 'log.txt')[-1]
    assert math.isfinite(record['train_loss']) and 0 <= record['test_acc1'] <= 100


def test_bad_input_is_one_line(small_folder, tmp_path):
    result = run_script(sys.executable, 'main_finetune.py', *TINY, '--data_path', small_folder, '--eval',
                        '--output_dir', tmp_path)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip() == 'error: --eval needs weights: --resume <fine-tuned checkpoint> ' \
                                    '(or a run in --output_dir)'
    with pytest.raises(UsageError, match='--batch_size must be even'):
        run_finetune(*TINY, '--data_path', small_folder, '--batch_size', 15, '--output_dir', tmp_path)
    # --eval added to a fine-tuning command: the error alone, not first a warning that its flags are ignored
    with pytest.raises(UsageError, match=r'--eval evaluates a fine-tuned checkpoint given with --resume'):
        with contextlib.redirect_stdout(io.StringIO()) as console:
            run_finetune(*TINY, '--data_path', small_folder, '--finetune', tmp_path / 'pretrained.pth', '--blr', 1e-3,
                         '--epochs', 5, '--eval', '--output_dir', tmp_path)
    assert 'warning' not in console.getvalue(), console.getvalue()
    with pytest.raises(UsageError, match='--nb_classes 1 is fewer than the 2 class folders'):
        run_finetune(*TINY, '--data_path', small_folder, '--nb_classes', 1, '--output_dir', tmp_path)
    only_train = tmp_path / 'only_train'
    shutil.copytree(os.path.join(small_folder, 'train'), only_train / 'train')
    with pytest.raises(UsageError, match=r"only_train' has no val/ folder: give the root of an ImageFolder data set "
                                         r"\(val/<class>/<image>\)"):
        run_finetune(*TINY, '--data_path', only_train, '--output_dir', tmp_path)
    with pytest.raises(UsageError, match='--aa randaug is not an augmentation policy timm knows: give '
                                         'rand-m9-mstd0.5-inc1'):  # timm's bare AssertionError
        run_finetune(*TINY, '--data_path', small_folder, '--aa', 'randaug', '--output_dir', tmp_path)
    with pytest.raises(UsageError, match="--aa rand-m9-inc: 'inc' is not a RandAugment setting"):  # timm skipped it
        run_finetune(*TINY, '--data_path', small_folder, '--aa', 'rand-m9-inc', '--output_dir', tmp_path)
    # timm's CNNs have no cls token: --linprobe's pooling is named, with the flag that fixes it
    for model in ('resnet10t', 'hivit_tiny_patch8_64'):  # HiViT's own words printed its keywords as a dict
        with pytest.raises(UsageError, match=f'{model} has no cls token for --linprobe to classify: give --global_pool'):
            run_finetune('--model', model, '--input_size', 64, '--device', 'cpu', '--data_path', small_folder,
                         '--linprobe', '--output_dir', tmp_path)
    # 60 px on 8-px patches: the last 4 rows and columns were left out without a word
    with pytest.raises(UsageError, match=r'cannot build vit_tiny_patch8 at 60 px: its patches of 8 px every 8 px '
                                         r'leave the last pixels out; give an --input_size that fits, e.g. 56 or 64'):
        run_finetune(*TINY, '--data_path', small_folder, '--input_size', 60, '--max_steps', 1, '--output_dir', tmp_path)
