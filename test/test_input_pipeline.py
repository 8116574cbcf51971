"""The pre-training input paths: the same crops and flips from (seed, epoch, index), the tensor
path's pixels within resampling rounding of Pillow's, normalising on the device equal to
ToTensor + Normalize, the fast reader's verdicts equal to Pillow's, and the nvjpeg path's batches
(decoded where the batch goes: here the CPU) equal to the tensor path's."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from helpers import write_broken_files
from util.datasets import (CropFlip, JpegBatch, SeededSamples, build_image_folder, build_loader, build_pretrain_dataset,
                           default_num_workers, draw_resized_crop, normalize_images, pretrain_transform)
from util.engine import model_input, to_device
from util.errors import UsageError
import util.images
from main_pretrain import check_input_pipeline
from util.images import (EncodedJpeg, UnreadableImage, decode_jpegs_on, load_rgb, load_rgb_tensor,
                         read_jpeg_or_decode)

# The tensor path's largest and mean difference from Pillow's pixels (0-255), as the README states
# them: bilinear within 1, bicubic within 4 (a few pixels in a million), both well under 0.1 on average.
MAX_DIFFERENCE, MEAN_DIFFERENCE = {'bilinear': 1, 'bicubic': 4}, 0.1


def pretrain_args(data_path, pipeline, size=48, interpolation='bicubic'):
    return argparse.Namespace(data_path=data_path, input_size=size, crop_min=0.2, interpolation=interpolation, seed=0,
                              input_pipeline=pipeline)


def test_crop_and_flip_draws_are_torchvisions():
    """A generator seeded with s draws what torchvision's RandomResizedCrop and RandomHorizontalFlip
    draw from the global generator seeded with s, the centre-crop fallback included (a strip)."""
    crop = transforms.RandomResizedCrop(32, scale=(0.2, 1.0))
    for (height, width), scale in [((64, 64), (0.2, 1.0)), ((375, 500), (0.08, 1.0)), ((4, 400), (0.9, 1.0))]:
        image = torch.zeros(3, height, width)
        for seed in range(50):
            torch.manual_seed(seed)
            expected = (*crop.get_params(image, scale, crop.ratio), bool(torch.rand(1) < 0.5))
            generator = torch.Generator().manual_seed(seed)
            drawn = (*draw_resized_crop(height, width, scale, generator),
                     bool(torch.rand(1, generator=generator) < 0.5))
            assert drawn == expected, (height, width, seed)


def test_pil_pipeline_is_the_old_transform_pixel_for_pixel(demo_root):
    old = SeededSamples(build_image_folder('demo', 'train', pretrain_transform(48)), 3)
    new = build_pretrain_dataset(argparse.Namespace(**{**vars(pretrain_args('demo', 'pil')), 'seed': 3}))
    for index, epoch in [(0, 0), (5, 2), (123, 7)]:
        assert torch.equal(new[(index, epoch)][0], old[(index, epoch)][0])


def to_pixels(normalised):
    """The 0-255 pixels of a normalised float image."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (normalised * std + mean) * 255


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear'])
def test_tensor_pipeline_is_within_rounding_of_pillow(demo_root, tmp_path, interpolation):
    """On demo images (PNG, upsampled) and on JPEGs (decoded by libjpeg-turbo, downsampled)."""
    rng = np.random.default_rng(0)
    for i in range(4):
        folder = tmp_path / 'train' / f'c{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((200, 150), Image.BICUBIC)
        smooth.save(folder / f'{i}.jpg', quality=90)
    for data_path, size in [('demo', 48), (str(tmp_path), 96)]:
        pil = build_pretrain_dataset(pretrain_args(data_path, 'pil', size, interpolation))
        tensor = build_pretrain_dataset(pretrain_args(data_path, 'tensor', size, interpolation))
        for index in range(4):
            image = tensor[(index, 1)][0]
            assert image.dtype == torch.uint8 and image.shape == (3, size, size)
            difference = (image.float() - to_pixels(pil[(index, 1)][0])).abs()
            assert difference.max() <= MAX_DIFFERENCE[interpolation] + 1e-3, (data_path, index)
            assert difference.mean() < MEAN_DIFFERENCE, (data_path, index)


