"""Bad input a new user meets first, each a clear one-line error (or a run that carries on
correctly): impossible rates and sizes, an output folder that cannot be written, data sets with
symlink loops or mismatched classes, unreadable or huge images for the pictures, checkpoints
that are not checkpoints, and messages that advise what the entry point offers."""
import argparse
import errno
import gzip
import json
import os
import pickle
import re
import shutil
import signal
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO, read_jsonl, run_finetune, run_pretrain, run_script, write_broken_files
from util import checkpoint
from util.errors import UsageError, run_cli
from util.registry import create_classifier
from util.signals import STOP_SIGNALS

TINY = ['--model', 'mae_vit_tiny', '--device', 'cpu', '--num_workers', 0, '--data_path', 'demo']


@pytest.mark.parametrize('tool, required, shortened', [
    ('main_pretrain', ['--data_path', 'demo'], '--batch=4'), ('main_finetune', ['--data_path', 'demo'], '--batch=4'),
    ('benchmark', [], '--batch=4'), ('compare_loss', ['a', 'b'], '--rel=0.1'),
    ('export', ['--checkpoint', 'a.pth', '--output', 'a.safetensors'], '--mod=vit_tiny_patch8'),
    ('visualize', [], '--check=a.pth')])
def test_a_shortened_flag_is_refused(tool, required, shortened):
    """argparse takes a prefix of a flag for the flag by default: --batch=4 passed through a ModelZoo script (which
    reads --batch_size= only) trained at batch 4 and reported the case of batch 64."""
    _, left = __import__(tool).get_args_parser().parse_known_args(required + [shortened])
    assert left == [shortened]  # what parse_args refuses: 'unrecognized arguments'


@pytest.mark.parametrize('flags, message', [
    (['--lr', -0.1], '--lr must be a finite number above 0, got -0.1'),
    (['--blr', 'nan'], '--blr must be a finite number above 0, got nan'),
    (['--weight_decay', 'inf'], '--weight_decay must be a finite number 0 or more, got inf'),
    (['--input_size', 0], '--input_size must be a positive number of pixels, got 0'),
    (['--mask_ratio', 0], '--mask_ratio must lie between 0 and 1'),
    (['--mask_ratio', 1], '--mask_ratio must lie between 0 and 1'),
    (['--epochs', 3, '--warmup_epochs', 4], '--warmup_epochs 4 does not fit a run of --epochs 3'),
    (['--seed', -1], '--seed must be a whole number from 0 to 4294967295, got -1'),  # were numpy's tracebacks
    (['--seed', 2 ** 32], '--seed must be a whole number from 0 to 4294967295, got 4294967296'),
    (['--save_every_steps', -1], '--save_every_steps must be 0 or more, got -1'),  # was taken as 0
    (['--max_bad_images', -1], '--max_bad_images must be 0 or more, got -1'),  # "0 replaced, more than -1"
    (['--start_epoch', -1], '--start_epoch must be 0 or more, got -1'),  # the sampler's traceback in a worker
    (['--vis_freq', -1], '--vis_freq must be 0 or more, got -1'),  # was taken as every epoch
    (['--lr_schedule', 'step', '--lr_milestones', 5, -1], '--lr_milestones are epochs, 0 or more, got 5 -1'),
    # a step schedule's flags under MAE's cosine did nothing, without a word
    (['--lr_milestones', 5, '--lr_gamma', 0.5], '--lr_gamma and --lr_milestones shape the step schedule, and '
                                                '--lr_schedule is cosine: add --lr_schedule step, or leave them out'),
    (['--start_epoch', 5, '--epochs', 1], '--start_epoch 5 is not below --epochs 1: nothing would train'),  # was exit 0
    (['--input_size', 8], 'a mask ratio of 0.75 leaves none of the 1 patches visible: give a larger --input_size'),
    (['--data_path', '/nonexistent/imagenet'], "--data_path '/nonexistent/imagenet' does not exist"),
    # 40 % of maskfeat_vit_tiny's 64 patches is 26
    (['--model', 'maskfeat_vit_tiny', '--mask_min_patches', 27], 'blocks of 27 or more patches cannot make a mask of 26: '
                                                                 'give --mask_min_patches 26 or less, or mask more'),
    # another method's flag was ignored, or failed in the model's constructor (Beit.__init__()'s TypeError)
    (['--mask_count', 5], "--mask_count is MaskFeat's option, which mae_vit_tiny does not have: leave it out"),
    (['--model', 'simmim_vit_tiny', '--no-norm_pix_loss'], "--norm_pix_loss is MAE's and MAE-HiViT's option, which "
                                                           "simmim_vit_tiny does not have"),
])
def test_impossible_rates_and_sizes_are_refused_before_the_run(flags, message, tmp_path):
    with pytest.raises(UsageError) as error:
        run_pretrain(*TINY, '--max_steps', 1, '--batch_size', 8, *flags, '--output_dir', tmp_path)
    assert str(error.value).startswith(message)
    assert not (tmp_path / 'log.jsonl').exists()


def test_a_missing_data_path_is_reported_before_the_model_is_built(tmp_path, capsys):
    """The data set needs the model's mask generator, but a wrong path must not wait for a ViT-L to be built."""
    with pytest.raises(UsageError, match="--data_path '/nonexistent/imagenet' does not exist"):
        run_pretrain(*TINY, '--data_path', '/nonexistent/imagenet', '--output_dir', tmp_path)
    assert 'parameters' not in capsys.readouterr().out  # the line printed once the model is built


def test_a_training_run_without_an_output_dir_says_it_keeps_nothing(tmp_path, capsys):
    """--output_dir '' (the official code's way to save nothing, and what "$OUT" gives with OUT unset) trained
    and exited 0 without a word that nothing was written."""
    run_pretrain(*TINY, '--max_steps', 1, '--batch_size', 8, '--epochs', 1, '--warmup_epochs', 0, '--output_dir', '')
    assert ('warning: --output_dir is empty: this run writes no checkpoint, log or TensorBoard file; give a folder '
            'to keep them') in capsys.readouterr().out
    run_pretrain(*TINY, '--max_steps', 1, '--batch_size', 8, '--epochs', 1, '--warmup_epochs', 0, '--output_dir', '',
                 '--log_dir', tmp_path)
    assert ("warning: --output_dir is empty: this run writes no checkpoint, log.txt or log.jsonl (only --log_dir's "
            "TensorBoard files); give") in capsys.readouterr().out
    assert [name.startswith('events.out.tfevents') for name in os.listdir(tmp_path)] == [True]


