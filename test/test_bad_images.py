"""Data sets with broken and unusual files: every image mode is converted to RGB, an unreadable
training image is replaced deterministically, reported once and counted, too many of them stop
the run with one line, an unreadable validation image is an error, and empty folders are refused."""
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import read_jsonl, run_pretrain, run_script, write_broken_files
from util.datasets import SeededSamples, build_image_folder, pretrain_transform
from util.errors import UsageError
from util.images import BadImages, UnreadableImage, load_rgb

CPU = ['--num_workers', 0, '--device', 'cpu']


@pytest.fixture
def broken_folder(small_folder, tmp_path):
    """small_folder (2 classes x 32 training images, 9 + 8 validation) with three of the first
    training class's images replaced by broken files: 64 images, every one read in each epoch of
    batches of 16."""
    root = tmp_path / 'data'
    shutil.copytree(small_folder, root)
    first_class = root / 'train' / sorted(os.listdir(root / 'train'))[0]
    for name in sorted(os.listdir(first_class))[:3]:
        (first_class / name).unlink()
    return root, write_broken_files(first_class)


def test_every_image_mode_becomes_8_bit_rgb(tmp_path):
    """16-bit grayscale keeps its top 8 bits (0x1234 -> 0x12); floating point (a 32-bit TIFF) in 0-1 is
    scaled to 0-255 (0.5 -> 128: it was black), above 1 taken as 0-255; the other modes through Pillow."""
    sixteen = np.full((4, 4), 0x1234, np.uint16)
    Image.fromarray(sixteen).save(tmp_path / 'sixteen.png')
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / 'unit_float.tif')
    Image.fromarray(np.full((4, 4), 99.6, np.float32)).save(tmp_path / 'byte_float.tif')
    rgba = Image.new('RGBA', (4, 4), (10, 20, 30, 0))
    images = {'gray.png': Image.new('L', (4, 4), 77), 'cmyk.jpg': Image.new('CMYK', (4, 4), (0, 255, 0, 0)),
              'palette.png': Image.new('RGB', (4, 4), (200, 100, 50)).convert('P', palette=Image.Palette.ADAPTIVE), 'rgba.png': rgba,
              'gray_alpha.png': Image.new('LA', (4, 4), (90, 255))}
    for name, img in images.items():
        img.save(tmp_path / name)
    expected = {'sixteen.png': (0x12,) * 3, 'unit_float.tif': (128,) * 3, 'byte_float.tif': (100,) * 3,
                'gray.png': (77,) * 3, 'palette.png': (200, 100, 50),
                'rgba.png': (10, 20, 30), 'gray_alpha.png': (90,) * 3}
    for name, pixel in expected.items():
        img = load_rgb(str(tmp_path / name))
        assert img.mode == 'RGB' and img.getpixel((1, 1)) == pixel, name
    cmyk = load_rgb(str(tmp_path / 'cmyk.jpg'))  # magenta, through JPEG's lossy coding
    assert cmyk.mode == 'RGB' and cmyk.getpixel((1, 1))[1] < 40 and min(cmyk.getpixel((1, 1))[::2]) > 200


def test_broken_files_raise_unreadable_image(tmp_path):
    for path in write_broken_files(tmp_path):
        with open(path, 'rb') as f:
            read_by_a_worker = f.read()
        for data in (None, read_by_a_worker):
            with pytest.raises(UnreadableImage) as error:
                load_rgb(path, data)
            assert error.value.path == path
            # the path once: not again inside Pillow's name of the file object it read
            assert str(error.value).count(os.path.basename(path)) == 1 and '<_io.' not in str(error.value)


def test_a_bad_sample_is_replaced_by_the_same_sample_every_time(broken_folder, tmp_path):
    """The replacement depends on (seed, epoch, index) only, and the augmentation is the one of the
    sample it replaces; each replacement is recorded for the training process."""
    root, broken = broken_folder
    folder = build_image_folder(str(root), 'train', pretrain_transform(64))
    bad_index = next(i for i, (path, _) in enumerate(folder.samples) if path == broken[0])
    record = BadImages(str(tmp_path), rank=0)
    samples = SeededSamples(folder, seed=3, bad_images=record)
    first, again = samples[(bad_index, 5)], samples[(bad_index, 5)]
    assert torch.equal(first[0], again[0]) and first[1] == again[1]
    assert record.poll() == 2 and list(record.files) == [broken[0]]
    replacement = samples[(bad_index, 6)][0]
    assert not torch.equal(replacement, first[0])  # another epoch, another draw


