"""Helpers for the tests: run an entry point as a user would, read its logs."""
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(module_name, *argv):
    """An entry point (main_pretrain, main_finetune) with these arguments, in this process.
    returns: what its main() returns"""
    import importlib
    import warnings
    import torch
    from util.output_dir import release_output_dir_locks
    module = importlib.import_module(module_name)
    # what a run switches on for its whole process (--align: deterministic kernels, full-precision
    # fp32 matmuls, a warnings hook), put back for the tests that follow
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    matmul_precision, showwarning = torch.get_float32_matmul_precision(), warnings.showwarning
    try:
        return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))
    finally:  # as when its process ends: a later run in the same folder may be another process
        release_output_dir_locks()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_float32_matmul_precision(matmul_precision)
        warnings.showwarning = showwarning


# The run that the resumption tests stop and resume (with --data_path and --batch_size): every step
# logged, a warm-up epoch then a cosine, so that a resumption that lost the lr's place shows.
RESUMABLE = ['--model', 'mae_vit_tiny', '--num_workers', 0, '--device', 'cpu', '--log_freq', 1, '--epochs', 3,
             '--warmup_epochs', 1, '--blr', 1e-3]


def losses_by_step(output_dir):
    """{step: loss} of a run's log.jsonl (a resumed run's repeated steps: the later one)."""
    return {r['step']: r['loss'] for r in read_jsonl(os.path.join(output_dir, 'log.jsonl'))}


def run_pretrain(*argv):
    return run_main('main_pretrain', *argv)


def run_finetune(*argv):
    return run_main('main_finetune', *argv)


def run_script(*argv, env=None, timeout=600, cwd=REPO):
    """A command in a subprocess, from the repository root unless `cwd` says, the ModelZoo scripts
    running this interpreter ($PYTHON); returns CompletedProcess."""
    full_env = {**os.environ, 'PYTHON': sys.executable, **(env or {})}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def color_pixels(image_path, color, box=None):
    """(rows, columns) of the pixels of exactly `color` ('#rrggbb') in an image, only those inside
    box (left, top, right, bottom) when given."""
    import numpy as np
    from PIL import Image
    with Image.open(image_path) as image:
        pixels = np.asarray(image.convert('RGB'))
    mask = (pixels == [int(color[i:i + 2], 16) for i in (1, 3, 5)]).all(axis=-1)
    if box is not None:
        left, top, right, bottom = box
        inside = np.zeros_like(mask)
        inside[top:bottom, left:right] = True
        mask &= inside
    return np.nonzero(mask)


def columns_covered(columns, box, slices=20):
    """In how many of `slices` equal slices of the box's width at least one of the columns lies."""
    left, _, right, _ = box
    return len({int((c - left) * slices // (right - left)) for c in columns})


def run_demo_pretraining(model, output_dir, blr=1e-3, max_steps=None, log_freq=3):
    """The demo with a tiny pre-training model at a demo learning rate: one epoch of 64-image
    batches, a log line every 5 steps; or, with max_steps, that many steps of 32 images, a log
    line every `log_freq`. returns: output_dir"""
    schedule = ['--batch_size', 32, '--max_steps', max_steps, '--log_freq', log_freq] if max_steps else \
        ['--log_freq', 5]
    run_pretrain('--model', model, '--data_path', 'demo', '--epochs', 1, '--warmup_epochs', 0, '--blr', blr,
                 *schedule, '--num_workers', 0, '--device', 'cpu', '--output_dir', output_dir)
    return output_dir


def finetune_demo_checkpoint(pretraining_dir, output_dir, data_path):
    """Three fine-tuning steps from a demo pre-training's last checkpoint, with the recipe that
    comes with it (its classifier included), on `data_path` (conftest's small_folder: the
    evaluation at the end reads 17 images, not the demo's 500); returns the steps of log.jsonl."""
    run_finetune('--finetune', os.path.join(pretraining_dir, 'checkpoint-last.pth'), '--data_path', data_path,
                 '--batch_size', 16, '--epochs', 1, '--max_steps', 3, '--log_freq', 1, '--num_workers', 0,
                 '--device', 'cpu', '--output_dir', output_dir)
    steps = read_jsonl(os.path.join(output_dir, 'log.jsonl'))
    assert len(steps) == 3 and steps[-1]['lr'] > 0
    return steps


def assert_loss_fell(output_dir):
    """The last logged loss of a run is below 80 % of its first."""
    steps = read_jsonl(os.path.join(output_dir, 'log.jsonl'))
    assert len(steps) >= 6
    assert steps[-1]['loss'] < 0.8 * steps[0]['loss']


def formula_state(shapes):
    """Deterministic weights by name, for golden values computed with the official code of a
    method: the i-th name in sorted order gets a sine wave of phase i; layer scales near 0.1,
    norm weights near 1, everything else of amplitude 0.05.
    shapes: {name: shape}"""
    import torch
    out = {}
    for i, k in enumerate(sorted(shapes)):
        wave = torch.sin(torch.arange(math.prod(shapes[k]), dtype=torch.float64) * 0.37 + i).reshape(shapes[k])
        if k.endswith(('gamma_1', 'gamma_2')):
            out[k] = (0.1 + 0.01 * wave).float()
        elif '.' in k and 'norm' in k.split('.')[-2] and k.endswith('weight'):
            out[k] = (1 + 0.1 * wave).float()
        else:
            out[k] = (0.05 * wave).float()
    return out


def disk_full(obj, f):
    """A stand-in for torch.save on a full disk: part of the file written, then ENOSPC."""
    with open(f, 'wb') as out:
        out.write(b'partial')
    raise OSError(28, 'No space left on device')


# The one line a save that met a full disk ends with (util.checkpoint.atomic_save).
NO_SPACE = r'cannot write .*checkpoint-last.pth \(\[Errno 28\] No space left on device\); the previous file is intact'


def write_broken_files(folder):
    """A truncated JPEG, a zero-byte file and a text file, each named like an image.
    returns: their paths"""
    from PIL import Image
    import numpy as np
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(folder / 'whole.jpg', quality=90)
    data = (folder / 'whole.jpg').read_bytes()
    (folder / 'whole.jpg').unlink()
    paths = [folder / 'truncated.jpg', folder / 'empty.jpg', folder / 'text.png']
    paths[0].write_bytes(data[:len(data) // 3])
    paths[1].write_bytes(b'')
    paths[2].write_text('not an image')
    return [str(p) for p in paths]


def official_simmim_keys(kind, width=None):
    """The keys an official SimMIM checkpoint is named by, at a released size (Swin-B: 128 wide, 18
    blocks in stage 3; ViT-B: 768 wide, 12 blocks) or another `width`, as stubs: {'model': ...}."""
    import torch
    width = width or {'swin': 128, 'vit': 768}[kind]
    blocks, count = {'swin': ('encoder.layers.2.blocks.', 18), 'vit': ('encoder.blocks.', 12)}[kind]
    state = {'encoder.mask_token': torch.zeros(1, 1, width), 'decoder.0.weight': torch.zeros(1),
             'encoder.patch_embed.proj.weight': torch.zeros(width, 3, 4, 4)}
    state.update({f'{blocks}{i}.norm1.weight': torch.zeros(width) for i in range(count)})
    return {'model': state}