def test_normalising_on_the_device_is_totensor_and_normalize():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    expected = torch.stack([reference(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
    assert torch.equal(normalize_images(images), expected)
    # in a batch, only the uint8 images change: masks, noise and targets pass as they are
    noise, targets = torch.rand(2, 4), torch.tensor([1, 2])
    out_images, out_kwargs, out_targets = model_input((images, {'noise': noise}, targets))
    assert torch.equal(out_images, expected) and out_kwargs['noise'] is noise and out_targets is targets


@pytest.mark.parametrize('torchvision_decodes', [True, False])
def test_fast_reader_gives_pillows_pixels_and_verdicts(tmp_path, monkeypatch, torchvision_decodes):
    """The same pixels and messages whether torchvision decodes the JPEGs or, in a torchvision that
    no longer has its decoder (deprecated since 0.29), Pillow does."""
    if not torchvision_decodes:
        monkeypatch.setattr(util.images, 'decode_jpeg', None)
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    images = {'rgb.jpg': rgb, 'gray.jpg': rgb.convert('L'), 'cmyk.jpg': rgb.convert('CMYK'),
              'rgba.png': rgb.convert('RGBA'), 'palette.png': rgb.convert('P')}
    for name, image in images.items():
        image.save(tmp_path / name)
        tensor = load_rgb_tensor(str(tmp_path / name))
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, 20, 30), name
        assert np.array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(load_rgb(str(tmp_path / name)))), name
    for path in [*write_broken_files(tmp_path), str(tmp_path / 'missing.jpg')]:
        with pytest.raises(UnreadableImage) as pillow:
            load_rgb(path)
        with pytest.raises(UnreadableImage) as fast:
            load_rgb_tensor(path)
        assert str(fast.value) == str(pillow.value)


def odd_images_folder(root):
    """An ImageFolder of 12 images: plain RGB and grayscale JPEGs (left for the device), and those a
    worker decodes itself: CMYK, a PNG, a JPEG with bytes after its end, a truncated one.
    returns: {path: kind}"""
    rng = np.random.default_rng(2)
    kinds = {}
    for i in range(12):
        folder = root / 'train' / f'c{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((70 + i, 50), Image.BICUBIC)
        kind = ['RGB', 'L', 'CMYK', 'png', 'trailing', 'truncated'][i % 6] if i < 6 else 'RGB'
        kinds[str(folder / f'{i}.{"png" if kind == "png" else "jpg"}')] = kind
        if kind == 'png':
            image.save(folder / f'{i}.png')
            continue
        image.convert(kind if kind in ('L', 'CMYK') else 'RGB').save(folder / f'{i}.jpg', quality=90)
        data = (folder / f'{i}.jpg').read_bytes()
        if kind == 'trailing':
            (folder / f'{i}.jpg').write_bytes(data + b'\0' * 10)
        if kind == 'truncated':
            (folder / f'{i}.jpg').write_bytes(data[:len(data) // 2])
    return kinds


def test_nvjpeg_batches_are_the_tensor_paths(tmp_path):
    """The workers leave plain JPEGs encoded and decode the rest; JpegBatch decodes, crops and flips
    on the batch's device and puts every image back in its place: on the CPU (libjpeg-turbo, the
    same decoder) the batches are the tensor path's within resampling rounding (a float resize
    against the uint8 kernel's fixed-point one: about a fifth of the pixels 1 apart on JPEGs), the
    replaced truncated image included."""
    root = str(tmp_path)
    for path, kind in odd_images_folder(tmp_path).items():
        if kind == 'truncated':
            with pytest.raises(UnreadableImage):
                read_jpeg_or_decode(path)
        else:
            assert isinstance(read_jpeg_or_decode(path), EncodedJpeg) == (kind in ('RGB', 'L')), kind
    batches = {}
    for pipeline in ('tensor', 'nvjpeg'):
        args = argparse.Namespace(**vars(pretrain_args(root, pipeline, size=32)), batch_size=6, num_workers=0,
                                  accum_iter=1)
        dataset = build_pretrain_dataset(args, bad_images=BadImagesStub())
        loader = build_loader(dataset, argparse.Namespace(world_size=1, rank=0), args, pin_memory=False,
                              collate_fn=JpegBatch.collate if pipeline == 'nvjpeg' else None)
        loader.sampler.set_epoch(3)
        batches[pipeline] = [to_device(batch, torch.device('cpu')) for batch in loader]
    for tensor_batch, nvjpeg_batch in zip(*batches.values(), strict=True):
        assert nvjpeg_batch[0].shape == (6, 3, 32, 32) and nvjpeg_batch[0].dtype == torch.uint8
        difference = (nvjpeg_batch[0].float() - tensor_batch[0].float()).abs()
        assert difference.max() <= MAX_DIFFERENCE['bicubic'] and difference.mean() < 0.3
        assert torch.equal(nvjpeg_batch[1], tensor_batch[1])


class BadImagesStub:
    def record(self, error):
        pass


def test_device_decoding_falls_back_per_image_then_names_the_file(tmp_path):
    good = Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    good.save(tmp_path / 'good.jpg')
    jpeg = read_jpeg_or_decode(str(tmp_path / 'good.jpg'))
    assert isinstance(jpeg, EncodedJpeg) and (jpeg.height, jpeg.width) == (16, 24)
    broken = EncodedJpeg(torch.frombuffer(bytearray(b'\xff\xd8\xff' + bytes(100) + b'\xff\xd9'), dtype=torch.uint8),
                         16, 24, 'broken.jpg')
    with pytest.raises(UsageError, match='unreadable image broken.jpg: .*--input_pipeline tensor'):
        decode_jpegs_on([jpeg, broken, jpeg], 'cpu')
    images = decode_jpegs_on([jpeg, jpeg], 'cpu')
    assert all(torch.equal(image, load_rgb_tensor(str(tmp_path / 'good.jpg'))) for image in images)


def test_crop_flip_leaves_the_global_generators_alone(demo_root):
    dataset = build_pretrain_dataset(pretrain_args('demo', 'tensor'))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = dataset[(2, 0)][0]
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    assert torch.equal(dataset[(2, 0)][0], first)


def test_nvjpeg_is_refused_where_it_cannot_decode(monkeypatch, capsys):
    args = argparse.Namespace(input_pipeline='nvjpeg', align=False)
    check_input_pipeline(args, torch.device('cpu'))  # runs, and says where it decodes
    assert capsys.readouterr().out.startswith('note: --input_pipeline nvjpeg on the CPU decodes in the training process')
    with pytest.raises(UsageError, match='nvjpeg decodes on CUDA GPUs only, not on mps: use tensor'):
        check_input_pipeline(args, torch.device('mps'))
    with pytest.raises(UsageError, match='another device cannot reproduce: leave it out under --align'):
        check_input_pipeline(argparse.Namespace(input_pipeline='nvjpeg', align=True), torch.device('cuda'))
    monkeypatch.setattr(util.images, 'decode_jpeg', None)
    with pytest.raises(UsageError, match=r"nvjpeg decodes with torchvision's JPEG decoder, which torchvision "
                                         r"\S+ no longer has: use --input_pipeline tensor"):
        check_input_pipeline(args, torch.device('cuda'))


def test_unknown_pipeline_is_one_line():
    with pytest.raises(UsageError, match='--input_pipeline must be one of tensor, pil, nvjpeg'):
        CropFlip(32, pipeline='dali')


def test_default_workers_share_the_cores(monkeypatch):
    monkeypatch.setattr('os.sched_getaffinity', lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert default_num_workers() == 16
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '8')
    assert default_num_workers() == 10  # the former default, where it gives more
    monkeypatch.setattr('os.sched_getaffinity', lambda pid: {0, 1}, raising=False)
    assert default_num_workers() == 2
