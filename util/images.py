"""Reading images, and what happens when one cannot be read.

`load_rgb` decodes any image Pillow reads into 8-bit RGB (grayscale, CMYK, palette, RGBA and
16-bit images are converted) or raises `UnreadableImage` (truncated, corrupt, zero-byte, not an
image). During training such an image is replaced by another sample (util.datasets), and the
data-loader worker that met it records it in a `BadImages` file of its process; the training
process reads those files at its log steps, reports each file once, counts the replacements in
log.jsonl and stops the run past --max_bad_images. In evaluation an unreadable image is an error.

`load_rgb_tensor` is the fast input path's reader: libjpeg-turbo through torchvision for the
common JPEG, `load_rgb` for everything else, so the verdict on an odd or broken file is Pillow's.
`read_jpeg_or_decode` is the reader of the path that decodes on the GPU: a plain JPEG stays
bytes (`EncodedJpeg`), decoded later in a batch on the device (util.datasets.JpegBatch); anything
else is decoded here by `load_rgb_tensor`.
"""
import io
import os
import re
import tempfile
import uuid
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

try:  # deprecated since torchvision 0.29 (for TorchCodec): a release without it decodes by Pillow, slower
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

from util.errors import UsageError, first_line, say_on_this_rank

# What Pillow raises for files it cannot decode: OSError (truncated, unidentified, zero bytes),
# SyntaxError and ValueError (corrupt headers), DecompressionBombError (absurd sizes).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
DEFAULT_MAX_BAD_IMAGES = 100


class UnreadableImage(Exception):
    """An image file that could not be decoded: str is 'path: reason'."""

    def __init__(self, path, reason):
        super().__init__(f'{path}: {reason}')
        self.path, self.reason = path, reason


def to_rgb(img):
    """8-bit RGB of a decoded Pillow image: 16-bit (and 32-bit integer) grayscale keeps its top 8
    bits, floating-point grayscale (a 32-bit TIFF) is read as 0-1 where it stays within 1, else as
    0-255, palette images go through RGBA, alpha is dropped (as torchvision's loader does)."""
    if img.mode.startswith('I'):  # 'I;16*' or 'I': integer grayscale, up to 16 bits of range
        values = np.asarray(img, dtype=np.int64)
        if img.mode.startswith('I;16') or values.max(initial=0) > 255:
            values = values >> 8
        img = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), mode='L')
    elif img.mode == 'F':  # Pillow's own conversion clips it to 0-255: an image in 0-1 became black
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        values = values * 255 if values.max(initial=0) <= 1 else values
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode='L')
    elif img.mode == 'P':
        img = img.convert('RGBA')
    return img if img.mode == 'RGB' else img.convert('RGB')


def load_rgb(path, data=None):
    """The image at `path` (or its bytes `data`, already read from it) in 8-bit RGB;
    UnreadableImage when it cannot be decoded."""
    try:
        with open(path, 'rb') if data is None else io.BytesIO(data) as f:
            img = Image.open(f)
            img.load()
        return to_rgb(img)
    except DECODE_ERRORS as e:
        # Pillow names the file object it read ("cannot identify image file <_io.BytesIO object at
        # 0x7f...>"): the path is said beside the reason already
        raise UnreadableImage(path, FILE_OBJECT.sub('', first_line(e)).strip()) from None


FILE_OBJECT = re.compile(r"\s*<_io\.\w+ (?:name=.*?|object at 0x[0-9a-f]+)>")


def rgb_tensor(img):
    """A Pillow RGB image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def file_bytes(path):
    """The bytes of a file as a uint8 array, or None when it cannot be read (load_rgb names why)."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None


JPEG_START = b'\xff\xd8\xff'


def load_rgb_tensor(path, data=None):
    """The image at `path` as 8-bit RGB, a (3, H, W) uint8 tensor; UnreadableImage when it cannot
    be decoded. A JPEG of 1 or 3 channels is decoded by torchvision straight into a tensor
    (libjpeg-turbo, as fast as Pillow's and the same pixels, without a copy out of a Pillow image);
    anything else, or a JPEG that torchvision refuses (truncated, CMYK), goes through load_rgb,
    which converts or rejects it, as does every image where torchvision has no JPEG decoder.
    `data`: the file's bytes, when already read."""
    data = file_bytes(path) if data is None else data
    if decode_jpeg is not None and data is not None and data[:len(JPEG_START)].tobytes() == JPEG_START:
        try:
            image = decode_jpeg(torch.from_numpy(data), mode=ImageReadMode.UNCHANGED)
            if image.shape[0] in (1, 3):
                return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image
        except RuntimeError:
            pass  # Pillow decides: it reads some files libjpeg-turbo refuses, and names the fault of the others
    return rgb_tensor(load_rgb(path))  # from the file: Pillow's message names it


JPEG_END = b'\xff\xd9'


class EncodedJpeg(NamedTuple):
    """A JPEG file's bytes, left for the device to decode, and its size read from the header."""
    data: torch.Tensor  # (bytes,) uint8
    height: int
    width: int
    path: str


def read_jpeg_or_decode(path):
    """An `EncodedJpeg` for a complete 8-bit grayscale or RGB JPEG (its header read by Pillow, the
    pixels not decoded), else the image decoded here by `load_rgb_tensor`, (3, H, W) uint8: a file
    whose last bytes are not the end-of-image marker (truncated, or trailing data), CMYK, other
    formats, or an unreadable file (UnreadableImage), so that a broken file is still met, and
    replaced, in the data-loader worker."""
    data = file_bytes(path)
    if data is not None and data[:len(JPEG_START)].tobytes() == JPEG_START and \
            data[-len(JPEG_END):].tobytes() == JPEG_END:
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.mode in ('L', 'RGB'):
                    return EncodedJpeg(torch.from_numpy(data), img.height, img.width, path)
        except DECODE_ERRORS:
            pass  # load_rgb_tensor names the fault
    return load_rgb_tensor(path, data)