def test_a_console_reader_that_goes_away_ends_the_run_without_a_traceback(tmp_path):
    """`python main_pretrain.py ... | head -1`: the next print raised BrokenPipeError, with its traceback (and the
    interpreter's second one, flushing stdout at exit)."""
    import subprocess
    command = [sys.executable, 'main_pretrain.py', *map(str, TINY), '--max_steps', '2', '--batch_size', '8', '--epochs',
               '1', '--warmup_epochs', '0', '--output_dir', str(tmp_path)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.stdout.close()  # as head does after its line: every later write to the pipe fails
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 1 and stderr == '', stderr[-2000:]


def test_output_folders_that_cannot_hold_the_run_are_named_for_what_they_are(tmp_path):
    """A name with bytes that are not UTF-8 trained, then failed in TensorBoard's writer with a traceback; a link
    to a missing folder was 'cannot write there (File exists)'."""
    flags = [*TINY, '--max_steps', 1, '--batch_size', 8, '--epochs', 1, '--warmup_epochs', 0]
    not_utf8 = os.fsdecode(os.fsencode(str(tmp_path)) + b'/run_\xff')
    for flag in ('--output_dir', '--log_dir'):
        with pytest.raises(UsageError, match=f"^{flag} '.*run_.udcff' has bytes in its name that are not UTF-8, "
                                             f"which the logs cannot write: give a folder whose name is UTF-8$"):
            run_pretrain(*flags, '--output_dir', tmp_path / 'out', flag, not_utf8)
    os.symlink(tmp_path / 'missing', tmp_path / 'link')
    with pytest.raises(UsageError, match=f"^--output_dir {tmp_path / 'link'} is a link to {tmp_path / 'missing'}, "
                                         f"which does not exist: make that folder, or give another --output_dir$"):
        run_pretrain(*flags, '--output_dir', tmp_path / 'link')
    assert sorted(os.listdir(tmp_path)) == ['link']


FINETUNE_TINY = ['--model', 'vit_tiny_patch16_224', '--device', 'cpu', '--num_workers', 0, '--data_path', 'demo']


@pytest.mark.parametrize('run, flags, message', [
    (run_pretrain, ['--crop_min', 1.5], '--crop_min (the smallest crop, as a fraction of the image area) must lie in '
                                        '(0, 1], got 1.5'),
    (run_pretrain, ['--crop_min', 0], 'must lie in (0, 1], got 0.0'),
    (run_pretrain, ['--opt_betas', 0.9, 1], 'must lie in [0, 1), got 0.9 1.0'),
    (run_finetune, ['--drop_path', 1], '--drop_path (the probability of skipping a residual branch) must lie in '
                                       '[0, 1), got 1.0'),
    (run_finetune, ['--smoothing', 'nan'], 'must lie in [0, 1), got nan'),
    (run_finetune, ['--reprob', 1.01], 'must lie in [0, 1], got 1.01'),
    (run_finetune, ['--mixup', -1], 'must lie in [0, inf), got -1.0'),
    (run_finetune, ['--mixup_prob', 3], 'must lie in [0, 1], got 3.0'),
    (run_finetune, ['--model_ema', '--model_ema_decay', 2], 'must lie in [0, 1], got 2.0'),
    (run_finetune, ['--layer_decay', 0], 'must lie in (0, 1], got 0.0'),
    (run_finetune, ['--color_jitter', 'inf'], 'must lie in [0, inf), got inf'),
    (run_finetune, ['--cutmix_minmax', 0.8, 0.2], '--cutmix_minmax takes the smaller bound first, then a larger one, '
                                                 'got 0.8 0.2'),
    (run_finetune, ['--recount', -1], '--recount (the boxes random erasing draws in an image) must be at least 1, '
                                      'got -1: --reprob 0 turns random erasing off'),  # timm's ValueError in a worker
])
def test_rates_outside_their_range_are_refused_before_the_run(run, flags, message, tmp_path):
    """Each of these stopped a run with a traceback from torch, timm or torchvision (drop path 1:
    bernoulli_ of p -0.09; crop_min 1.5: uniform_'s range; betas: AdamW's ValueError) or trained
    on silently (an EMA decay of 2, a mixing probability of 3)."""
    with pytest.raises(UsageError) as error:
        run(*(TINY if run is run_pretrain else FINETUNE_TINY), '--max_steps', 1, '--epochs', 1, '--warmup_epochs', 0,
            '--batch_size', 8, *flags, '--output_dir', tmp_path)
    flag = [f for f in flags if str(f).startswith('--')][-1]
    assert str(error.value).startswith(f'{flag} ') and str(error.value).endswith(message)
    assert not (tmp_path / 'log.jsonl').exists()


def test_a_lower_bound_above_the_peak_lr_is_said(capsys):
    """DeiT's recipe fixes min lr 1e-5 but scales the peak with the batch: at 8 images the peak is
    2.5e-4 * 8 / 256 = 7.8e-6, and the cosine would climb from it to the bound."""
    from util.flags import set_learning_rate
    args = argparse.Namespace(lr=None, blr=2.5e-4, batch_size=8, accum_iter=1, min_lr=1e-5, min_blr=None,
                              warmup_lr=None, warmup_blr=0.0, lr_schedule='cosine', warmup_epochs=5)
    set_learning_rate(args)
    peak = 2.5e-4 * 8 / 256
    assert f"warning: the lr's lower bound 1.000e-05 is above its peak {peak:.3e}" in capsys.readouterr().out
    args.lr, args.batch_size = None, 64  # 6.25e-5: the bound is below it
    set_learning_rate(args)
    assert 'warning' not in capsys.readouterr().out


def test_console_counts_take_the_singular_for_one(capsys):
    from util.flags import set_learning_rate
    from util.logger import counted
    assert [counted(n, 'process', 'processes') for n in (0, 1, 2)] == ['0 processes', '1 process', '2 processes']
    assert [counted(n, 'warm-up epoch') for n in (1, 40)] == ['1 warm-up epoch', '40 warm-up epochs']
    args = argparse.Namespace(lr=None, blr=1e-3, batch_size=8, accum_iter=1, min_lr=0.0, min_blr=None, warmup_lr=0.0,
                              warmup_blr=None, lr_schedule='cosine', warmup_epochs=1, epochs=10)
    set_learning_rate(args)
    assert '; 1 warm-up epoch from 0.000e+00, then cosine' in capsys.readouterr().out


def test_step_milestones_the_run_never_reaches_are_said(capsys):
    """SimMIM's 800-epoch recipe steps the lr down at epoch 700: a trial of 10 epochs never does."""
    from util.flags import set_learning_rate
    args = argparse.Namespace(lr=None, blr=1e-4, batch_size=8, accum_iter=1, min_lr=0.0, min_blr=None, warmup_lr=0.0,
                              warmup_blr=None, lr_schedule='step', lr_gamma=0.1, warmup_epochs=1, epochs=10)
    expected = {(700,): 'warning: a run of --epochs 10 never reaches --lr_milestones 700, so the lr stays at its peak '
                        'after the warm-up',  # a warm-up longer than the run never reaches the peak at all
                (5, 700): 'warning: a run of --epochs 10 never reaches --lr_milestones 700\n',
                None: 'warning: --lr_schedule step without --lr_milestones keeps the lr at its peak after the warm-up',
                (5, 9): None}
    for milestones, warning in expected.items():
        args.lr_milestones = list(milestones) if milestones else None
        set_learning_rate(args)
        out = capsys.readouterr().out
        assert (warning in out) if warning else 'warning' not in out, (milestones, out)


def test_a_recipe_warmup_longer_than_the_run_is_said(capsys):
    from util.flags import apply_recipe
    args = argparse.Namespace(epochs=3, warmup_epochs=None, lr=None, clip_grad=None)
    apply_recipe(args, {'warmup_epochs': 40})
    assert "warning: the recipe's 40 warm-up epochs are more than --epochs 3" in capsys.readouterr().out
    args.epochs, args.warmup_epochs = 0, None  # refused on its own (check_run_args), without the warning first
    apply_recipe(args, {'warmup_epochs': 40})
    assert capsys.readouterr().out == ''
    # --knn and --eval train nothing: the schedule they were given (a training command with --knn added) is
    # neither checked nor refused, only named as ignored, while fine-tuning with the same flags is checked
    import main_finetune
    for flags, named in ((['--epochs', '1'], '--epochs shapes'), (['--epochs', '1', '--warmup_epochs', '4'],
                                                                  '--epochs, --warmup_epochs shape')):
        main_finetune.fill_recipe(main_finetune.get_args_parser().parse_args(['--knn', '--data_path', 'demo', *flags]))
        assert capsys.readouterr().out == f'warning: {named} training, which --knn does not do: ignored\n'
    # flags of the loop and of the training augmentation, outside the recipes, are named too (they were not)
    main_finetune.fill_recipe(main_finetune.get_args_parser().parse_args(
        ['--eval', '--data_path', 'demo', '--grad_ckpt', '--accum_iter', '4', '--max_steps', '2', '--crop_min', '0.08',
         '--mixup_mode', 'elem']))
    assert capsys.readouterr().out == 'warning: --accum_iter, --grad_ckpt, --max_steps, --mixup_mode shape training, ' \
        'which --eval does not do: ignored\n'  # --crop_min at its default: nothing to say


def test_a_tilde_in_a_path_flag_means_the_home_folder(monkeypatch):
    """`--output_dir=~/out` (the form the ModelZoo scripts take) reaches the program unexpanded:
    bash expands a tilde after = only in assignments. It made a folder named ~ in the working one."""
    import compare_loss
    import export
    import main_finetune
    import main_pretrain
    import visualize
    monkeypatch.setenv('HOME', '/home/someone')
    args = main_pretrain.get_args_parser().parse_args(['--data_path=~/imagenet', '--output_dir=~/out',
                                                       '--log_dir=~/tb', '--resume=~/out/checkpoint-last.pth'])
    assert (args.data_path, args.output_dir, args.log_dir, args.resume) == (
        '/home/someone/imagenet', '/home/someone/out', '/home/someone/tb', '/home/someone/out/checkpoint-last.pth')
    assert main_finetune.get_args_parser().parse_args(['--data_path=x', '--finetune=~/a.pth']).finetune == \
        '/home/someone/a.pth'
    args = export.get_args_parser().parse_args(['--checkpoint=~/a.pth', '--output=~/a.safetensors'])
    assert (args.checkpoint, args.output) == ('/home/someone/a.pth', '/home/someone/a.safetensors')
    args = visualize.get_args_parser().parse_args(['--checkpoint=~/a.pth', '--data_path=~/d', '--output=~/p.png'])
    assert (args.checkpoint, args.data_path, args.output) == ('/home/someone/a.pth', '/home/someone/d',
                                                              '/home/someone/p.png')
    assert visualize.get_args_parser().parse_args(['--logs', '~/r1', '~/r2']).logs == ['/home/someone/r1',
                                                                                      '/home/someone/r2']
    args = compare_loss.get_args_parser().parse_args(['~/a', '~/b', '--plot=~/c.png'])
    assert (args.candidate, args.reference, args.plot) == ('/home/someone/a', '/home/someone/b', '/home/someone/c.png')
    assert main_pretrain.get_args_parser().parse_args(['--data_path=demo']).output_dir == './output_dir'


def test_what_a_linear_probe_cannot_use_is_left_off_with_a_note(capsys):
    """The probe's encoder is frozen: nothing to recompute, and the warning that BatchNorm would
    update twice (the probe head's, outside the blocks) was false."""
    import main_finetune
    args = main_finetune.get_args_parser().parse_args(['--linprobe', '--data_path', 'demo', '--grad_ckpt'])
    main_finetune.fill_recipe(args)
    capsys.readouterr()
    main_finetune.check_args(args)
    assert not args.grad_ckpt
    assert capsys.readouterr().out == 'note: --grad_ckpt saves nothing with --linprobe, whose frozen encoder keeps ' \
        'no activations for a backward pass: left off\n'
    # layer decay scales the encoder's layers, which the probe does not train: it was ignored without a word
    args = main_finetune.get_args_parser().parse_args(['--linprobe', '--data_path', 'demo', '--layer_decay', '0.75'])
    main_finetune.fill_recipe(args)
    capsys.readouterr()
    main_finetune.check_args(args)
    assert args.layer_decay is None and capsys.readouterr().out == \
        'note: --layer_decay does nothing with --linprobe, which trains the head alone: left off\n'
    main_finetune.fill_recipe(main_finetune.get_args_parser().parse_args(['--data_path', 'demo', '--epochs', '1']))
    assert "warning: the recipe's 5 warm-up epochs are more than --epochs 1" in capsys.readouterr().out
    with pytest.raises(UsageError, match='--warmup_epochs 4 does not fit a run of --epochs 1'):
        main_finetune.fill_recipe(main_finetune.get_args_parser().parse_args(
            ['--data_path', 'demo', '--epochs', '1', '--warmup_epochs', '4']))


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path):
    a_file = tmp_path / 'file'
    a_file.write_text('')
    for output_dir in (a_file / 'below', '/proc/self'):  # /proc/self: not writable, even by root
        with pytest.raises(UsageError, match=f'--output_dir {output_dir}: cannot write there'):
            run_pretrain(*TINY, '--max_steps', 1, '--output_dir', output_dir)
    # and as a user sees it: one line, exit 2 (it said 'cannot write there (File exists)')
    result = run_script(sys.executable, 'main_pretrain.py', *TINY, '--output_dir', a_file)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f'error: --output_dir {a_file} is a file: give a folder (a new one is made)']


