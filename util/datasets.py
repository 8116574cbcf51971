"""Data: ImageFolder data sets, the pre-training transform, the built-in demo set, and the
seeded per-sample randomness that makes a run reproducible and resumable.

Every random choice about a sample (crop, flip, mask) is drawn from generators seeded by
(seed, epoch, sample index): the sampler hands the dataset (index, epoch) pairs, and
`SeededSamples` draws that one sample's crop and flip from a generator seeded for it (the
pre-training transforms, `CropFlip`), or seeds torch, numpy and `random` for it (timm's
fine-tuning transforms, which draw from the global generators). A sample is therefore
augmented the same way whatever the number of processes or data-loader workers, and a run
resumed from a checkpoint continues exactly as an uninterrupted one would.

Pre-training has two input paths (--input_pipeline), with the same crops and flips: 'tensor'
(the default) decodes JPEGs with libjpeg-turbo, crops, resizes and flips uint8 tensors, and the
loader hands uint8 batches to the device, where `normalize_images` makes the model's float input;
'pil' is the torchvision transforms on Pillow images, normalised in the workers, as before;
'nvjpeg' leaves the decoding to the GPU: the workers read the files and draw the crops, and
`JpegBatch` decodes a batch with nvJPEG and crops, resizes and flips it on the device.
"""
import contextlib
import functools
import math
import os
import random
import re
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms_factory import transforms_imagenet_train
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, is_image_file
from torchvision.transforms.v2 import functional as TF

from util import demo_data, signals
from util.errors import UsageError
from util.images import EncodedJpeg, UnreadableImage, decode_jpegs_on, load_rgb, load_rgb_tensor, read_jpeg_or_decode
from util.logger import counted, named_briefly

DEMO = 'demo'
SYNTHETIC = 'synthetic'  # --data_path synthetic[:N]: images made per sample, no disk (SyntheticImages)
INPUT_PIPELINES = ('tensor', 'pil', 'nvjpeg')


def resolve_data_root(data_path, split='train'):
    """The directory holding `train/` and `val/`: `demo` is the built-in set, generated on first
    use; anything else must be an ImageFolder root such as ImageNet's, with the `split` asked for."""
    if data_path == DEMO:
        warn_of_a_local_demo_folder()
        return demo_data.ensure_demo_dataset()
    if not os.path.isdir(os.path.join(data_path, split)):
        missing = 'does not exist' if not os.path.exists(data_path) else \
            'is a file, not a folder' if not os.path.isdir(data_path) else f'has no {split}/ folder'
        if os.path.basename(os.path.normpath(data_path)) in ('train', 'val'):  # the split itself, likely
            parent = os.path.dirname(os.path.abspath(data_path))
            missing += f' (it looks like a split itself: give its parent, {parent})'
        raise UsageError(f'--data_path {data_path!r} {missing}: give the root of an ImageFolder '
                         f'data set ({split}/<class>/<image>), or --data_path demo for the built-in set '
                         f'(synthetic for generated images, to measure a device without a disk)')
    return data_path


def check_data_path(data_path, split='train'):
    """Stop with resolve_data_root's line before anything slow (building a ViT-L, say) where
    --data_path is not a data set; `synthetic[:N]` needs no folder."""
    if not is_synthetic(data_path):
        resolve_data_root(data_path, split)


@functools.cache  # once a run
def warn_of_a_local_demo_folder():
    """`--data_path demo` is the built-in set even where the working directory holds a folder
    named demo, which would otherwise train nothing of the user's without a word."""
    if os.path.isdir(DEMO):
        print(f'warning: --data_path demo is the built-in demo set, not the folder {os.path.abspath(DEMO)} here: '
              f'give --data_path ./demo for that folder', flush=True)


