"""Data: ImageFolder data sets, the pre-training transform, the built-in demo set, and the
seeded per-sample randomness that makes a run reproducible and resumable.

Every random choice about a sample (crop, flip, mask) is drawn from generators seeded by
(seed, epoch, sample index): the sampler hands the dataset (index, epoch) pairs, and
`SeededSamples` seeds torch, numpy and `random` for that one sample. A sample is therefore
augmented the same way whatever the number of processes or data-loader workers, and a run
resumed from a checkpoint continues exactly as an uninterrupted one would.
"""
import contextlib
import os
import random

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms

from util import demo_data
from util.errors import UsageError

DEMO = 'demo'


def resolve_data_root(data_path):
    """The directory holding `train/` (and `val/`): `demo` is the built-in set, generated on
    first use; anything else must be an ImageFolder root such as ImageNet's."""
    if data_path == DEMO:
        return demo_data.ensure_demo_dataset()
    if not os.path.isdir(os.path.join(data_path, 'train')):
        raise UsageError(f'--data_path {data_path!r} has no train/ folder: give the root of an ImageFolder '
                         f'data set (train/<class>/<image>), or --data_path demo for the built-in set')
    return data_path


def pretrain_transform(input_size):
    """MAE's pre-training augmentation: RandomResizedCrop(0.2-1, bicubic) and a flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def build_image_folder(data_path, split, transform):
    root = os.path.join(resolve_data_root(data_path), split)
    try:
        return datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f'cannot read the {split} images under {root!r}: {e}') from None


def sample_seeds(seed, epoch, index):
    """Two independent 64-bit seeds (augmentation, masking) for one sample of one epoch."""
    aug_seed, mask_seed = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)
    return int(aug_seed), int(mask_seed)


@contextlib.contextmanager
def seeded_global_rngs(seed):
    """Seed torch's CPU generator, numpy's and `random`'s for a block, then restore them, so that
    the transforms (which draw from these global generators) are reproducible per sample and
    the rest of the process (data-loader workers aside, it may be the training process) is
    not disturbed."""
    torch_state, np_state, py_state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class SeededSamples(Dataset):
    """Wraps a map-style dataset of (image, target) pairs; indexed by (index, epoch).

    With a mask generator, a sample is (image, mask_kwargs) for pre-training, the target
    dropped; without one it is (image, target).
    """

    def __init__(self, dataset, seed, mask_generator=None):
        self.dataset = dataset
        self.seed = seed
        self.mask_generator = mask_generator

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index_and_epoch):
        index, epoch = index_and_epoch
        aug_seed, mask_seed = sample_seeds(self.seed, epoch, index)
        with seeded_global_rngs(aug_seed):
            image, target = self.dataset[index]
        if self.mask_generator is None:
            return image, target
        return image, self.mask_generator(torch.Generator().manual_seed(mask_seed))


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) and can start an epoch part-way.

    The order of an epoch depends on (seed, epoch) only, as in DistributedSampler; a single
    process is a world of one. `set_epoch(epoch, start=k)` skips this rank's first k samples
    (a run resumed in the middle of an epoch).
    """

    def __init__(self, dataset, num_replicas, rank, seed, shuffle=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(i, self.epoch) for i in indices])

    def __len__(self):
        return self.num_samples - self.start


def build_loader(dataset, world, args, pin_memory, shuffle=True, drop_last=True):
    """A DataLoader over SeededSamples with an EpochSampler for this rank."""
    sampler = EpochSampler(dataset, num_replicas=world.world_size, rank=world.rank, seed=args.seed,
                           shuffle=shuffle)
    if len(sampler) < args.batch_size and drop_last:
        raise UsageError(f'{len(dataset)} images give each of {world.world_size} processes {len(sampler)}, '
                         f'fewer than --batch_size {args.batch_size}: lower --batch_size')
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=args.num_workers > 0)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation order for one rank: every rank-th image, without the padding of
    DistributedSampler, so that the ranks together see each image exactly once and the summed
    counts give the exact accuracy. Yields (index, 0) for SeededSamples."""

    def __init__(self, dataset, num_replicas, rank):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter([(i, 0) for i in self.indices])

    def __len__(self):
        return len(self.indices)