def test_a_log_dir_that_cannot_be_written_is_one_line(tmp_path):
    """--log_dir (TensorBoard's folder, when it is not --output_dir) is made and tried at start-up."""
    a_file = tmp_path / 'file'
    a_file.write_text('')
    for log_dir in (a_file / 'below', '/proc/self/tb'):
        with pytest.raises(UsageError, match=f'--log_dir {log_dir}: cannot write there'):
            run_pretrain(*TINY, '--max_steps', 1, '--output_dir', tmp_path / 'out', '--log_dir', log_dir)


def image_folder_with_loops(root):
    """train/<a, b>/ with 3 images each; a/loop links back to train/ (one loop), b/x and b/x/y
    link to each other's parents (crossing loops)."""
    for name in ('a', 'b'):
        (root / 'train' / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / 'train' / name / f'{i}.png')
    os.symlink(root / 'train', root / 'train' / 'a' / 'loop')
    (root / 'train' / 'b' / 'x').mkdir()
    os.symlink(root / 'train' / 'b', root / 'train' / 'b' / 'x' / 'up')
    os.symlink(root / 'train' / 'b' / 'x', root / 'train' / 'b' / 'x' / 'here')
    return root


def test_symlink_loops_in_the_data_are_walked_once(tmp_path):
    from util.datasets import build_image_folder
    root = image_folder_with_loops(tmp_path)
    folder = build_image_folder(str(root), 'train', None)
    assert sorted(os.path.relpath(path, root) for path, _ in folder.samples) == \
        [f'train/{c}/{i}.png' for c in 'ab' for i in range(3)]
    # a link to another real folder is still followed (a class folder assembled from links)
    shutil.copytree(root / 'train' / 'b', root / 'elsewhere', ignore=shutil.ignore_patterns('x'))
    os.symlink(root / 'elsewhere', root / 'train' / 'a' / 'more')
    assert len(build_image_folder(str(root), 'train', None).samples) == 9
    # but not to another class's folder, whose images would be of both classes (read twice, with two labels)
    os.symlink(root / 'train' / 'b', root / 'train' / 'c')
    with pytest.raises(UsageError, match=rf'the class folders b and c both hold {root / "train" / "b"} \(through a '
                                         r'link\): its images would be of two classes at once; remove the link'):
        build_image_folder(str(root), 'train', None)


