"""The demo data set, the per-sample seeding of augmentation and masks, checkpoints on disk,
and the model lookup."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import NO_SPACE, REPO, disk_full
from util import checkpoint, demo_data
from util.datasets import EpochSampler, SeededSamples, build_image_folder, pretrain_transform
from util.errors import UsageError
from util.masking import UniformNoise
from util.registry import create_pretrain_model


def test_demo_set_layout(demo_root):
    for split, per_class in demo_data.SPLITS.items():
        class_dirs = sorted(os.listdir(os.path.join(demo_root, split)))
        assert len(class_dirs) == len(demo_data.CLASSES) >= 10
        for class_dir in class_dirs:
            assert len(os.listdir(os.path.join(demo_root, split, class_dir))) == per_class
    image = Image.open(os.path.join(demo_root, 'train', class_dirs[0], '0000.png'))
    assert image.size == (64, 64) and image.mode == 'RGB'


def test_demo_images_are_deterministic_and_varied(demo_root):
    on_disk = np.asarray(Image.open(os.path.join(demo_root, 'val', '03_ring', '0007.png')))
    np.testing.assert_array_equal(on_disk, demo_data.render_image(3, seed=[demo_data.VERSION, 1, 3, 7]))
    # two images of one class differ (colour, place, size), and every class draws a shape
    assert not np.array_equal(demo_data.render_image(0, seed=[0]), demo_data.render_image(0, seed=[1]))
    for c in range(len(demo_data.CLASSES)):
        rng = np.random.default_rng(c)
        alpha = demo_data._draw_shape(demo_data.CLASSES[c], rng)
        assert 0.02 < alpha.mean() < 0.6, demo_data.CLASSES[c]


def test_demo_shapes_are_lighter_than_their_background():
    """Every class: the shape's pixels are light in all channels, the background's dark in all
    channels, so the contrast that outlines a shape has the same sign in every image."""
    for c in range(len(demo_data.CLASSES)):
        for i in range(5):
            image = demo_data.render_image(c, seed=[c, i]).astype(int)
            light = (image >= 140).all(-1).mean()
            dark = (image <= 135).all(-1).mean()
            assert 0.02 < light < 0.6 and light + dark > 0.9, (demo_data.CLASSES[c], i, light, dark)


def test_demo_generation_is_safe_to_race(tmp_path):
    """Two processes generating into the same place at once both end with a complete set."""
    code = (f'import sys; sys.path.insert(0, {REPO!r}); from util.demo_data import ensure_demo_dataset; '
            f'print(ensure_demo_dataset({str(tmp_path / "demo")!r}))')
    umask = os.umask(0o022)  # the processes inherit it: the usual one, under which others may read
    try:
        procs = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    finally:
        os.umask(umask)
    outputs = [p.communicate(timeout=120)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(tmp_path / 'demo')] * 2
    assert sorted(os.listdir(tmp_path)) == ['demo']  # no temporary directory left behind
    # the mode mkdir gives under that umask (mkdtemp's 0700 would hide a shared $MIM_DEMO_DIR from other users)
    assert (tmp_path / 'demo').stat().st_mode & 0o777 == 0o755
    count = sum(len(files) for _, _, files in os.walk(tmp_path / 'demo'))
    assert count == len(demo_data.CLASSES) * sum(demo_data.SPLITS.values())


def test_a_demo_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / 'file'
    a_file.write_text('')
    for root, reason in ((a_file / 'demo', 'File exists'), ('/proc/self/demo', 'No such file or directory')):
        monkeypatch.setenv('MIM_DEMO_DIR', str(root))
        with pytest.raises(UsageError, match=f'^cannot write the demo data set in {root} \\({reason}\\): set '
                                             f'\\$MIM_DEMO_DIR to a folder you can write to$'):
            build_image_folder('demo', 'train', None)
    assert os.listdir(tmp_path) == ['file']


def test_the_demo_folder_is_found_where_the_environment_says(tmp_path, monkeypatch):
    """A `~` in $MIM_DEMO_DIR was left as it is (the set went to ./~/..., then was read from the home folder), an
    empty or relative $XDG_CACHE_HOME put the set in the working directory (the XDG rule ignores it), and so did a
    user without a home folder; a $MIM_DEMO_DIR holding other files failed after generating the whole set."""
    from util.demo_data import VERSION, default_cache_dir, ensure_demo_dataset
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('MIM_DEMO_DIR', '~/demo')
    assert default_cache_dir() == str(tmp_path / 'demo')
    monkeypatch.delenv('MIM_DEMO_DIR')
    for cache_home in ('', 'relative/cache'):
        monkeypatch.setenv('XDG_CACHE_HOME', cache_home)
        assert default_cache_dir() == str(tmp_path / '.cache' / 'masked-image-modeling' / f'demo-v{VERSION}')
    monkeypatch.setattr(os.path, 'expanduser', lambda path: path)  # what it gives where there is no home
    with pytest.raises(UsageError, match=r'^no home folder to keep the demo data set in \(\$HOME is unset, and this '
                                         r'user has none\): set \$MIM_DEMO_DIR to a folder you can write to$'):
        default_cache_dir()
    monkeypatch.undo()
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'notes.txt').write_text('')
    with pytest.raises(UsageError, match='it holds other files, and the set is made as a folder of its own: set '
                                         r'\$MIM_DEMO_DIR to a new or empty folder$'):
        ensure_demo_dataset(str(tmp_path / 'full'))
    assert os.listdir(tmp_path / 'full') == ['notes.txt'] and sorted(os.listdir(tmp_path)) == ['full']


def test_a_folder_named_demo_in_the_working_directory_is_not_the_demo_set_and_says_so(demo_root, tmp_path,
                                                                                        monkeypatch, capsys):
    """--data_path demo trained on the built-in set, without a word, where the user's own ./demo was meant."""
    from util import datasets
    monkeypatch.chdir(tmp_path)
    datasets.warn_of_a_local_demo_folder.cache_clear()
    assert datasets.resolve_data_root('demo') == demo_root
    (tmp_path / 'demo' / 'train' / 'a').mkdir(parents=True)
    datasets.warn_of_a_local_demo_folder.cache_clear()
    for _ in range(2):
        assert datasets.resolve_data_root('demo') == demo_root
    assert capsys.readouterr().out == (f'warning: --data_path demo is the built-in demo set, not the folder '
                                       f'{tmp_path / "demo"} here: give --data_path ./demo for that folder\n')
    assert datasets.resolve_data_root('./demo') == './demo'


