"""The one place that knows the devices: CUDA GPUs, Ascend NPUs (torch_npu), Tecorigin SDAA
(torch_sdaa), Apple MPS and the CPU.

`resolve_device('auto' | 'cuda' | 'npu' | 'sdaa' | 'mps' | 'cpu')` returns a `Device` that answers
everything the rest of the code needs: the torch.device, autocast, the GradScaler, the
distributed backend, synchronize and peak memory. The vendor plugins are imported only when
their device is asked for (or probed by 'auto'); a missing plugin or device is a UsageError
that names what to install.
"""
import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

from util.errors import UsageError, first_line

# What each accelerator needs beyond torch, and its collective-communication backend.
_PLUGINS = {'npu': 'torch_npu', 'sdaa': 'torch_sdaa'}
_INSTALL_HINTS = {
    'npu': 'install the Ascend plugin (pip install torch-npu, matching your CANN and torch versions)',
    'sdaa': "install Tecorigin's torch_sdaa plugin from the Tecorigin SDK (TecoPyTorch)",
    'cuda': 'install a CUDA build of PyTorch and check that nvidia-smi sees a GPU',
    'mps': 'use an Apple-silicon Mac with macOS 12.3 or newer and a PyTorch build with MPS',
}
_BACKENDS = {'cuda': 'nccl', 'npu': 'hccl', 'sdaa': 'tccl', 'mps': 'gloo', 'cpu': 'gloo'}
# The variable that picks the cards a process sees (the ModelZoo scripts set it for one card).
VISIBLE_DEVICES = {'cuda': 'CUDA_VISIBLE_DEVICES', 'npu': 'ASCEND_RT_VISIBLE_DEVICES', 'sdaa': 'SDAA_VISIBLE_DEVICES'}
AUTO_ORDER = ('npu', 'sdaa', 'cuda', 'mps', 'cpu')
PRECISIONS = ('auto', 'bf16', 'fp16', 'fp32')
_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def _accelerator_module(device_type):
    """torch.cuda, torch.npu, torch.sdaa or torch.mps; None for the CPU."""
    return None if device_type == 'cpu' else getattr(torch, device_type, None)


def _import_plugin(device_type):
    """Import the vendor plugin of a device.

    returns: None when imported (or none is needed), else why not: 'missing' when it is not
    installed, or the first line of the error an installed but broken plugin raised (torch_npu
    without its CANN libraries, say, fails with OSError or RuntimeError, not ImportError).
    """
    plugin = _PLUGINS.get(device_type)
    if plugin is None:
        return None
    try:
        importlib.import_module(plugin)
    except ModuleNotFoundError as e:
        return 'missing' if e.name == plugin else f'{type(e).__name__}: {e}'
    except Exception as e:  # noqa: BLE001 - any failure inside a vendor plugin
        return f'{type(e).__name__}: {first_line(e)}'
    return None


def _is_available(device_type):
    if device_type == 'cpu':
        return True
    problem = _import_plugin(device_type)
    if problem is not None:
        if problem != 'missing':
            warnings.warn(f'{_PLUGINS[device_type]} is installed but does not import ({problem}); '
                          f'--device auto skips {device_type}')
        return False
    module = _accelerator_module(device_type)
    return module is not None and module.is_available()