def test_hidden_folders_and_files_are_no_classes_and_no_images_and_loose_images_are_named(tmp_path, capsys):
    """.ipynb_checkpoints (Jupyter) became a class, and inside a class an extra folder of images;
    macOS's ._x.png files became unreadable images. Images straight in train/ beside its class
    folders were left out without a word: a warning counts them."""
    from util.datasets import build_image_folder, image_paths_of
    root = image_folder_with_loops(tmp_path)
    for folder in (root / 'train' / '.ipynb_checkpoints', root / 'train' / 'a' / '.ipynb_checkpoints'):
        folder.mkdir()
        shutil.copy(root / 'train' / 'a' / '0.png', folder / '0-checkpoint.png')
    (root / 'train' / 'b' / '._0.png').write_bytes(b'\x00\x05\x16\x07')  # an AppleDouble file, not a PNG
    for i in range(2):
        shutil.copy(root / 'train' / 'a' / '0.png', root / 'train' / f'loose{i}.png')
    capsys.readouterr()
    folder = build_image_folder(str(root), 'train', None)
    assert folder.classes == ['a', 'b']
    assert sorted(os.path.relpath(path, root) for path, _ in folder.samples) == \
        [f'train/{c}/{i}.png' for c in 'ab' for i in range(3)]
    assert capsys.readouterr().out == (f'warning: 2 images straight in {root / "train"}, beside its class folders, '
                                       f'are in no class and left out: move them into a class folder\n')
    assert len(image_paths_of(str(root / 'train'))) == 8  # the pictures' search: the 6, and the 2 loose ones


def test_files_and_entries_left_out_of_the_classes_are_named(tmp_path, capsys):
    """A JPEG saved as .jfif or without an extension, a class still packed as ImageNet's .tar, a
    dangling link: each was left out without a word. A flat val/ (ImageNet's archive unpacks so) is
    told to take train/'s class folders, not to make one folder for pre-training."""
    from util.datasets import build_image_folder
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for name in ('a/0.png', 'a/photo.jfif', 'a/IMG_1', 'b/0.png', 'val_flat/0.png'):
        (tmp_path / 'data' / 'train' / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / 'data' / 'train' / name, format='PNG')
    (tmp_path / 'data' / 'train' / 'n01484850.tar').write_bytes(b'')
    os.symlink(tmp_path / 'unmounted', tmp_path / 'data' / 'train' / 'ghost')
    os.rename(tmp_path / 'data' / 'train' / 'val_flat', tmp_path / 'data' / 'val')
    capsys.readouterr()
    folder = build_image_folder(str(tmp_path / 'data'), 'train', None)
    assert folder.classes == ['a', 'b'] and len(folder) == 2
    out = capsys.readouterr().out
    assert f'warning: ghost, n01484850.tar in {tmp_path / "data" / "train"} are no class folder and left out' in out
    assert (f'warning: 2 files in the class folders of {tmp_path / "data" / "train"} have no image extension '
            f'(.jpg, ') in out and out.rstrip().endswith('are left out: a/IMG_1, a/photo.jfif')
    with pytest.raises(UsageError, match=r"val': it has no class folders: its images go in .*val/<class>/<image>, in the "
                                         r"class folders of train/ \(ImageNet's validation archive"):
        build_image_folder(str(tmp_path / 'data'), 'val', None)


def test_pre_trainings_pictures_read_train_where_val_has_no_images(small_folder, tmp_path):
    """Pre-training needs no val/: an empty one stopped the run for its pictures' images, even with
    --vis_freq 0 (never), while a run without val/ took train/'s."""
    from util.datasets import image_paths_of
    data = tmp_path / 'data'
    shutil.copytree(os.path.join(small_folder, 'train'), data / 'train')
    (data / 'val' / 'a').mkdir(parents=True)
    paths = image_paths_of(str(data))
    assert len(paths) == 64 and all(os.path.dirname(os.path.dirname(p)) == str(data / 'train') for p in paths)
    # a val/ whose one image is unreadable: the error says what reads it; --vis_freq 0 runs without them
    (data / 'val' / 'a' / 'x.png').write_bytes(b'not a png')
    flags = ['--model', 'mae_vit_tiny', '--device', 'cpu', '--num_workers', 0, '--data_path', data, '--max_steps', 1,
             '--batch_size', 8, '--epochs', 1, '--warmup_epochs', 0]
    with pytest.raises(UsageError, match=r"^no readable image .*; they are read for the pictures of --vis_freq \(0 "
                                         r"turns them off\)$"):
        run_pretrain(*flags, '--output_dir', tmp_path / 'out')
    run_pretrain(*flags, '--vis_freq', 0, '--output_dir', tmp_path / 'out2')
    assert [r['step'] for r in read_jsonl(tmp_path / 'out2' / 'log.jsonl')] == [1]


def folder_with_other_val_classes(small_folder, root):
    shutil.copytree(small_folder, root)
    first = sorted(os.listdir(root / 'val'))[0]
    os.rename(root / 'val' / first, root / 'val' / 'zebra')
    return first


