"""Shared fixtures: the demo data set in a per-session directory, a small ImageFolder, and a
helper that runs an entry point in-process as a user would from the command line."""
import atexit
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Generated once per test session, outside the user's cache; child processes inherit it. A folder
# made here goes when the session ends (else each session would leave 21 MB of PNGs behind).
if 'MIM_DEMO_DIR' not in os.environ:
    session_dir = tempfile.mkdtemp(prefix='mim-test-')
    os.environ['MIM_DEMO_DIR'] = os.path.join(session_dir, 'demo')
    atexit.register(shutil.rmtree, session_dir, ignore_errors=True)


@pytest.fixture(scope='session')
def demo_root():
    from util.demo_data import ensure_demo_dataset
    return ensure_demo_dataset()


@pytest.fixture(scope='session')
def small_folder(demo_root, tmp_path_factory):
    """An ImageFolder with 2 classes x 32 training images and 9 + 8 validation images from the
    demo set: short epochs, and a validation set of odd size that does not split evenly."""
    root = tmp_path_factory.mktemp('small')
    for split, counts in (('train', (32, 32)), ('val', (9, 8))):
        for class_dir, count in zip(sorted(os.listdir(os.path.join(demo_root, split)))[:2], counts):
            src = os.path.join(demo_root, split, class_dir)
            dst = root / split / class_dir
            dst.mkdir(parents=True)
            for name in sorted(os.listdir(src))[:count]:
                shutil.copy(os.path.join(src, name), dst / name)
    return str(root)


@pytest.fixture(scope='session')
def uninterrupted(small_folder, tmp_path_factory):
    """helpers.RESUMABLE on small_folder in batches of 16: 3 epochs of 4 steps (64 images) in one go.
    Tests compare their stopped and resumed runs with it, and leave its folder as it is.
    returns: (its folder, its losses {step: loss} of steps 1..12)"""
    from helpers import RESUMABLE, losses_by_step, run_pretrain
    out = tmp_path_factory.mktemp('uninterrupted')
    run_pretrain(*RESUMABLE, '--data_path', small_folder, '--batch_size', 16, '--output_dir', out)
    losses = losses_by_step(out)
    assert sorted(losses) == list(range(1, 13))
    return out, losses


@pytest.fixture(scope='session')
def demo_pretraining(demo_root, tmp_path_factory):
    """The README pipeline's first half, shortened, run once: 12 steps of MAE pre-training of
    mae_vit_tiny on the demo set in batches of 32 at its recipe's 64 px, a log line every 3 steps
    (the loss falls to about 0.67 of its first value). returns: its folder"""
    from helpers import run_demo_pretraining
    return run_demo_pretraining('mae_vit_tiny', tmp_path_factory.mktemp('demo_pretraining'), blr=1.5e-3,
                                max_steps=12)


@pytest.fixture(scope='session')
def demo_finetuning(demo_pretraining, tmp_path_factory):
    """The README pipeline's second half, run once: 40 steps (of an epoch's 62) fine-tuning
    demo_pretraining's encoder as vit_tiny_patch8 in batches of 32 at 32 px (4x faster than its 64:
    the pre-trained position table is resampled; no warm-up, a gentler layer decay than the
    README's), then the evaluation on all 500 validation images. A short MIM
    pre-training does not beat random weights on the demo: the accuracy comes from the fine-tuning.
    returns: (pre-training folder, fine-tuning folder)"""
    from helpers import run_finetune
    root = tmp_path_factory.mktemp('demo_finetuning')
    run_finetune('--model', 'vit_tiny_patch8', '--input_size', 32, '--num_workers', 0, '--device', 'cpu',
                 '--data_path', 'demo', '--finetune', demo_pretraining / 'checkpoint-last.pth',
                 '--batch_size', 32, '--blr', 4e-3, '--layer_decay', 0.9, '--aa', 'none', '--reprob', 0,
                 '--mixup', 0, '--cutmix', 0, '--crop_min', 0.4, '--epochs', 1, '--max_steps', 40,
                 '--warmup_epochs', 0, '--log_freq', 10, '--output_dir', root)
    return demo_pretraining, root
