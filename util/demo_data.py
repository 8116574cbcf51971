"""The built-in demo data set (`--data_path demo`): small pictures of ten kinds of shapes.

Each 64x64 image shows one shape of its class (disk, square, triangle, ring, cross, star,
bar, checkerboard, stripes, pair of disks) with a random colour, size, position and rotation
on a dark random two-colour gradient with pixel noise, so that pre-training has structure to
learn and a classifier has to look at shape, not colour. The shape is always lighter than its
background: with shapes darker or lighter at random (version 1), a small ViT stayed at chance
for hundreds of steps, which made the demo useless for showing fine-tuning. The set is generated from fixed seeds, so
it is the same everywhere, written once as an ImageFolder (`train/`, `val/`) into a cache
directory and reused; generation takes a few seconds.
"""
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from util.errors import UsageError
from util.output_dir import current_umask

CLASSES = ('disk', 'square', 'triangle', 'ring', 'cross', 'star', 'bar', 'checkerboard', 'stripes',
           'two_disks')
IMAGE_SIZE = 64
SPLITS = {'train': 200, 'val': 50}  # images per class
VERSION = 2  # bump when the generator changes, so that old caches are not reused
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges


def default_cache_dir():
    """$MIM_DEMO_DIR (a `~` in it expanded: Docker's ENV and systemd leave it as it is), else
    $XDG_CACHE_HOME/masked-image-modeling/demo-v<VERSION> (where absolute: the XDG rule), else the
    same under ~/.cache. Without a home folder (no $HOME, no passwd entry: a container's numeric
    user), a UsageError: the set went to a folder named `~` in the working directory."""
    if os.environ.get('MIM_DEMO_DIR'):
        return os.path.expanduser(os.environ['MIM_DEMO_DIR'])
    cache_home = os.environ.get('XDG_CACHE_HOME', '')
    if not os.path.isabs(cache_home):
        home = os.path.expanduser('~')
        if home == '~':
            raise UsageError('no home folder to keep the demo data set in ($HOME is unset, and this user has none): '
                             'set $MIM_DEMO_DIR to a folder you can write to')
        cache_home = os.path.join(home, '.cache')
    return os.path.join(cache_home, 'masked-image-modeling', f'demo-v{VERSION}')


def _polygon(cx, cy, radius, corners, angle, inner_ratio=None):
    """Vertices of a regular polygon, or of a star when inner_ratio is given."""
    points = []
    steps = corners * (2 if inner_ratio else 1)
    for k in range(steps):
        r = radius * (inner_ratio if inner_ratio and k % 2 else 1.0)
        a = angle + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _rotated_rect(cx, cy, half_w, half_h, angle):
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos)
            for x, y in ((-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h))]