def test_val_classes_that_differ_from_train_are_refused(small_folder, tmp_path):
    renamed = folder_with_other_val_classes(small_folder, tmp_path / 'data')
    with pytest.raises(UsageError, match=rf"\(only in train/: {renamed}; only in val/: zebra\)"):
        run_finetune('--model', 'vit_tiny_patch8', '--input_size', 64, '--device', 'cpu', '--num_workers', 0,
                     '--data_path', tmp_path / 'data', '--epochs', 1, '--warmup_epochs', 0,
                     '--output_dir', tmp_path / 'out')
    # an extra class in val/ alone: that side only (it printed "only in train/: []" too)
    shutil.copytree(small_folder, tmp_path / 'extra')
    shutil.copytree(tmp_path / 'extra' / 'val' / renamed, tmp_path / 'extra' / 'val' / 'zebra')
    with pytest.raises(UsageError, match=r"different class folders \(only in val/: zebra\): the labels"):
        run_finetune('--model', 'vit_tiny_patch8', '--input_size', 64, '--device', 'cpu', '--num_workers', 0,
                     '--data_path', tmp_path / 'extra', '--epochs', 1, '--warmup_epochs', 0,
                     '--output_dir', tmp_path / 'out3')
    with pytest.raises(UsageError, match='--nb_classes 0 is fewer than the 2 class folders'):
        run_finetune('--model', 'vit_tiny_patch8', '--input_size', 64, '--device', 'cpu', '--num_workers', 0,
                     '--data_path', small_folder, '--nb_classes', 0, '--output_dir', tmp_path / 'out2')
    # --eval compares val/ with train/'s class folders by name, without reading train/'s images
    torch.save({'model': create_classifier('vit_tiny_patch8', img_size=64, num_classes=2).state_dict()},
               tmp_path / 'classifier.pth')
    with pytest.raises(UsageError, match=rf"only in train/: {renamed}; only in val/: zebra"):
        run_finetune('--eval', '--resume', tmp_path / 'classifier.pth', '--model', 'vit_tiny_patch8', '--input_size',
                     64, '--device', 'cpu', '--num_workers', 0, '--data_path', tmp_path / 'data')


def test_pictures_skip_unreadable_images_and_read_huge_jpegs(tmp_path, monkeypatch):
    from util.datasets import eval_transform, load_eval_images
    folder = tmp_path / 'images'
    folder.mkdir()
    broken = write_broken_files(folder)
    good = []
    for i in range(3):
        good.append(folder / f'z{i}.jpg')
        ramp = np.add.outer(np.arange(40) * (2 + i), np.arange(48) * 3)[..., None] + np.array([0, 40, 80])
        Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8)).save(good[-1])  # smooth: resampling agrees
    images = load_eval_images(str(folder), 2, 32)
    # 6 sorted files (empty, text, truncated, z0, z1, z2): the picks at 0 and 3 skip the broken ones;
    # the tensor resize differs from Pillow's by rounding (4 of 255 at most: 0.07 normalised)
    expected = torch.stack([eval_transform(32)(Image.open(path).convert('RGB')) for path in good[:2]])
    torch.testing.assert_close(images, expected, atol=0.08, rtol=0)
    with pytest.raises(UsageError, match='no readable image in --data_path'):
        load_eval_images(broken[0], 2, 32)
    expected = eval_transform(32)(Image.open(good[2]).convert('RGB'))
    # a JPEG above Pillow's decompression-bomb limit (lowered here to 1,000 pixels): decoded anyway
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 500)
    torch.testing.assert_close(load_eval_images(str(good[2]), 1, 32)[0], expected, atol=0.08, rtol=0)


def test_files_that_are_not_checkpoints_get_advice_that_holds(tmp_path):
    text = tmp_path / 'notes.pth'
    text.write_text('model: vit_base\n')
    with pytest.raises(UsageError, match='is not a PyTorch checkpoint') as error:
        checkpoint.load(str(text))
    objects = tmp_path / 'objects.pth'
    torch.save({'model': {}, 'run': np.random.default_rng(0)}, objects)
    with pytest.raises(UsageError, match='holds a Python object') as error2:
        checkpoint.load(str(objects))
    for e in (error, error2):
        assert 'weights_only' not in str(e.value)
    # a whole model pickled by torch.save(model): its classes, three named, and the advice
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.LayerNorm(2), torch.nn.GELU())
    torch.save(model, tmp_path / 'model.pth')
    with pytest.raises(UsageError, match=r'holds a whole model saved as an object \(torch\.nn\.modules\.\S+, '
                                         r'\S+, \S+ and 2 more\).*save the weights alone'):  # 5 classes
        checkpoint.load(str(tmp_path / 'model.pth'))
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    # a gzip-compressed checkpoint: gunzip'ed as said, it loads
    with open(tmp_path / 'weights.pth', 'rb') as f, gzip.open(tmp_path / 'weights.pth.gz', 'wb') as packed:
        shutil.copyfileobj(f, packed)
    with pytest.raises(UsageError, match=r"weights\.pth\.gz' is gzip-compressed, not a PyTorch checkpoint: gunzip"):
        checkpoint.load(str(tmp_path / 'weights.pth.gz'))
    (tmp_path / 'unpacked.pth').write_bytes(gzip.decompress((tmp_path / 'weights.pth.gz').read_bytes()))
    assert checkpoint.load(str(tmp_path / 'unpacked.pth')).keys() == model.state_dict().keys()
    # a hosting site's page saved in place of the file it links to
    (tmp_path / 'page.pth').write_text('\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n')
    with pytest.raises(UsageError, match='is a web page, not a PyTorch checkpoint: download the file that the page'):
        checkpoint.load(str(tmp_path / 'page.pth'))
    # an empty file: a download cut short (it said: starts with b'')
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(UsageError, match=r"empty.pth' is empty \(0 bytes\): a copy or download cut short"):
        checkpoint.load(str(tmp_path / 'empty.pth'))
    # a pickle of Python's own (protocol 4; a detectron2-style .pkl): torch's warning about the protocol,
    # then advice on a file cut short
    with open(tmp_path / 'plain.pkl', 'wb') as f:
        pickle.dump({'model': {'w': np.zeros(2)}}, f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(UsageError, match=r"plain.pkl' is a pickle \(protocol 4\) that torch.save did not write"):
            checkpoint.load(str(tmp_path / 'plain.pkl'))
    # zip archives torch.save did not write: what they are (it said "cut short?", after torch's TorchScript warning)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # TorchScript is deprecated; its files are still about
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / 'scripted.pt')
    np.savez(tmp_path / 'jax.npz', **{'Transformer/encoder_norm/scale': np.ones(2)})
    with zipfile.ZipFile(tmp_path / 'bundle.zip', 'w') as bundle:
        bundle.writestr('weights/model.pth', b'')
    for name, what in (('scripted.pt', r"is a TorchScript model \(torch.jit.save\), not a checkpoint of weights: save"),
                       ('jax.npz', r"is a NumPy archive \(.npz: JAX or TensorFlow weights, say\), not a PyTorch"),
                       ('bundle.zip', r"is a zip archive without the data.pkl of a PyTorch checkpoint")):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            with pytest.raises(UsageError, match=f"{name}' {what}"):
                checkpoint.load(str(tmp_path / name))
    torch.save({'w': torch.zeros(2)}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)  # protocol 2
    assert checkpoint.load(str(tmp_path / 'legacy.pth'))['w'].shape == (2,)