def require_jpeg_decoder(what):
    """UsageError naming `what` unless this torchvision still has its JPEG decoder."""
    if decode_jpeg is None:
        import torchvision
        raise UsageError(f'{what} decodes with torchvision\'s JPEG decoder, which torchvision '
                         f'{torchvision.__version__} no longer has: use --input_pipeline tensor')


_DECODE_STREAMS = {}  # CUDA device -> the side stream that decode_jpegs_on decodes on


def decode_jpegs_on(jpegs, device):
    """The images of a list of `EncodedJpeg`, decoded together on `device` (nvJPEG on a GPU; the
    CPU decodes them with libjpeg-turbo). A batch nvJPEG refuses is decoded one image at a time,
    and an image it refuses by Pillow on the host.

    On a GPU the decoding runs with a stream of its own current: torchvision's decoder allocates
    its output on the current stream but writes it from another stream that does not wait for
    the current one, so on the training stream it could overwrite memory that queued kernels are
    still to read (seen as a NaN loss; pytorch/vision#9606). The side stream's memory holds
    decoded images only; the caller's stream waits for the decoding, and the images are marked
    as in use there, so that their memory is not handed to the next batch's decoding too early.
    returns: [(3, H, W) uint8 on `device`]"""
    device = torch.device(device)
    if device.type != 'cuda':
        return decode_jpegs_where_possible(jpegs, device)
    current = torch.cuda.current_stream(device)
    stream = _DECODE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    with torch.cuda.stream(stream):
        images = decode_jpegs_where_possible(jpegs, device)
    current.wait_stream(stream)
    for image in images:
        image.record_stream(current)
    return images


def decode_jpegs_where_possible(jpegs, device):
    try:
        return decode_jpeg([j.data for j in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        if len(jpegs) > 1:
            return [image for j in jpegs for image in decode_jpegs_where_possible([j], device)]
    try:
        return [rgb_tensor(load_rgb(jpegs[0].path, jpegs[0].data.numpy())).to(device)]
    except UnreadableImage as e:
        raise UsageError(f'unreadable image {e} (use --input_pipeline tensor, whose workers replace such images, '
                         f'or repair or remove the file)') from None


def one_field(text):
    """`text` as one field of a line of UTF-8 text: bytes of a file name that are not UTF-8 (Python's
    surrogates) as \\udcXX, a tab or a line break in it as \\t, \\n, \\r (they would split the line)."""
    text = text.encode('utf-8', 'backslashreplace').decode('utf-8')
    return text.replace('\t', '\\t').replace('\n', '\\n').replace('\r', '\\r')


class AlreadyCounted:
    """In place of a BadImages for a pass over train/ beside the training's own (pre-training's
    k-NN bank): an unreadable image, which the training replaces, names and counts, is replaced
    there too, and neither named nor counted again."""

    def record(self, error):
        pass


class BadImages:
    """The images a process's data-loader workers could not read: one line per replacement
    ('path<TAB>reason') appended to <directory>/bad_images.rank<R>.txt by the workers (appends of
    one short line do not interleave), read back by the training process with `poll`."""

    def __init__(self, directory, rank):
        # without an output folder, a temporary one, made by the first record: a run whose images
        # are all readable leaves nothing behind
        directory = directory or os.path.join(tempfile.gettempdir(), f'bad-images-{uuid.uuid4().hex}')
        self.path = os.path.join(directory, f'bad_images.rank{rank}.txt')
        self.offset = 0
        self.replacements = 0
        self.files = {}  # path -> reason, in the order met

    @classmethod
    def of_run(cls, output_dir, rank):
        """The record of a run in output_dir (a temporary folder without one); an earlier
        invocation's lines in it are not counted again."""
        record = cls(output_dir, rank)
        record.offset = os.path.getsize(record.path) if os.path.exists(record.path) else 0
        return record

    def record(self, error):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, 'a') as f:
            f.write(f'{one_field(error.path)}\t{one_field(error.reason)}\n')

    def poll(self):
        """Read what the workers recorded since the last poll; print each new file once.
        returns: replacements in this process since the run started"""
        if not os.path.exists(self.path):
            return self.replacements
        with open(self.path) as f:
            f.seek(self.offset)
            lines = f.readlines()
            self.offset = f.tell()
        for line in lines:
            path, _, reason = line.rstrip('\n').partition('\t')
            self.replacements += 1
            if path not in self.files:  # each rank names its own: print() is rank 0's alone
                self.files[path] = reason
                say_on_this_rank(f'unreadable image replaced by another sample: {path} ({reason})', 'warning')
        return self.replacements

    def check(self, total, limit):
        """Stop the run when more than `limit` samples were replaced in all processes together."""
        if total > limit:
            where = f'{", ".join(list(self.files)[:5])} (all in {self.path})' if self.files else \
                f'none by this process (the others list theirs in {os.path.dirname(self.path)}/bad_images.rank<R>.txt)'
            raise UsageError(f'{total} unreadable images were replaced, more than --max_bad_images {limit}: {where}; '
                             f'repair or remove them, or raise --max_bad_images')