def pretrain_transform(input_size, scale=(0.2, 1.0), interpolation='bicubic'):
    """MAE's pre-training augmentation: RandomResizedCrop(0.2-1, bicubic) and a flip. SimMIM's is
    RandomResizedCrop(0.67-1, bilinear) and a flip; with scale=(0.08, 1) it is MAE's
    linear-probing augmentation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=scale, interpolation=transforms.InterpolationMode(interpolation)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def draw_resized_crop(height, width, scale, generator, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, drawing from `generator`: the same draws in the
    same order, so a generator seeded with s gives the crop the global generator seeded with s
    gave `pretrain_transform`.
    returns: (top, left, height, width) of the crop"""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    in_ratio = width / height  # ten misses: the centre crop closest to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class CropFlip:
    """The pre-training augmentation of `pretrain_transform` (RandomResizedCrop, then a flip with
    probability 1/2), drawing from the generator it is given per sample instead of the global
    generators (seeding those costs ~250 us a sample, a torch.Generator 2 us).

    'tensor': (3, H, W) uint8 in, (3, size, size) uint8 out, resized with antialiasing by
    torchvision's uint8 kernels (Pillow's filters: mean difference 0.05 of 255, see the README);
    the device normalises (`normalize_images`). 'pil': a Pillow image in, the float tensor of
    `pretrain_transform` out, pixel for pixel. 'nvjpeg': as 'tensor', except that an `EncodedJpeg`
    comes out as a `PendingCrop`, cropped where `JpegBatch` decodes it."""

    def __init__(self, size, scale=(0.2, 1.0), interpolation='bicubic', pipeline='tensor'):
        if pipeline not in INPUT_PIPELINES:
            raise UsageError(f'--input_pipeline must be one of {", ".join(INPUT_PIPELINES)}, got {pipeline!r}')
        self.size, self.scale, self.pipeline = [size, size], scale, pipeline
        self.interpolation = transforms.InterpolationMode(interpolation)
        self.to_float = transforms.Compose([transforms.ToTensor(),
                                            transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])

    def __call__(self, image, generator):
        if isinstance(image, EncodedJpeg):
            height, width = image.height, image.width
        else:
            height, width = (image.height, image.width) if self.pipeline == 'pil' else image.shape[-2:]
        top, left, h, w = draw_resized_crop(height, width, self.scale, generator)
        flip = bool(torch.rand(1, generator=generator) < 0.5)  # RandomHorizontalFlip's draw
        if isinstance(image, EncodedJpeg):
            return PendingCrop(image, (top, left, h, w), flip, self)
        if self.pipeline != 'pil':
            image = TF.resized_crop(image, top, left, h, w, self.size, interpolation=self.interpolation, antialias=True)
            return TF.horizontal_flip(image) if flip else image
        image = transforms.functional.resized_crop(image, top, left, h, w, self.size, interpolation=self.interpolation)
        return self.to_float(transforms.functional.hflip(image) if flip else image)


class PendingCrop(NamedTuple):
    """A sample of the 'nvjpeg' pipeline: the JPEG still encoded, with the crop and flip drawn
    for it and the CropFlip that applies them after decoding."""
    jpeg: EncodedJpeg
    box: tuple  # (top, left, height, width)
    flip: bool
    crop: CropFlip


class JpegBatch:
    """A batch of the 'nvjpeg' pipeline, as the data loader hands it over: the JPEGs still to be
    decoded (from `PendingCrop`s) and the images a worker had to decode itself (not plain JPEGs:
    already cropped, (3, S, S) uint8). `to(device)` decodes the JPEGs there in one call (nvJPEG on a
    GPU), crops, resizes and flips them, and returns the (N, 3, S, S) uint8 batch in sample order;
    util.engine.to_device calls it, `normalize_images` then makes the model's input.

    The JPEGs' bytes travel as one tensor: a data-loader worker hands each tensor to the training
    process through shared memory of its own, which costs more than reading the file. The resize
    runs in float32 without rounding each image (one image's kernels are launched one by one: the
    fewer the better), and the batch is flipped and rounded to uint8 at once (on the CPU, against
    the tensor path's fixed-point uint8 resampling: at most 3 apart, 0.2 on average on
    ImageNet-like JPEGs; on a GPU nvJPEG's decoding differs from libjpeg-turbo's more, see
    docs/PERFORMANCE.md)."""

    def __init__(self, images):
        self.count = len(images)
        pending = [(i, image) for i, image in enumerate(images) if isinstance(image, PendingCrop)]
        ready = [(i, image) for i, image in enumerate(images) if not isinstance(image, PendingCrop)]
        self.pending_at = [i for i, _ in pending]
        self.data = torch.cat([sample.jpeg.data for _, sample in pending]) if pending else None
        self.jpeg_fields = [(len(s.jpeg.data), s.jpeg.height, s.jpeg.width, s.jpeg.path) for _, s in pending]
        self.boxes = [sample.box for _, sample in pending]
        self.flipped = [i for i, sample in pending if sample.flip]
        self.crop = pending[0][1].crop if pending else None
        self.ready_at = [i for i, _ in ready]
        self.ready = torch.stack([image for _, image in ready]) if ready else None

    @classmethod
    def collate(cls, samples):
        """default_collate, except that the images of (image, ...) samples form a JpegBatch."""
        return [cls([image for image, *_ in samples]), *default_collate([tuple(rest) for _, *rest in samples])]

    def __len__(self):
        return self.count

    def pin_memory(self):
        if self.ready is not None:
            self.ready = self.ready.pin_memory()
        return self

    def jpegs(self):
        lengths = [length for length, *_ in self.jpeg_fields]
        return [EncodedJpeg(data, *fields) for data, (_, *fields) in zip(self.data.split(lengths), self.jpeg_fields)]

    def to(self, device, non_blocking=False):
        size = self.crop.size if self.crop is not None else list(self.ready.shape[-2:])
        batch = torch.empty((self.count, 3, *size), dtype=torch.float32, device=device)
        if self.ready is not None:
            batch[self.ready_at] = self.ready.to(device, non_blocking=non_blocking).float()
        if self.data is not None:
            for i, image, (top, left, h, w) in zip(self.pending_at, decode_jpegs_on(self.jpegs(), device), self.boxes):
                crop = image[None, :, top:top + h, left:left + w].float()
                batch[i] = F.interpolate(crop, size, mode=self.crop.interpolation.value, antialias=True)[0]
            if self.flipped:
                batch[self.flipped] = batch[self.flipped].flip(-1)
        return batch.round_().clamp_(0, 255).to(torch.uint8)