def test_pretraining_on_another_models_checkpoint_does_not_offer_finetune(tmp_path):
    run_pretrain(*TINY, '--max_steps', 1, '--batch_size', 8, '--epochs', 1, '--warmup_epochs', 0,
                 '--output_dir', tmp_path)
    with pytest.raises(UsageError) as error:
        run_pretrain(*TINY[:1], 'maskfeat_vit_tiny', *TINY[2:], '--max_steps', 2, '--batch_size', 8, '--epochs', 1,
                     '--warmup_epochs', 0, '--output_dir', tmp_path)
    assert '--model mae_vit_tiny' in str(error.value) and '--finetune' not in str(error.value)
    with pytest.raises(UsageError) as error:  # the same model at another size: its position table does not fit
        run_pretrain(*TINY, '--input_size', 40, '--max_steps', 2, '--batch_size', 8, '--epochs', 1,
                     '--warmup_epochs', 0, '--output_dir', tmp_path)
    assert 'does not fit this model: size mismatch for pos_embed' in str(error.value)
    # the run's size named (it said 'the flags it was written with' alone)
    assert str(error.value).endswith('; resume it with the flags it was written with (--input_size 64), or start a '
                                     'new run in another --output_dir (or remove its checkpoint-last.pth)')
    with pytest.raises(UsageError) as error:  # given by hand: the advice is about --resume, not the folder
        run_pretrain(*TINY, '--input_size', 40, '--max_steps', 2, '--batch_size', 8, '--epochs', 1,
                     '--warmup_epochs', 0, '--resume', tmp_path / checkpoint.LAST, '--output_dir', tmp_path / 'other')
    assert str(error.value).endswith('; resume it with the flags it was written with (--input_size 64), or resume '
                                     'another checkpoint (or none) with these flags')



def test_resuming_over_another_number_of_images_says_so(tmp_path, small_folder, capsys):
    """A copy of the data cut short (or another split) resumes, with a warning: the checkpoint records the
    size of the data set it trained on (the demo's 10 classes x 200 images)."""
    flags = ['--batch_size', 8, '--epochs', 2, '--warmup_epochs', 0, '--output_dir', tmp_path, *TINY[:-1]]
    run_pretrain(*flags, 'demo', '--max_steps', 1)
    assert checkpoint.load(str(tmp_path / checkpoint.LAST))['args']['train_images'] == 2000
    capsys.readouterr()
    run_pretrain(*flags, small_folder, '--max_steps', 2)
    assert (f'warning: {tmp_path / checkpoint.LAST} was written by a run over 2,000 training images, and --data_path '
            f'now holds 64: the epochs change length (is it the same data set, copied whole?)') in capsys.readouterr().out
    # a fresh run where an earlier one left its logs but no checkpoint: its lines go after theirs, said
    os.remove(tmp_path / checkpoint.LAST)
    run_pretrain(*flags, small_folder, '--max_steps', 1)
    assert (f'warning: {tmp_path} holds the log.jsonl and log.txt of an earlier run, and no checkpoint to resume: this '
            f'run appends its own lines after them (another --output_dir keeps runs apart)') in capsys.readouterr().out


def test_weights_that_name_no_model_and_fit_not_the_default_say_so(tmp_path):
    """timm's hub weights (a bare safetensors state) name no model: fine-tuning them without --model
    builds the default classifier, and the mismatch says to give --model."""
    from safetensors.torch import save_file
    encoder = create_classifier('vit_tiny_patch8', img_size=64, num_classes=0).state_dict()
    save_file(encoder, tmp_path / 'model.safetensors')
    flags = ['--finetune', tmp_path / 'model.safetensors', '--input_size', 64, '--device', 'cpu', '--num_workers', 0,
             '--data_path', 'demo', '--max_steps', 1, '--epochs', 1, '--warmup_epochs', 0]
    with pytest.raises(UsageError, match=r"does not fit this model: shapes \[.*\(192,\) vs \(768,\).*; the checkpoint "
                                         r"names no model timm knows, so it was built as vit_base_patch16 \(the default\): "
                                         r"give the --model its weights are of$"):
        run_finetune(*flags, '--output_dir', tmp_path / 'default')
    with pytest.raises(UsageError, match=r'vs \(384,\)[^;]*$'):  # a --model given: no such advice
        run_finetune(*flags, '--model', 'vit_small_patch16_224', '--output_dir', tmp_path / 'small')
    # nor where nothing was read (a folder given as --finetune)
    with pytest.raises(UsageError, match=r"is a folder: give the \.pth file in it$"):
        run_finetune('--finetune', tmp_path, *flags[2:], '--output_dir', tmp_path / 'folder')
    # --eval of a classifier's bare weights, alike
    torch.save(create_classifier('vit_tiny_patch8', img_size=64, num_classes=10).state_dict(), tmp_path / 'bare.pth')
    with pytest.raises(UsageError, match=r"does not fit this model: .*; the checkpoint names no model timm knows, so it "
                                         r"was built as vit_base_patch16 \(the default\): give the --model its"):
        run_finetune('--eval', '--resume', tmp_path / 'bare.pth', *flags[2:], '--output_dir', '')


def test_eval_of_a_missing_checkpoint_says_so_before_building_a_model(tmp_path, capsys):
    """It built the default vit_base_patch16 (86 M parameters, seconds on a CPU) and printed its size first."""
    with pytest.raises(UsageError, match=r"^checkpoint '\S+missing.pth' does not exist$"):
        run_finetune('--eval', '--resume', tmp_path / 'missing.pth', '--device', 'cpu', '--data_path', 'demo',
                     '--output_dir', '')
    assert 'parameters' not in capsys.readouterr().out


