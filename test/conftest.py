"""Shared fixtures: the demo data set in a per-session directory, a small ImageFolder, and a
helper that runs an entry point in-process as a user would from the command line."""
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Generated once per test session, outside the user's cache; child processes inherit it.
os.environ.setdefault('MIM_DEMO_DIR', os.path.join(tempfile.mkdtemp(prefix='mim-test-'), 'demo'))


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