def _draw_shape(name, rng):
    """Alpha mask (IMAGE_SIZE, IMAGE_SIZE) in [0, 1] of one shape of class `name`."""
    size = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new('L', (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    radius = rng.uniform(0.22, 0.38) * size
    margin = radius * 1.05
    cx, cy = rng.uniform(margin, size - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)

    if name == 'disk':
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
    elif name == 'square':
        draw.polygon(_polygon(cx, cy, radius, 4, angle), fill=255)
    elif name == 'triangle':
        draw.polygon(_polygon(cx, cy, radius, 3, angle), fill=255)
    elif name == 'ring':
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=255)
        inner = radius * rng.uniform(0.45, 0.65)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name == 'cross':
        arm = radius * rng.uniform(0.22, 0.32)
        draw.polygon(_rotated_rect(cx, cy, radius, arm, angle), fill=255)
        draw.polygon(_rotated_rect(cx, cy, arm, radius, angle), fill=255)
    elif name == 'star':
        draw.polygon(_polygon(cx, cy, radius, 5, angle, inner_ratio=0.42), fill=255)
    elif name == 'bar':
        draw.polygon(_rotated_rect(cx, cy, radius, radius * rng.uniform(0.12, 0.2), angle), fill=255)
    elif name in ('checkerboard', 'stripes'):
        # a square patch filled with a pattern of alternating cells or bands
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
        v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
        inside = (np.abs(u) < radius) & (np.abs(v) < radius)
        period = radius * rng.uniform(0.5, 0.7)
        bands = np.floor(u / period).astype(int)
        if name == 'checkerboard':
            bands = bands + np.floor(v / period).astype(int)
        canvas = Image.fromarray(((inside & (bands % 2 == 0)) * 255).astype(np.uint8))
    elif name == 'two_disks':
        small = radius * 0.45
        offset = radius - small
        for sign in (-1, 1):
            x, y = cx + sign * offset * math.cos(angle), cy + sign * offset * math.sin(angle)
            draw.ellipse([x - small, y - small, x + small, y + small], fill=255)
    else:
        raise ValueError(f'unknown demo class {name!r}')
    small_canvas = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(small_canvas, dtype=np.float32) / 255.0


def _background(rng):
    """A dark linear gradient between two random colours in a random direction, with pixel noise."""
    c0, c1 = rng.uniform(0, 100, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / (IMAGE_SIZE - 1)
    t = np.clip(0.5 + (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle), 0, 1)[..., None]
    return c0 * (1 - t) + c1 * t + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))


def _foreground_colour(rng):
    """A random light colour: every channel brighter than any background can be."""
    return rng.uniform(150, 255, size=3)


def render_image(class_index, seed):
    """One demo image (IMAGE_SIZE, IMAGE_SIZE, 3) uint8 of class `class_index`."""
    rng = np.random.default_rng(seed)
    background = _background(rng)
    colour = _foreground_colour(rng)
    alpha = _draw_shape(CLASSES[class_index], rng)[..., None]
    image = background * (1 - alpha) + colour * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write_split(root, split, per_class, split_seed):
    for c, name in enumerate(CLASSES):
        class_dir = os.path.join(root, split, f'{c:02d}_{name}')
        os.makedirs(class_dir)
        for i in range(per_class):
            image = render_image(c, seed=[VERSION, split_seed, c, i])
            Image.fromarray(image).save(os.path.join(class_dir, f'{i:04d}.png'))


def ensure_demo_dataset(root=None):
    """Generate the demo set unless `root` already holds it; return `root`.

    Generation happens in a temporary directory that is renamed into place at the end, so
    several processes (torchrun ranks, parallel tests) can call this at once and an
    interrupted generation never leaves a half-written set behind.
    """
    root = root or default_cache_dir()
    if os.path.isdir(os.path.join(root, 'val')):
        return root
    # the set is renamed into place as a whole, which a folder of other files refuses (another process may
    # have just renamed its set there: looked at again)
    if os.path.isdir(root) and os.listdir(root) and not os.path.isdir(os.path.join(root, 'val')):
        raise UsageError(f'cannot write the demo data set in {root}: it holds other files, and the set is made as a '
                         f'folder of its own: set $MIM_DEMO_DIR to a new or empty folder')
    print(f'generating the demo data set in {root} (once; a few seconds)', flush=True)
    parent = os.path.dirname(os.path.abspath(root))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix='.demo-', dir=parent)
    except OSError as e:
        raise cannot_write(root, e) from None
    try:
        for split_seed, (split, per_class) in enumerate(SPLITS.items()):
            _write_split(tmp, split, per_class, split_seed)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide a shared $MIM_DEMO_DIR from others
        os.rename(tmp, root)
    except OSError as e:
        if not os.path.isdir(os.path.join(root, 'val')):  # not another process that won the race
            raise cannot_write(root, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def cannot_write(root, error):
    return UsageError(f'cannot write the demo data set in {root} ({error.strerror or error}): set $MIM_DEMO_DIR to a '
                      f'folder you can write to')