def test_eval_takes_the_model_its_checkpoint_records(demo_finetuning, demo_root, capsys, tmp_path):
    """--eval builds the classifier the checkpoint records: its --model, its --input_size (32 here, where
    vit_tiny_patch8 is built for 64), and a linear probe's head and cls-token pooling."""
    _, finetuned = demo_finetuning
    # an evaluation writes nothing: any --output_dir (it locked the folder: a read-only one was refused)
    (tmp_path / 'file').write_text('')
    stats = run_finetune('--eval', '--resume', finetuned / checkpoint.LAST, '--device', 'cpu',
                         '--num_workers', 0, '--data_path', 'demo', '--output_dir', tmp_path / 'file' / 'unwritable')
    assert os.listdir(tmp_path) == ['file']
    out = capsys.readouterr().out
    assert 'model vit_tiny_patch8:' in out
    assert stats['acc1'] == read_jsonl(finetuned / 'log.txt')[-1]['test_acc1']  # as the run's own evaluation
    # its printed arguments are those an evaluation reads, not the training recipe it fills (DeiT's 300 epochs)
    printed = json.loads(out[out.index('\n{\n') + 1:out.index('\n}\n') + 2])
    assert {'model', 'input_size', 'batch_size', 'resume', 'data_path', 'global_pool'} <= set(printed)
    assert not {'epochs', 'blr', 'warmup_epochs', 'mixup', 'aa', 'drop_path', 'max_steps', 'accum_iter'} & set(printed)
    # a copy of the validation set alone (no train/) evaluates alike: --eval reads val/ only
    shutil.copytree(os.path.join(demo_root, 'val'), tmp_path / 'val_only' / 'val')
    assert run_finetune('--eval', '--resume', finetuned / checkpoint.LAST, '--device', 'cpu', '--num_workers', 0,
                        '--data_path', tmp_path / 'val_only', '--output_dir', '')['acc1'] == stats['acc1']
    # a checkpoint of timm's train.py, written by its CheckpointSaver: its input size is (channels, height, width)
    from timm.utils import CheckpointSaver
    classifier = create_classifier('vit_tiny_patch8', img_size=32, num_classes=10)
    classifier.load_state_dict(checkpoint.load(finetuned / checkpoint.LAST)['model'])
    timm_args = argparse.Namespace(model='vit_tiny_patch8', input_size=[3, 32, 32], img_size=None, num_classes=10)
    (tmp_path / 'timm').mkdir()
    CheckpointSaver(classifier, torch.optim.SGD(classifier.parameters(), lr=0.1), args=timm_args,
                    checkpoint_dir=str(tmp_path / 'timm')).save_checkpoint(0, 1.0)
    assert run_finetune('--eval', '--resume', tmp_path / 'timm' / 'last.pth.tar', '--device', 'cpu', '--num_workers', 0,
                        '--data_path', 'demo', '--output_dir', '')['acc1'] == stats['acc1']
    assert checkpoint.saved_args({'arch': 'visiontransformer'}) == {}  # the class's name where it had no args
    assert checkpoint.saved_args({'arch': 'vit_tiny_patch8'}) == {'model': 'vit_tiny_patch8'}
    # synthetic images have no folders: their val split's classes are the training ones (was "has no val/ folder")
    torch.save({'model': create_classifier('vit_tiny_patch8', img_size=32, num_classes=1000).state_dict(),
                'args': {'model': 'vit_tiny_patch8', 'input_size': 32, 'finetune': ''}}, tmp_path / 'imagenet.pth')
    assert run_finetune('--eval', '--resume', tmp_path / 'imagenet.pth', '--device', 'cpu', '--num_workers', 0,
                        '--data_path', 'synthetic:64', '--output_dir', '')['images'] == 2  # 64 x 50,000 / 1,281,167
    with pytest.raises(UsageError, match=re.escape('; it was trained with --input_size 32: evaluate it so (leave '
                                                   'these flags out and the checkpoint gives them)')):
        run_finetune('--eval', '--resume', finetuned / checkpoint.LAST, '--input_size', 64, '--device', 'cpu',
                     '--data_path', 'demo', '--output_dir', '')
    # so for every family: a Swin's relative position tables were resampled to 128 px and measured without a word
    torch.save({'model': create_classifier('swin_tiny_patch4_window4_64', num_classes=10).state_dict(),
                'args': {'model': 'swin_tiny_patch4_window4_64', 'input_size': 64, 'finetune': ''}},
               tmp_path / 'swin.pth')
    with pytest.raises(UsageError, match=re.escape(f'{tmp_path / "swin.pth"} is measured at the size it was trained '
                                                   f'at; it was trained with --input_size 64: evaluate it so')):
        run_finetune('--eval', '--resume', tmp_path / 'swin.pth', '--input_size', 128, '--device', 'cpu',
                     '--data_path', 'demo', '--output_dir', '')
    import main_finetune
    probe = create_classifier('vit_tiny_patch8', img_size=32, num_classes=10, global_pool='token')
    main_finetune.add_probe_head(probe)
    torch.save({'model': probe.state_dict(), 'args': {'model': 'vit_tiny_patch8', 'input_size': 32,
                                                      'global_pool': False, 'linprobe': True}}, tmp_path / 'probe.pth')
    stats = run_finetune('--eval', '--resume', tmp_path / 'probe.pth', '--device', 'cpu', '--num_workers', 0,
                         '--data_path', 'demo', '--output_dir', '')
    assert 0 <= stats['acc1'] <= 100
    # a head of more outputs than the data's classes (--nb_classes 20 on the demo's 10) is built as recorded
    torch.save({'model': create_classifier('vit_tiny_patch8', img_size=32, num_classes=20).state_dict(),
                'args': {'model': 'vit_tiny_patch8', 'input_size': 32, 'nb_classes': 20}}, tmp_path / 'twenty.pth')
    run_finetune('--eval', '--resume', tmp_path / 'twenty.pth', '--device', 'cpu', '--num_workers', 0,
                 '--data_path', 'demo', '--output_dir', '')
    # --eval trains nothing: the model line counts no trained parameters
    assert re.search(r'^model vit_tiny_patch8: [0-9.]+ M parameters, 20 classes$', capsys.readouterr().out, re.M)
    # a model with a supervised recipe of its own: an evaluation names no recipe (it said "with the supervised
    # recipe published for hivit_tiny_patch8_64")
    torch.save({'model': create_classifier('hivit_tiny_patch8_64', num_classes=1000).state_dict(),
                'args': {'model': 'hivit_tiny_patch8_64', 'finetune': ''}}, tmp_path / 'hivit.pth')
    run_finetune('--eval', '--resume', tmp_path / 'hivit.pth', '--device', 'cpu', '--num_workers', 0,
                 '--data_path', 'synthetic:64', '--output_dir', '')
    assert re.search(r'^mode: evaluation$', capsys.readouterr().out, re.M)
    pretrained = demo_finetuning[0] / checkpoint.LAST  # a pre-training run's: nothing to evaluate yet
    with pytest.raises(UsageError, match=re.escape(f"{str(pretrained)!r} is a pre-training checkpoint (mae_vit_tiny) "
                                                   f"and --eval measures a classifier: fine-tune it first")):
        run_finetune('--eval', '--resume', pretrained, '--device', 'cpu', '--data_path', 'demo', '--output_dir', '')


def test_help_names_the_script_the_models_and_every_default():
    import main_pretrain
    result = run_script(sys.executable, 'main_finetune.py', '--help')
    assert result.returncode == 0 and result.stdout.startswith('usage: main_finetune.py [-h]')
    pretrain_help = main_pretrain.get_args_parser().format_help()
    for text in (result.stdout, pretrain_help):
        words = ' '.join(text.split())
        assert 'None' not in words and '--seed SEED seeds the initial weights' in words
        assert words.count('with --finetune') <= 1  # the recipe clause said once, not after every recipe flag
    words = ' '.join(pretrain_help.split())
    from util.registry import pretrain_model_names
    assert all(name in words for name in pretrain_model_names())
    assert 'MAE: mae_vit_base_patch16,' in words and 'HiViT: mae_hivit_base_dec512d6b' in words
    assert 'HiViT: hivit_base, hivit_base_mmpretrain, hivit_large' in ' '.join(result.stdout.split())
    # every tool's usage line names its script (argparse's first argument is the program, not a title),
    # and every flag with a default says it (argparse adds it to --flag/--no-flag pairs by itself)
    import benchmark, compare_loss, export, visualize
    import main_finetune
    for tool in (benchmark, compare_loss, export, visualize, main_pretrain, main_finetune):
        parser = tool.get_args_parser()
        assert parser.prog in (os.path.basename(sys.argv[0]), f'{tool.__name__}.py'), tool.__name__
        for action in parser._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                continue
            default = ' '.join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
                else str(action.default)
            assert 'default' in action.help.lower() or default in action.help, (tool.__name__, action.option_strings)


def raise_error(error):
    raise error