@dataclass
class Device:
    """One process's device and what the training code asks of it."""
    type: str            # 'cuda', 'npu', 'sdaa', 'mps' or 'cpu'
    index: int | None    # local device index (LOCAL_RANK) on accelerators with several devices

    @property
    def torch_device(self):
        return torch.device(self.type if self.index is None else f'{self.type}:{self.index}')

    @property
    def module(self):
        return _accelerator_module(self.type)

    @property
    def dist_backend(self):
        return _BACKENDS[self.type]

    def supports_bf16(self):
        if self.type == 'cpu':
            return True
        is_supported = getattr(self.module, 'is_bf16_supported', None)
        return bool(is_supported()) if is_supported is not None else False

    def resolve_precision(self, precision):
        """'auto' is bf16 where the accelerator supports it, else fp16; fp32 on the CPU, whose
        bf16 kernels are slower than fp32 on most processors."""
        if precision not in PRECISIONS:
            raise UsageError(f'--precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
        if precision != 'auto':
            return precision
        if self.type == 'cpu':
            return 'fp32'
        return 'bf16' if self.supports_bf16() else 'fp16'

    def autocast(self, precision):
        """Autocast context for a resolved precision; fp32 is a no-op."""
        if precision == 'fp32':
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=_DTYPES[precision])

    def grad_scaler(self, precision):
        """A GradScaler for fp16 (its small exponent range needs loss scaling); None otherwise."""
        if precision != 'fp16':
            return None
        vendor_amp = getattr(self.module, 'amp', None) if self.type in _PLUGINS else None
        if vendor_amp is not None and hasattr(vendor_amp, 'GradScaler'):
            return vendor_amp.GradScaler()
        return torch.amp.GradScaler(self.type)

    def supports_fused_adamw(self):
        return self.type in ('cuda', 'cpu')

    def use_deterministic_algorithms(self):
        """Same inputs, same outputs on this device, run after run (for --align): deterministic
        kernels (a warning, not an error, where an op has none), full-precision fp32 matmuls and
        convolutions (no TF32), no benchmark-mode kernel choice, and deterministic collectives on
        Ascend. Call before the process group and the first matmul: the two environment
        variables are read when HCCL and cuBLAS start."""
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.set_float32_matmul_precision('highest')
        if self.type == 'cuda':
            os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.allow_tf32 = False
        if self.type == 'npu':
            os.environ.setdefault('HCCL_DETERMINISTIC', 'true')

    def use_fast_fp32(self):
        """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and newer): about 8x
        the fp32 throughput at a 10-bit mantissa, the trade every fp32 training recipe on such GPUs
        makes. Not with --align, which wants exact fp32 (use_deterministic_algorithms)."""
        if self.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def synchronize(self):
        if self.module is not None and hasattr(self.module, 'synchronize'):
            self.module.synchronize()

    def max_memory_allocated(self):
        """Peak bytes allocated on this device by this process; 0 where no peak is tracked
        (the CPU; MPS, which reports only current usage)."""
        if self.type in ('cuda', 'npu', 'sdaa'):
            return self.module.max_memory_allocated(self.torch_device)
        return 0


def local_rank_from_env():
    value = os.environ.get('LOCAL_RANK', '0')
    if not value.isdigit():
        raise UsageError(f'LOCAL_RANK must be a whole number 0 or more, got {value!r}')
    return int(value)


def resolve_device(name='auto', local_rank=None):
    """Pick the device for this process and make it the current one.

    name: 'auto' (the first present of npu, sdaa, cuda, mps, cpu) or one of them explicitly
    local_rank: index of this process on its machine; default: $LOCAL_RANK (torchrun sets it)
    """
    if name == 'auto':
        name = next(t for t in AUTO_ORDER if _is_available(t))
    if name not in _BACKENDS:
        raise UsageError(f'--device must be auto, {", ".join(AUTO_ORDER)}; got {name!r}')
    problem = _import_plugin(name)
    if problem == 'missing':
        raise UsageError(f'--device {name} needs the {_PLUGINS[name]} package: {_INSTALL_HINTS[name]}')
    if problem is not None:
        raise UsageError(f'--device {name}: {_PLUGINS[name]} is installed but fails to import ({problem}); '
                         f'check that its driver/toolkit environment is set up (e.g. source its set_env.sh)')
    if not _is_available(name):
        hidden = os.environ.get(VISIBLE_DEVICES.get(name, ''))
        if hidden is not None:  # '' or '-1' hide every card: the install hint would point the wrong way
            raise UsageError(f'--device {name} was asked for but no {name} device is available, and '
                             f'{VISIBLE_DEVICES[name]} is {hidden!r}, which hides the cards that are not in it: unset '
                             f'it, or name the cards to use')
        raise UsageError(f'--device {name} was asked for but no {name} device is available: '
                         f'{_INSTALL_HINTS[name]}, or choose another --device')

    if name in ('cpu', 'mps'):
        return Device(name, None)
    local_rank = local_rank_from_env() if local_rank is None else local_rank
    if local_rank < 0:
        raise UsageError(f'the local rank must be 0 or more, got {local_rank}: check LOCAL_RANK')
    count = _accelerator_module(name).device_count()
    if local_rank >= count:
        raise UsageError(f'local rank {local_rank} needs {local_rank + 1} {name} devices, '
                         f'but {count} are visible: start fewer processes per node')
    _accelerator_module(name).set_device(local_rank)
    if name == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    return Device(name, local_rank)
