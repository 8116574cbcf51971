"""What --align needs beyond the device's deterministic mode: a record of the ops that ran without
a deterministic kernel, for the run's closing line, a fingerprint of the starting weights and
data that two runs compare, and stochastic depth switched off."""
import hashlib
import warnings

import torch
from timm.layers import DropPath


# What --align's warn_only deterministic mode warned about: ops that ran without a deterministic
# kernel (the first line of each warning), for the run's closing lines.
NONDETERMINISTIC_OPS = []


def watch_nondeterministic_kernels():
    """Note every warning of an op without a deterministic implementation (warn_only mode warns
    instead of failing), so that the run's summary says so, not only a warning that scrolls away."""
    show = warnings.showwarning
    NONDETERMINISTIC_OPS.clear()

    def note_and_show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if 'deterministic' in text and text.splitlines()[0] not in NONDETERMINISTIC_OPS:
            NONDETERMINISTIC_OPS.append(text.splitlines()[0])
        show(message, category, filename, lineno, file, line)
    warnings.showwarning = note_and_show


def alignment_summary():
    """The closing line of an --align run about its kernels."""
    if not NONDETERMINISTIC_OPS:
        return 'align: every kernel that ran was deterministic'
    return (f'align: WARNING: {len(NONDETERMINISTIC_OPS)} op(s) ran without a deterministic kernel, so two runs may '
            f'differ beyond rounding: {"; ".join(NONDETERMINISTIC_OPS)}')


def fingerprint(tensors):
    """A short hash of the values of some tensors (in the given order), to check that two runs,
    on two machines or devices, start from the same weights and read the same data."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def switch_off_drop_path(model):
    """Set every stochastic-depth rate of the model to 0, in place (SimMIM ViT's recipe pre-trains
    with drop path 0.1; no pre-training model here has dropout). The draws come from the device's
    generator, which no other device reproduces (CUDA's Philox, the NPU's own) and from which each
    process of a run draws on its own, so two runs could not see the same draws.
    returns: a line for the console, or None when the model has no drop path"""
    highest = 0.
    for module in model.modules():
        if isinstance(module, DropPath):
            highest, module.drop_prob = max(highest, module.drop_prob), 0.
    if highest > 0:
        return f'align: drop path (rates up to {highest:g}) switched off: the device draws it, and no other ' \
               f'device draws the same'