def test_out_of_memory_and_a_full_disk_are_one_line_that_says_what_to_do(capsys):
    """A batch or an image size too large for the device: one line with torch's figure, exit 2. A
    pebibyte, which no allocator grants, stands for the CPU's refusal; CUDA's and a data-loader
    worker's (re-raised by the loader with the worker's traceback) are torch's texts of them."""
    advice = ('lower --batch_size (with --accum_iter the effective batch, and so the lr, stays as it was), lower '
              'the image size, or add --grad_ckpt\n')
    cuda = torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of '
                                  '79.19 GiB of which 1.06 GiB is free.')
    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                          "last):\n  File \"x.py\", line 1, in f\nRuntimeError: [enforce fail at alloc_cpu.cpp:127] "
                          "DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes.")
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}  # run_cli catches them
    try:
        for run, size in [(lambda: torch.empty(2 ** 50, dtype=torch.uint8), '1048576.00 GiB'),
                          (lambda: raise_error(cuda), '2.00 GiB'), (lambda: raise_error(worker), '3.00 GiB')]:
            with pytest.raises(SystemExit) as ended:
                run_cli(run)
            assert ended.value.code == 2
            assert capsys.readouterr().err == f'error: out of memory allocating {size}: {advice}'
        with pytest.raises(RuntimeError, match='a bug'):  # any other error keeps its traceback
            run_cli(raise_error, RuntimeError('a bug'))
        # a full disk (Linux's /dev/full refuses every write so) or a used-up quota: one line, exit 2
        def write_to_full_disk():
            with open('/dev/full', 'w') as f:
                f.write('{"loss": 0.5}\n')
        quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), 'out/log.jsonl')
        for run, where in [(write_to_full_disk, ''), (lambda: raise_error(quota), ' writing out/log.jsonl')]:
            with pytest.raises(SystemExit) as ended:
                run_cli(run)
            assert ended.value.code == 2
            strerror = os.strerror(errno.ENOSPC if run is write_to_full_disk else errno.EDQUOT)
            assert capsys.readouterr().err == (
                f'error: {strerror}{where}: free disk space or write elsewhere (another --output_dir); the checkpoints '
                f'already written are whole, each written to a temporary file and then renamed\n')
        with pytest.raises(FileNotFoundError):  # another OSError keeps its traceback
            run_cli(open, '/nonexistent/file')
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_the_closing_lines_quote_the_tensorboard_command(capsys):
    """A folder with a space: the printed command, pasted into a shell, opened two folders."""
    import shlex
    from util.launch import print_outputs
    print_outputs(argparse.Namespace(output_dir='runs/my run', log_dir='runs/my run'), None, 1.0)
    command = capsys.readouterr().out.split('TensorBoard: ', 1)[1].strip()
    assert shlex.split(command) == ['tensorboard', '--logdir', 'runs/my run']
    # a folder named -x: tensorboard took it for an option ("argument --logdir: expected one argument")
    print_outputs(argparse.Namespace(output_dir='-runs', log_dir='-runs'), None, 1.0)
    command = capsys.readouterr().out.split('TensorBoard: ', 1)[1].strip()
    assert shlex.split(command) == ['tensorboard', '--logdir', './-runs']


def test_a_closing_throughput_of_one_logged_interval_says_it_holds_the_start_up(small_folder, tmp_path, capsys):
    """The first interval (workers, compilation) is left out of the steady-state figure; a run that
    logged one only printed it as steady-state (0.9 images/s for a compiled run of 85)."""
    from util.engine import Throughput
    from util.launch import print_outputs
    throughput = Throughput()
    throughput.add(10, 5.0)  # the start-up's interval: 2 images/s
    stats = {'loss': 1.5, 'complete': False}
    print_outputs(argparse.Namespace(output_dir=''), {**stats, 'ips': throughput.steady_state,
                                                      'ips_holds_start_up': throughput.holds_start_up}, 1.0)
    assert ('throughput: 2.0 images/s over the one logged interval, start-up included (log more steps than '
            '--log_freq for a steady-state figure); mean loss of the last epoch (unfinished) 1.5000'
            in capsys.readouterr().out)
    throughput.add(100, 1.0)
    throughput.add(300, 2.0)
    print_outputs(argparse.Namespace(output_dir=''), {**stats, 'complete': True, 'ips': throughput.steady_state,
                                                      'ips_holds_start_up': throughput.holds_start_up}, 1.0)
    assert 'steady-state throughput: 133.3 images/s; mean loss of the last epoch 1.5000' in capsys.readouterr().out
    # as the loop reports it: one step, logged once
    run_pretrain(*TINY[:-2], '--data_path', small_folder, '--batch_size', 16, '--max_steps', 1,
                 '--output_dir', tmp_path)
    assert 'over the one logged interval, start-up included' in capsys.readouterr().out


def test_a_ddp_training_checkpoint_resumes(small_folder, tmp_path):
    """A training checkpoint whose weights carry DDP's `module.` prefix (saved from the wrapper)
    resumed as --finetune, --eval and the tools read it; training's --resume refused it."""
    flags = [*TINY[:-2], '--data_path', small_folder, '--batch_size', 16, '--epochs', 2, '--warmup_epochs', 0,
             '--max_steps', 1]
    run_pretrain(*flags, '--output_dir', tmp_path / 'a')
    ckpt = checkpoint.load(tmp_path / 'a' / checkpoint.LAST)
    ckpt['model'] = {f'module.{k}': v for k, v in ckpt['model'].items()}
    torch.save(ckpt, tmp_path / 'ddp.pth')
    run_pretrain(*flags, '--resume', tmp_path / 'ddp.pth', '--output_dir', tmp_path / 'b')
    assert read_jsonl(tmp_path / 'b' / 'log.jsonl')[0]['step'] == 2  # went on from the checkpoint's step 1


@pytest.mark.parametrize('env, message', [
    ({'LOCAL_RANK': 'abc'}, "LOCAL_RANK must be a whole number 0 or more, got 'abc'"),  # was int()'s ValueError
    ({'WORLD_SIZE': '2', 'RANK': '0'}, 'WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT are not both set'),
    # under srun, named as SLURM's (was int()'s ValueError on an empty SLURM_NTASKS)
    ({'SLURM_PROCID': '0', 'SLURM_NTASKS': ''}, r"^the environment variable SLURM_NTASKS must be a whole number 0 or "
                                                r"more, got '' \(srun sets it\)$"),
])
def test_process_variables_set_by_hand_are_checked(env, message, monkeypatch):
    """Without MASTER_ADDR, torch's rendezvous failed with a traceback."""
    from util import dist
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'SLURM_NTASKS',
                 'SLURM_LOCALID'):
        monkeypatch.setenv(name, 'placeholder')  # recorded, so that what read_world_from_env writes is undone
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        dist.init_process_group(dist.read_world_from_env(), device=None)  # refused before the device is asked


def test_a_master_port_in_use_is_one_line(monkeypatch):
    """Rank 0 of processes started by hand serves the rendezvous at MASTER_PORT: one taken gave torch's
    DistNetworkError traceback (EADDRINUSE)."""
    import socket

    from util import dist
    from util.device import resolve_device
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name, value in {'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1',
                            'MASTER_PORT': str(port)}.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(UsageError, match=f'^MASTER_PORT {port} is in use on this machine \\(by another run, or '
                                             f'another program\\): give every process of the run another MASTER_PORT$'):
            dist.init_process_group(dist.read_world_from_env(), resolve_device('cpu', 0))
    assert not torch.distributed.is_initialized()