_MEAN_STD = {}  # device -> ImageNet's mean and std there, (3, 1, 1) each: copied to a device once


def normalize_images(images):
    """The model's input from the uint8 images of the 'tensor' pipeline, on their device: what
    ToTensor and Normalize compute on the host, in the same float32 operations.
    images: (N, 3, H, W) uint8 -> (N, 3, H, W) float32"""
    if images.device not in _MEAN_STD:
        _MEAN_STD[images.device] = tuple(torch.tensor(v, device=images.device).view(3, 1, 1)
                                         for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    mean, std = _MEAN_STD[images.device]
    return images.float().div_(255).sub_(mean).div_(std)


def posterize_allowing_zero_bits(img, bits_to_keep, **_):
    """timm's posterize op, with 0 bits kept giving a black image as Pillow did before version 13.
    RandAugment's 'inc' policies ask for 0 bits at the top magnitude (level 10, which
    rand-m9-mstd0.5 draws about once in 40 posterize ops); Pillow 13 refuses 0 and would stop the
    training in a data-loader worker."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _use_compatible_posterize():
    from timm.data import auto_augment
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize_allowing_zero_bits


# The settings of timm's RandAugment string after `rand` (m9: magnitude, n2: ops an image, mstd0.5:
# its noise, mmax10: its bound, inc1: magnitude-increasing ops, p0.5: each op's probability,
# t<name>: another op set); timm skips a section without a number.
RAND_AUGMENT_SETTING = re.compile(r'(m|n|mstd|mmax|inc|p)\d+(\.\d*)?|t\w+')


def check_rand_augment_settings(policy):
    """A RandAugment --aa whose every section timm reads (timm's own check covers the other policies)."""
    if not (policy or '').startswith('rand-'):
        return
    for section in policy.split('-')[1:]:
        if not RAND_AUGMENT_SETTING.fullmatch(section):
            raise UsageError(f'--aa {policy}: {section!r} is not a RandAugment setting (m9 magnitude, n2 ops, mstd0.5, '
                             f'mmax10, inc1, p0.5), and timm would skip it; e.g. rand-m9-mstd0.5-inc1')


def finetune_transform(args):
    """The fine-tuning augmentation of MAE and DeiT, built by timm: RandomResizedCrop (bicubic,
    at least --crop_min of the image), flip, RandAugment (--aa), colour jitter (--color_jitter: after
    RandAugment when both are given, as mmpretrain's MaskFeat recipe; timm's create_transform would
    drop it), random erasing (--reprob/--remode/--recount)."""
    _use_compatible_posterize()
    check_rand_augment_settings(args.aa)
    try:
        return transforms_imagenet_train(args.input_size, scale=(args.crop_min, 1.0), color_jitter=args.color_jitter,
                                         force_color_jitter=True, auto_augment=args.aa, interpolation='bicubic',
                                         re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                                         mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    except AssertionError:  # timm asserts on a policy name it does not know ('Unknown AA policy')
        raise UsageError(f'--aa {args.aa} is not an augmentation policy timm knows: give rand-m9-mstd0.5-inc1 '
                         f'(RandAugment), augmix-m5-w4-d2 (AugMix), original, v0 or 3a (AutoAugment), '
                         f'or none') from None


def eval_transform(input_size, tensors=False):
    """Resize to input_size / 0.875 (224 -> 256; no margin above 224 px, as MAE does), then crop
    the centre. `tensors`: of (3, H, W) uint8 tensors instead of Pillow images (the pixels differ
    by resampling rounding), for images too large for Pillow's decompression-bomb limit."""
    crop_pct = 224 / 256 if input_size <= 224 else 1.0
    return transforms.Compose([
        transforms.Resize(int(input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC,
                          antialias=True),
        transforms.CenterCrop(input_size),
        transforms.ConvertImageDtype(torch.float32) if tensors else transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)])


def image_paths_of(data_path):
    """The image files of what `data_path` names, sorted: an image file, a folder of images
    (searched through), an ImageFolder root (its val/ images, else train/), or demo."""
    if os.path.isfile(data_path):
        return [data_path]
    if data_path == DEMO or os.path.isdir(os.path.join(data_path, 'train')):
        root = resolve_data_root(data_path)
        val = image_files_under(os.path.join(root, 'val'))  # pre-training needs no val/: train/'s where it has none
        data_path, paths = (os.path.join(root, 'val'), val) if val else \
            (os.path.join(root, 'train'), image_files_under(os.path.join(root, 'train')))
    elif not os.path.isdir(data_path):
        raise UsageError(f'--data_path {data_path!r} is neither an image, a folder of images nor demo')
    else:
        paths = image_files_under(data_path)
    if not paths:
        raise UsageError(f'no images under {data_path!r} (looked for {", ".join(IMG_EXTENSIONS)})')
    return paths


def image_files_under(folder):
    """The image files in `folder` and the folders under it, sorted; [] for a missing folder."""
    return sorted(os.path.join(path, name) for path, names in walk_without_cycles(folder) for name in names
                  if is_image_file(name))


def load_eval_images(data_path, count, input_size):
    """`count` fixed images spread evenly over what `data_path` names (`image_paths_of`), normalised
    as in evaluation (resize, centre crop, on tensors: JPEGs of any size are decoded by
    libjpeg-turbo, as in training): the same files every time. An unreadable file is skipped for
    the next readable one, as training replaces it; an image file given alone, or a folder without
    a readable image, is a UsageError. returns: (N <= count, 3, S, S)"""
    paths = image_paths_of(data_path)
    transform = eval_transform(input_size, tensors=True)
    count = min(count, len(paths))
    images, skipped, index = [], [], -1
    for start in (i * len(paths) // count for i in range(count)):
        index = max(start, index + 1)  # past the files an earlier pick tried
        while index < len(paths):
            try:
                images.append(transform(load_rgb_tensor(paths[index])))
                break
            except UnreadableImage as e:
                skipped.append(str(e))
                index += 1
    if skipped:
        print(f'skipped {len(skipped)} unreadable image(s) for the pictures: {"; ".join(skipped[:3])}')
    if not images:
        raise UsageError(f'no readable image in --data_path {data_path!r} ({skipped[0]}): repair or replace it')
    return torch.stack(images)


def walk_without_cycles(top):
    """sorted(os.walk(top, followlinks=True)) as torchvision's ImageFolder walks a class folder,
    but entering each real folder once: a link back to a folder above it (a loop) would repeat
    its images without end, and crossing loops make the walk grow exponentially. A link to a
    folder that holds `top` is a loop too: left out, not walked once.
    returns: [(folder, sorted file names)] in the order of the folder paths"""
    seen, found, real_top = set(), [], os.path.realpath(top)
    for folder, subfolders, names in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or (folder != top and real_top.startswith(os.path.join(real, ''))):
            subfolders[:] = []
            continue
        seen.add(real)
        # which of two links to one folder is kept does not depend on the file system
        subfolders[:] = sorted(visible(subfolders))
        found.append((folder, sorted(visible(names))))
    return sorted(found)


def visible(names):
    """The names that do not start with a dot: hidden folders and files (.ipynb_checkpoints, the
    ._x.jpg files macOS leaves on other file systems, .DS_Store) are no classes and no images."""
    return [name for name in names if not name.startswith('.')]


class ImageFolderWithoutLoops(datasets.ImageFolder):
    """torchvision's ImageFolder, its class folders walked by `walk_without_cycles`."""

    @staticmethod
    def find_classes(directory):
        """The visible sub-folders of `directory`, sorted, and their indices; images beside them,
        in no class folder, are left out with a warning."""
        entries = [entry for entry in os.scandir(directory) if not entry.name.startswith('.')]
        classes = sorted(entry.name for entry in entries if entry.is_dir())
        loose = sum(is_image_file(entry.name) for entry in entries if not entry.is_dir())
        if not classes and os.path.basename(os.path.normpath(directory)) == 'val':  # ImageNet's val archive is flat
            raise FileNotFoundError(f'it has no class folders: its images go in {os.path.join(directory, "<class>", "")}'
                                    f'<image>, in the class folders of train/ (ImageNet\'s validation archive unpacks '
                                    f'without them: sort its images into them first)')
        if not classes:
            # images straight in train/ are the usual first try with unlabelled data
            raise FileNotFoundError(f'it has no class folders: images go in {os.path.join(directory, "<class>", "")}'
                                    f'<image> (for pre-training, one folder, say {os.path.join(directory, "all", "")}'
                                    f', is enough)')
        if loose:
            print(f'warning: {counted(loose, "image")} straight in {directory}, beside its class folders, '
                  f'{"is" if loose == 1 else "are"} in no class and left out: move {"it" if loose == 1 else "them"} '
                  f'into a class folder')
        others = sorted(entry.name for entry in entries if not entry.is_dir() and
                        not is_image_file(entry.name))
        if others:  # ImageNet's train set comes as a tar a class; an unmounted disk leaves a dangling link
            print(f'warning: {named_briefly(others, 3)} in {directory} {"is" if len(others) == 1 else "are"} no class '
                  f'folder and left out (an archive: extract it into its class folder; a link: to no folder)')
        return classes, {name: index for index, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples, empty, skipped, owner = [], [], [], {}  # owner: real folder -> the class that read it
        for class_name, index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            folders = walk_without_cycles(os.path.join(directory, class_name))
            for folder, _ in folders:
                other = owner.setdefault(os.path.realpath(folder), class_name)
                if other != class_name:
                    raise FileNotFoundError(f'the class folders {other} and {class_name} both hold '
                                            f'{os.path.realpath(folder)} (through a link): its images would be of two '
                                            f'classes at once; remove the link, or copy the images')
            files = [os.path.join(folder, name) for folder, names in folders for name in names]
            found = [(path, index) for path in files if is_image_file(path)]
            skipped += [os.path.relpath(path, directory) for path in files if not is_image_file(path)]
            samples += found
            if not found:
                empty.append(class_name)
        if empty and not allow_empty:
            raise FileNotFoundError(f'found no valid image in the class folder(s) {", ".join(empty[:5])}; supported '
                                    f'extensions: {", ".join(IMG_EXTENSIONS)}')
        if skipped:  # a JPEG saved as .jfif or without an extension is read by no one, without a word
            print(f'warning: {counted(len(skipped), "file")} in the class folders of {directory} '
                  f'{"has" if len(skipped) == 1 else "have"} no image extension ({", ".join(IMG_EXTENSIONS)}) and '
                  f'{"is" if len(skipped) == 1 else "are"} left out: {named_briefly(skipped, 3)}')
        return samples


def build_image_folder(data_path, split, transform, loader=load_rgb):
    """An ImageFolder of `split` whose images are decoded by util.images.load_rgb (any mode to RGB,
    UnreadableImage for a broken file; load_rgb_tensor: the same as uint8 tensors). A split without
    class folders, or with a class folder without images, is a UsageError. `synthetic[:N]` is
    SyntheticImages, in the form `loader` gives."""
    if is_synthetic(data_path):
        return SyntheticImages(split, synthetic_size(data_path, split), transform, tensors=loader is not load_rgb)
    root = os.path.join(resolve_data_root(data_path, split), split)
    try:
        return ImageFolderWithoutLoops(root, transform=transform, loader=loader)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f'cannot read the {split} images under {root!r}: {e}') from None


def training_classes(val_folder):
    """The class folders of the train/ beside `val_folder`, by name alone (ImageNet's 1.28 M files
    are not listed), for an evaluation that reads val/ only; val/'s own when there is no train/
    (a copy of the validation set alone), or for synthetic images (the same classes in both splits)."""
    if isinstance(val_folder, SyntheticImages):
        return val_folder.classes
    root = os.path.join(os.path.dirname(val_folder.root), 'train')
    if not os.path.isdir(root):
        return val_folder.classes
    try:
        return ImageFolderWithoutLoops.find_classes(root)[0]
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f'cannot read the class folders of {root!r}: {e}') from None


def number_of_classes(train_classes, val_classes, nb_classes):
    """The number of classes (--nb_classes, else train/'s class folders); val/ must hold the same
    classes as train/, or its labels would mean other classes than the model's outputs."""
    num_classes = len(train_classes) if nb_classes is None else nb_classes
    if num_classes < len(train_classes):
        raise UsageError(f'--nb_classes {num_classes} is fewer than the {len(train_classes)} class '
                         f'folders of the training data')
    if num_classes < 2:  # one output: a loss of 0 and a top-1 of 100 % whatever the weights
        if nb_classes is not None:
            raise UsageError(f'--nb_classes {nb_classes} leaves the classifier fewer than 2 outputs, which learn and '
                             f'measure nothing: give 2 or more')
        raise UsageError(f'train/ holds one class folder ({train_classes[0]}), and classifying needs 2 classes or '
                         f'more: is there a folder level too many (train/<set>/<class>/<image>, where '
                         f'train/<class>/<image> is meant)?')
    if num_classes > len(train_classes):  # a head kept for a larger set (ImageNet's 1000 on a subset), or a slip
        print(f'note: --nb_classes {num_classes} is more than the {len(train_classes)} class folders: '
              f'{num_classes - len(train_classes)} outputs have no images, and top-5 counts them as guesses')
    if val_classes != train_classes:
        differences = class_differences(train_classes, 'train/', val_classes, 'val/')
        raise UsageError(f'val/ and train/ hold different class folders ({differences}): the labels would not match; '
                         f'give val/ the class folders of train/ (an empty one is refused too)')
    return num_classes


def class_differences(classes, name, other_classes, other_name):
    """'only in train/: a, b; only in val/: zebra': the sides with classes the other lacks (in the
    same order, the lists are equal)."""
    only = {name: sorted(set(classes) - set(other_classes)), other_name: sorted(set(other_classes) - set(classes))}
    differences = '; '.join(f'only in {side}: {named_briefly(names, 5)}' for side, names in only.items() if names)
    return differences or 'the same names in another order'


def build_pretrain_dataset(args, mask_generator=None, bad_images=None):
    """The pre-training samples of train/: the crop and flip of --input_size, --crop_min and
    --interpolation on the images of --input_pipeline ('tensor': uint8, normalised on the device
    by `normalize_images`; 'pil': normalised floats; 'nvjpeg': `PendingCrop`s, batched by
    `JpegBatch.collate`), drawn per sample from --seed, with the masks
    of `mask_generator`."""
    crop = CropFlip(args.input_size, (args.crop_min, 1.0), args.interpolation, args.input_pipeline)
    loader = {'tensor': load_rgb_tensor, 'pil': load_rgb, 'nvjpeg': read_jpeg_or_decode}[args.input_pipeline]
    return SeededSamples(build_image_folder(args.data_path, 'train', None, loader=loader), args.seed,
                         mask_generator=mask_generator, bad_images=bad_images, transform=crop)


def build_finetune_train_folder(args):
    """The training images of main_finetune: fine-tuning's augmentation (RandAugment, random
    erasing: `finetune_transform`), or with --linprobe MAE's linear-probing crop and flip."""
    transform = pretrain_transform(args.input_size, scale=(args.crop_min, 1.0)) if args.linprobe \
        else finetune_transform(args)
    return build_image_folder(args.data_path, 'train', transform)


def is_synthetic(data_path):
    return data_path == SYNTHETIC or data_path.startswith(SYNTHETIC + ':')


# ImageNet-1k's sizes: what `--data_path synthetic` stands for unless `synthetic:N` says N training images.
SYNTHETIC_SIZES = {'train': 1281167, 'val': 50000}
SYNTHETIC_CLASSES = 1000
SYNTHETIC_IMAGE_SIZE = 256  # pixels a side: ImageNet's images resized to 256, as many pipelines store them


def synthetic_size(data_path, split):
    """Images of `split` in `synthetic` (ImageNet-1k's counts) or `synthetic:N` (N training
    images, validation images in ImageNet's proportion, at least 1)."""
    _, colon, count = data_path.partition(':')
    if not colon:
        return SYNTHETIC_SIZES[split]
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f'--data_path synthetic:N needs a whole number of training images N above 0, got {count!r}')
    return max(1, round(int(count) * SYNTHETIC_SIZES[split] / SYNTHETIC_SIZES['train']))


class SyntheticImages(Dataset):
    """An ImageFolder-like data set with no files, for measuring the device without a disk: image
    `index` of a split is made from (split, index) alone (a random 8x8 RGB pattern enlarged to
    256x256, ~0.1 ms), its class is index % 1000. Samples are (transform(image), class), the image
    a Pillow image, or a (3, H, W) uint8 tensor with `tensors` (the 'tensor' input pipeline)."""

    def __init__(self, split, num_samples, transform=None, tensors=False):
        self.split_seed = list(SYNTHETIC_SIZES).index(split)
        self.num_samples = num_samples
        self.transform = transform
        self.tensors = tensors
        self.classes = [f'{c:04d}' for c in range(SYNTHETIC_CLASSES)]

    def __len__(self):
        return self.num_samples

    def image(self, index):
        """(256, 256, 3) uint8"""
        pattern = np.random.default_rng([self.split_seed, index]).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        block = SYNTHETIC_IMAGE_SIZE // 8
        return pattern.repeat(block, axis=0).repeat(block, axis=1)

    def __getitem__(self, index):
        pixels = self.image(index)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() if self.tensors else Image.fromarray(pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, index % SYNTHETIC_CLASSES


def eval_images(data_path, count, input_size, what=None):
    """`count` fixed images of the data set, normalised as in evaluation: files spread over it
    (`load_eval_images`), or the first of synthetic's val split; `what` they are for is said in
    the error where there is none to read. returns: (count, 3, S, S)"""
    if is_synthetic(data_path):
        val = SyntheticImages('val', synthetic_size(data_path, 'val'), eval_transform(input_size))
        return torch.stack([val[i][0] for i in range(min(count, len(val)))])
    try:
        return load_eval_images(data_path, count, input_size)
    except UsageError as e:
        if what is None:
            raise
        raise UsageError(f'{e}; they are read for {what}') from None


def default_num_workers():
    """Data-loader workers per training process: this node's usable cores shared among its
    processes (torchrun's LOCAL_WORLD_SIZE), or min(10, cores) where that is more."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(min(10, cores), cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def sample_seeds(seed, epoch, index):
    """Two independent 64-bit seeds (augmentation, masking) for one sample of one epoch."""
    aug_seed, mask_seed = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)
    return int(aug_seed), int(mask_seed)


@contextlib.contextmanager
def seeded_global_rngs(seed):
    """Seed torch's CPU generator, numpy's and `random`'s for a block, so that timm's transforms
    and Mixup (which draw from these global generators) are reproducible per sample. In the
    training process (no data-loader workers) they are restored after it, so the rest of the
    process is not disturbed; a worker draws from them nowhere else and skips that (saving and
    restoring numpy's state alone costs ~90 us)."""
    saved = None
    if torch.utils.data.get_worker_info() is None:
        saved = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # the CPU's alone: torch.manual_seed seeds every accelerator's (~130 us)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.random.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


# Replacements tried for one unreadable image before the run stops (a folder of broken files).
MAX_REPLACEMENT_TRIES = 20


class SeededSamples(Dataset):
    """Wraps a map-style dataset of (image, target) pairs; indexed by (index, epoch).

    With `transform(image, generator)` (CropFlip), it is applied to the dataset's image with a
    torch.Generator seeded for the sample; without, the dataset's own transform runs with the
    global generators seeded for the sample (seeded_global_rngs).

    With a mask generator, a sample is (image, mask_kwargs) for pre-training, the target
    dropped; with `batch_seeds` it is (image, target, seed) and `MixupCollate` draws the mix of
    a batch from the seed of its first sample; else it is (image, target).

    With `bad_images` (util.images.BadImages; training), an unreadable image is recorded there
    and replaced by another sample drawn from (seed, epoch, index), with the augmentation of
    the sample it replaces: the run stays reproducible and resumable. Without (evaluation), it
    is a UsageError naming the file.
    """

    def __init__(self, dataset, seed, mask_generator=None, batch_seeds=False, bad_images=None, transform=None):
        self.dataset = dataset
        self.seed = seed
        self.transform = transform
        self.mask_generator = mask_generator
        self.batch_seeds = batch_seeds
        self.bad_images = bad_images

    def __len__(self):
        return len(self.dataset)

    def read(self, index, epoch):
        """dataset[index], or with bad_images a readable replacement of it."""
        for attempt in range(MAX_REPLACEMENT_TRIES + 1):
            try:
                return self.dataset[index]
            except UnreadableImage as e:
                if self.bad_images is None:
                    raise UsageError(f'unreadable image {e}: the accuracy would be computed over another set of '
                                     f'images; repair or remove the file') from None
                self.bad_images.record(e)
                last_error = e
                index = int(np.random.default_rng([self.seed, epoch, index, attempt]).integers(len(self.dataset)))
        raise UsageError(f'{MAX_REPLACEMENT_TRIES} replacements in a row were unreadable too (the last: '
                         f'{last_error}): check the data set')

    def __getitem__(self, index_and_epoch):
        index, epoch = index_and_epoch
        aug_seed, mask_seed = sample_seeds(self.seed, epoch, index)
        if self.transform is not None:
            image, target = self.read(index, epoch)
            image = self.transform(image, torch.Generator().manual_seed(aug_seed))
        else:
            with seeded_global_rngs(aug_seed):
                image, target = self.read(index, epoch)
        if self.mask_generator is not None:
            return image, self.mask_generator(torch.Generator().manual_seed(mask_seed))
        if self.batch_seeds:
            return image, target, mask_seed
        return image, target


class MixupCollate:
    """Collate a batch, then apply timm's Mixup/CutMix (which also turns the targets into
    smoothed one-hot vectors) on the CPU in the loader's workers. The random draws of the mix
    come from the seed of the batch's first sample, so a batch is mixed the same way whatever
    the number of workers, and again after a resumption."""

    def __init__(self, mixup):
        self.mixup = mixup

    def __call__(self, samples):
        images, targets = default_collate([(image, target) for image, target, _ in samples])
        with seeded_global_rngs(samples[0][2]):
            return self.mixup(images, targets)


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) and can start an epoch part-way.

    The order of an epoch depends on (seed, epoch) only, as in DistributedSampler: one global
    order, padded to a multiple of the processes, of which rank r takes every world-th sample
    from the r-th. So the k-th optimizer step of an epoch trains on the same samples whatever
    the split of its effective batch into processes, --batch_size and --accum_iter.
    `set_epoch(epoch, start=k)` skips the first k samples of the global order (a run resumed
    in the middle of an epoch, on the same or another number of processes).
    """

    def __init__(self, dataset, num_replicas, rank, seed, shuffle=True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        if start % self.num_replicas:
            raise ValueError(f'an epoch resumes at a multiple of the {self.num_replicas} processes, not {start}')
        self.start = start

    def global_order(self):
        """The epoch's sample indices for all processes together, padded as DistributedSampler pads."""
        if self.shuffle:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order.tolist()
        else:
            order = list(range(len(self.dataset)))
        padding = self.total_size - len(order)
        return order + (order * math.ceil(padding / len(order)))[:padding]

    def __iter__(self):
        mine = self.global_order()[self.start + self.rank::self.num_replicas]
        return iter([(i, self.epoch) for i in mine])

    def __len__(self):
        return (self.total_size - self.start) // self.num_replicas


def build_loader(dataset, world, args, pin_memory, shuffle=True, drop_last=True, collate_fn=None):
    """A DataLoader over SeededSamples with an EpochSampler for this rank."""
    sampler = EpochSampler(dataset, num_replicas=world.world_size, rank=world.rank, seed=args.seed,
                           shuffle=shuffle)
    batches = len(sampler) // args.batch_size  # full batches of this rank in an epoch
    if batches < args.accum_iter and drop_last:
        raise UsageError(f'each process has {batches} batches of {args.batch_size} an epoch, fewer than --accum_iter '
                         f'{args.accum_iter} ({len(dataset)} images over {world.world_size} processes): no optimizer '
                         f'step would be taken; lower --batch_size or --accum_iter (or use more images)')
    unused = batches % args.accum_iter if drop_last else 0
    if unused * 10 >= batches:  # a tenth or more of the data never trains (a recipe's accumulation on a small set)
        print(f'warning: an epoch takes {batches - unused} of the {batches} batches of {args.batch_size} of each process '
              f'(whole optimizer steps of --accum_iter {args.accum_iter}): the other {unused} '
              f'({unused * args.batch_size} images a process) are left out each epoch; a lower --accum_iter with a '
              f'larger --batch_size uses them')
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=pin_memory, drop_last=drop_last, collate_fn=collate_fn,
                      persistent_workers=args.num_workers > 0, worker_init_fn=signals.ignore_stop_signals_in_worker)


def build_eval_loader(dataset, world, args, pin_memory, distributed, persistent=True):
    """Evaluation batches: this rank's shard when `distributed`, else every image. With
    `persistent` its workers live from one evaluation to the next (no start-up of a pool each
    epoch); without, they exist only while it is read (an evaluation every few epochs)."""
    num_replicas, rank = (world.world_size, world.rank) if distributed else (1, 0)
    return DataLoader(dataset, sampler=ShardSampler(dataset, num_replicas, rank), batch_size=args.batch_size,
                      num_workers=args.num_workers, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=persistent and args.num_workers > 0,
                      worker_init_fn=signals.ignore_stop_signals_in_worker)


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