def seeded_dataset(demo_root, seed=0):
    folder = build_image_folder('demo', 'train', pretrain_transform(32))
    return SeededSamples(folder, seed, mask_generator=UniformNoise(16))


def test_sample_randomness_depends_on_seed_epoch_and_index_only(demo_root):
    dataset = seeded_dataset(demo_root)
    image, masks = dataset[(5, 2)]
    torch.manual_seed(123)  # the global generator does not matter
    image_again, masks_again = dataset[(5, 2)]
    torch.testing.assert_close(image_again, image, rtol=0, atol=0)
    torch.testing.assert_close(masks_again['noise'], masks['noise'], rtol=0, atol=0)
    image_next_epoch, masks_next_epoch = dataset[(5, 3)]
    assert not torch.equal(image_next_epoch, image) and not torch.equal(masks_next_epoch['noise'], masks['noise'])
    other_seed_image, _ = seeded_dataset(demo_root, seed=1)[(5, 2)]
    assert not torch.equal(other_seed_image, image)
    assert masks['noise'].shape == (16,) and 0 <= masks['noise'].min() and masks['noise'].max() < 1


def test_sampling_leaves_the_process_generators_alone(demo_root):
    dataset = seeded_dataset(demo_root)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    dataset[(0, 0)]
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_epoch_sampler_shards_and_resumes():
    data = list(range(20))
    full = EpochSampler(data, num_replicas=1, rank=0, seed=3)
    full.set_epoch(4)
    order = [i for i, _ in full]
    assert sorted(order) == data and all(epoch == 4 for _, epoch in full)
    # two ranks together see the one-process order, interleaved
    ranks = [EpochSampler(data, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    assert [i for i, _ in ranks[0]] == order[0::2] and [i for i, _ in ranks[1]] == order[1::2]
    # starting part-way skips exactly the first samples of the same order
    full.set_epoch(4, start=6)
    assert [i for i, _ in full] == order[6:] and len(full) == 14
    full.set_epoch(5)
    assert [i for i, _ in full] != order


def test_missing_data_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match='no train/ folder'):
        build_image_folder(str(tmp_path), 'train', None)
    (tmp_path / 'train').mkdir()
    with pytest.raises(UsageError, match='cannot read the train images'):
        build_image_folder(str(tmp_path), 'train', None)
    # the split given for the root: its parent named
    with pytest.raises(UsageError, match=rf"'{tmp_path / 'train'}' has no train/ folder \(it looks like a split itself: "
                                         rf"give its parent, {tmp_path}\)"):
        build_image_folder(str(tmp_path / 'train'), 'train', None)


def test_more_classes_than_class_folders_get_a_note(capsys):
    from util.datasets import number_of_classes
    assert number_of_classes(['a', 'b', 'c'], ['a', 'b', 'c'], 5) == 5
    assert capsys.readouterr().out == 'note: --nb_classes 5 is more than the 3 class folders: 2 outputs have no ' \
        'images, and top-5 counts them as guesses\n'
    assert number_of_classes(['a', 'b', 'c'], ['a', 'b', 'c'], None) == 3 and capsys.readouterr().out == ''


def test_one_class_is_refused():
    """One output trained to a loss of 0 and evaluated at 100 % top-1, without a word: an extra folder
    level (train/imagenet/<classes>) makes one class of the whole set."""
    from util.datasets import number_of_classes
    with pytest.raises(UsageError, match=r'^train/ holds one class folder \(imagenet\), and classifying needs 2 '
                                         r'classes or more: is there a folder level too many'):
        number_of_classes(['imagenet'], ['imagenet'], None)
    with pytest.raises(UsageError, match='^--nb_classes 1 leaves the classifier fewer than 2 outputs'):
        number_of_classes(['a'], ['a'], 1)
    assert number_of_classes(['a'], ['a'], 2) == 2  # a head of 2 over a subset of one class: allowed, with a note


def test_an_output_folder_inside_a_split_of_the_data_is_refused(tmp_path):
    """Its checkpoints and logs would be read as a class of images (the run ended on 'found no valid
    image in the class folder(s) out', a folder it had made itself)."""
    from util.flags import check_output_outside_the_data
    (tmp_path / 'data' / 'val').mkdir(parents=True)
    for inside in ('data/train/out', 'data/val', 'data/val/a/b'):
        with pytest.raises(UsageError, match=r"is inside --data_path's (train|val)/ folder, where its files would be "
                                             r"read as a class of images"):
            check_output_outside_the_data(str(tmp_path / inside), str(tmp_path / 'data'))
    for outside in ('data/output', 'data/trainings', 'elsewhere', ''):
        check_output_outside_the_data(str(tmp_path / outside) if outside else '', str(tmp_path / 'data'))
    # the built-in set's folder for --data_path demo (not a ./demo of the working directory)
    demo = demo_data.ensure_demo_dataset()
    with pytest.raises(UsageError, match=f"is inside --data_path's train/ folder, .*: choose a folder outside {demo}$"):
        check_output_outside_the_data(os.path.join(demo, 'train', 'run2'), 'demo')


class Payload:
    """An arbitrary class: loading it from a checkpoint would import and run code."""


def test_atomic_save_and_load_as_data(tmp_path):
    path = tmp_path / 'ckpt.pth'
    checkpoint.atomic_save({'model': {'w': torch.ones(2)}, 'epoch': 3}, str(path))
    assert os.listdir(tmp_path) == ['ckpt.pth']
    assert checkpoint.load(str(path))['epoch'] == 3

    torch.save({'model': Payload()}, tmp_path / 'code.pth')  # unpickling this would run its code
    with pytest.raises(UsageError, match=r'holds a Python object \(test_data.Payload\)'):
        checkpoint.load(str(tmp_path / 'code.pth'))

    (tmp_path / 'cut.pth').write_bytes(path.read_bytes()[:100])
    with pytest.raises(UsageError, match='cannot load'):
        checkpoint.load(str(tmp_path / 'cut.pth'))
    with pytest.raises(UsageError, match='does not exist'):
        checkpoint.load(str(tmp_path / 'missing.pth'))
    with pytest.raises(UsageError, match='is a folder: give the .pth file in it'):
        checkpoint.load(str(tmp_path))

    # checkpoints written by the official MAE code keep their args as an argparse.Namespace:
    # plain data, allowed
    torch.save({'model': {}, 'args': argparse.Namespace(blr=1.5e-4)}, tmp_path / 'official.pth')
    assert checkpoint.load(str(tmp_path / 'official.pth'))['args'].blr == 1.5e-4


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint-last.pth')
    checkpoint.atomic_save({'epoch': 1}, path)
    monkeypatch.setattr(torch, 'save', disk_full)
    # one line for the user (the run stops with it), not a traceback
    with pytest.raises(UsageError, match=NO_SPACE):
        checkpoint.atomic_save({'epoch': 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)['epoch'] == 1
    assert os.listdir(tmp_path) == ['checkpoint-last.pth']


def test_model_lookup_by_official_name_and_alias():
    official = create_pretrain_model('mae_vit_tiny_patch8', depth=1)
    alias = create_pretrain_model('mae_vit_tiny', depth=1)
    assert type(official) is type(alias) and official.patch_embed.patch_size == (8, 8)
    with pytest.raises(UsageError, match=r"unknown pre-training model 'mae_vit_larg'.*mae_vit_large"):
        create_pretrain_model('mae_vit_larg')
    # nothing close: the few pre-training models are all listed, timm's thousand are not
    from util.registry import create_classifier, pretrain_model_names
    with pytest.raises(UsageError) as error:
        create_pretrain_model('zzzz')
    assert str(error.value) == f"unknown pre-training model 'zzzz' (known: {', '.join(pretrain_model_names())})"
    with pytest.raises(UsageError, match=r"unknown model 'zzzz' \(none of the \d{4} known is close; "
                                         r"timm.list_models\('\*vit\*'\) lists"):
        create_classifier('zzzz')
    # an image smaller than one patch: timm builds a ViT with no patch, which fails on any image
    with pytest.raises(UsageError, match=r'^cannot build vit_tiny_patch8 at 4 px: the image is smaller than one patch '
                                         r'\(8 px\)$'):
        create_classifier('vit_tiny_patch8', img_size=4, num_classes=10)
    assert create_classifier('vit_tiny_patch8', img_size=8, num_classes=10)(torch.zeros(1, 3, 8, 8)).shape == (1, 10)
    # a model of the other entry point is named as such, with where it goes
    with pytest.raises(UsageError, match=r'^mae_vit_large is a pre-training model, for main_pretrain.py: its checkpoints '
                                         r'fine-tune as --model vit_large_patch16 --finetune <checkpoint>$'):
        create_classifier('mae_vit_large')
    with pytest.raises(UsageError, match=r'^simmim_swin_base is a pre-training model.* --model '
                                         r'swin_base_patch4_window7_224 --finetune'):
        create_classifier('simmim_swin_base')
    with pytest.raises(UsageError, match=r'^hivit_base is a classifier, for main_finetune.py \(closest pre-training '
                                         r'models: mae_hivit_base, '):
        create_pretrain_model('hivit_base')


def test_randaugment_posterize_at_top_magnitude_keeps_working():
    """RandAugment 'inc' posterize at level 10 keeps 0 bits: a black image (Pillow >= 13 refuses 0
    bits; the fine-tuning transform swaps in an op that does what Pillow < 13 did)."""
    from timm.data.auto_augment import AugmentOp
    from util.datasets import finetune_transform
    finetune_transform(argparse.Namespace(input_size=32, color_jitter=None, aa='rand-m9-mstd0.5-inc1',
                                          reprob=0.0, remode='pixel', recount=1, crop_min=0.08))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    black = AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=10)(image)
    assert black.size == image.size and not np.asarray(black).any()
    # 2 bits kept at level 5: every channel value is a multiple of 64, as Pillow computes it
    two_bits = np.asarray(AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=5)(image))
    np.testing.assert_array_equal(two_bits, np.asarray(image) & 0b11000000)