def test_without_an_output_folder_the_record_is_a_temporary_folder_made_by_the_first_bad_image(tmp_path,
                                                                                             monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    record = BadImages.of_run('', rank=1)
    assert record.poll() == 0 and os.listdir(tmp_path) == []  # all readable so far: nothing left behind
    record.record(UnreadableImage('/data/a.jpg', 'truncated'))
    [folder] = os.listdir(tmp_path)
    assert folder.startswith('bad-images-') and os.listdir(tmp_path / folder) == ['bad_images.rank1.txt']
    assert record.poll() == 1 and record.files == {'/data/a.jpg': 'truncated'}


def test_names_that_are_not_utf8_or_hold_line_breaks_are_recorded_once_each(tmp_path, capsys):
    """A file name of bytes that are not UTF-8 (os.listdir gives them as surrogates) broke the
    record's write with a UnicodeEncodeError traceback; one with a line break counted as two
    replacements of two files that do not exist."""
    record = BadImages(str(tmp_path), rank=0)
    record.record(UnreadableImage(os.fsdecode(b'/data/bad\xff.jpg'), 'cannot identify image file'))
    record.record(UnreadableImage('/data/new\nline\tand tab.jpg', 'truncated'))
    assert record.poll() == 2
    assert record.files == {'/data/bad\\udcff.jpg': 'cannot identify image file',
                            '/data/new\\nline\\tand tab.jpg': 'truncated'}
    assert capsys.readouterr().out.count('warning: unreadable image replaced') == 2


def test_another_rank_names_its_own_bad_images_and_a_rank_without_any_says_so(tmp_path, monkeypatch, capsys):
    """print() is rank 0's alone once the processes meet: rank 1's bad images were counted in the
    log, but never named on the console; and rank 0's stop past --max_bad_images listed no file and
    pointed at a record it never wrote."""
    import builtins
    from util import dist
    monkeypatch.setenv('RANK', '1')
    monkeypatch.setattr(builtins, 'print', builtins.print)  # restored after the silencing below
    dist.print_only_on_main_process(False)
    record = BadImages(str(tmp_path), rank=1)
    record.record(UnreadableImage('/data/a.jpg', 'truncated'))
    assert record.poll() == 1
    assert capsys.readouterr().out == 'warning: rank 1: unreadable image replaced by another sample: /data/a.jpg ' \
        '(truncated)\n'
    with pytest.raises(UsageError, match=rf'^3 unreadable images were replaced, more than --max_bad_images 2: none by '
                                         rf'this process \(the others list theirs in {tmp_path}/bad_images.rank<R>.txt\);'):
        BadImages(str(tmp_path), rank=0).check(3, 2)


def test_training_replaces_reports_and_counts_bad_images(broken_folder, tmp_path, capsys):
    """The k-NN monitor's bank (all 64 train/ images after each epoch) replaces them too, without
    counting them again: it stopped the run that the training kept going."""
    root, broken = broken_folder
    run_pretrain('--model', 'mae_vit_tiny', '--data_path', root, '--batch_size', 16, '--epochs', 2, '--log_freq', 1,
                 '--warmup_epochs', 0, '--knn_freq', 1, *CPU, '--output_dir', tmp_path)
    out = capsys.readouterr().out
    for path in broken:  # each file once, though every epoch meets it
        assert out.count(f'warning: unreadable image replaced by another sample: {path}') == 1
    steps = read_jsonl(tmp_path / 'log.jsonl')
    assert [s['epoch'] for s in steps if 'knn_acc1' in s] == [0, 1]
    trained = [s for s in steps if 'loss' in s]
    assert trained[-1]['bad_images'] == 2 * len(broken)  # two epochs, every sample read once in each
    assert 'unreadable images replaced by other samples in this process: 6 (3 files' in out
    assert len(re.findall(r'k-NN accuracy .*\(k=20; 64 training images', out)) == 2  # the bank: none left out


def test_past_max_bad_images_the_run_stops_naming_the_files(broken_folder, tmp_path):
    root, broken = broken_folder
    result = run_script(sys.executable, 'main_pretrain.py', '--model', 'mae_vit_tiny', '--data_path', root,
                        '--batch_size', 16, '--epochs', 1, '--log_freq', 1, '--max_bad_images', 2, '--num_workers', 1,
                        '--device', 'cpu', '--output_dir', tmp_path)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: 3 unreadable images were replaced, more than --max_bad_images 2')
    assert all(path in last_line for path in broken)


def test_an_unreadable_validation_image_is_an_error_naming_it(small_folder, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(small_folder, root)
    val_class = root / 'val' / sorted(os.listdir(root / 'val'))[1]
    broken = write_broken_files(val_class)[1]
    # in a data-loader worker (the evaluation after the step): the worker's error comes back as one line
    result = run_script(sys.executable, 'main_finetune.py', '--model', 'vit_tiny_patch8', '--data_path', root,
                        '--batch_size', 8, '--epochs', 1, '--max_steps', 1, '--num_workers', 1, '--device', 'cpu',
                        '--output_dir', tmp_path / 'out')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f'error: unreadable image {broken}') and 'over another set of images' in last_line


def test_empty_folders_are_clear_errors(small_folder, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(small_folder, root)
    (root / 'train' / 'empty_class').mkdir()
    with pytest.raises(UsageError, match='found no valid image in the class folder.s. empty_class'):
        build_image_folder(str(root), 'train', None)
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    flat = tmp_path / 'flat'  # unlabelled images straight in train/
    shutil.copytree(next((root / 'train').iterdir()), flat / 'train')
    for data in (empty, flat):
        with pytest.raises(UsageError, match=re.escape(
                f"cannot read the train images under '{data / 'train'}': it has no class folders: images go in "
                f"{data / 'train' / '<class>'}/<image> (for pre-training, one folder, say {data / 'train' / 'all'}/, "
                f"is enough)")):
            build_image_folder(str(data), 'train', None)
