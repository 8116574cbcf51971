"""The device shim (util/device.py) and the world set-up (util/dist.py) without the hardware.

Ascend NPUs and Tecorigin SDAA are faked: a plain module registered as `torch_npu` /
`torch_sdaa` in sys.modules (so the shim's lazy import succeeds) and a FakeAccelerator object
set as `torch.npu` / `torch.sdaa` that records what the shim asks of it. CUDA and MPS are
faked by patching single functions of torch.cuda / torch.mps. Everything goes through
pytest's monkeypatch, so no fake outlives its test.

An autouse fixture makes every test start from "no accelerator at all" (plugins not
importable, CUDA and MPS unavailable, no LOCAL_RANK), so the results are the same on a
laptop, a GPU box or an Ascend server.
"""
import contextlib
import importlib.abc
import json
import os
import select
import signal
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also works with a bare `pytest` run from anywhere
    sys.path.insert(0, str(REPO))

from util import device as device_shim  # noqa: E402
from util.device import Device, resolve_device  # noqa: E402
from util.dist import World, read_world_from_env  # noqa: E402
from util.errors import UsageError  # noqa: E402

PLUGINS = {'npu': 'torch_npu', 'sdaa': 'torch_sdaa'}
BACKENDS = {'npu': 'hccl', 'sdaa': 'tccl'}


# ----------------------------------------------------------------------------- fakes

class FakeGradScaler:
    """Stands for torch_npu's / torch_sdaa's own GradScaler (torch.npu.amp.GradScaler)."""


class FakeAccelerator:
    """What torch_npu installs as torch.npu (and torch_sdaa as torch.sdaa), reduced to the
    calls the shim makes; it records each of them."""

    def __init__(self, available=True, count=8, bf16=True, peak=123_456_789, amp=True):
        self._available, self._count, self._bf16, self._peak = available, count, bf16, peak
        self.set_device_calls = []
        self.synchronize_calls = 0
        self.memory_queries = []
        if amp:
            self.amp = types.SimpleNamespace(GradScaler=FakeGradScaler)

    def is_available(self):
        return self._available

    def device_count(self):
        return self._count

    def set_device(self, index):
        self.set_device_calls.append(index)

    def synchronize(self):
        self.synchronize_calls += 1

    def max_memory_allocated(self, device=None):
        self.memory_queries.append(device)
        return self._peak

    def is_bf16_supported(self):
        return self._bf16


def install_fake(monkeypatch, device_type, **kwargs):
    """Register a fake vendor plugin and its torch.<device_type> module; returns the fake."""
    fake = FakeAccelerator(**kwargs)
    monkeypatch.setitem(sys.modules, PLUGINS[device_type], types.ModuleType(PLUGINS[device_type]))
    monkeypatch.setattr(torch, device_type, fake, raising=False)
    return fake


class FakeCuda:
    """Patches torch.cuda's functions (not the module itself) and records set_device."""

    def __init__(self, monkeypatch, count=4, bf16=True, peak=42):
        self.set_device_calls = []
        self.memory_queries = []
        self.synchronize_calls = 0
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)
        monkeypatch.setattr(torch.cuda, 'set_device', self.set_device_calls.append)
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, 'synchronize', self._synchronize)
        monkeypatch.setattr(torch.cuda, 'max_memory_allocated', self._max_memory(peak))

    def _synchronize(self, *args):
        self.synchronize_calls += 1

    def _max_memory(self, peak):
        def max_memory_allocated(device=None):
            self.memory_queries.append(device)
            return peak
        return max_memory_allocated


@pytest.fixture(autouse=True)
def no_accelerators(monkeypatch):
    """Every test starts with no accelerator: the vendor plugins cannot be imported
    (sys.modules[name] = None makes `import name` raise ImportError), CUDA and MPS report
    unavailable, and LOCAL_RANK is unset."""
    for plugin in PLUGINS.values():
        monkeypatch.setitem(sys.modules, plugin, None)
    for device_type in PLUGINS:
        monkeypatch.delattr(torch, device_type, raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.mps, 'is_available', lambda: False)
    monkeypatch.delenv('LOCAL_RANK', raising=False)


def one_line(message):
    return '\n' not in str(message) and str(message).strip() == str(message)


# ------------------------------------------------------------------ resolve_device

@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
def test_vendor_device_explicit_local_rank(monkeypatch, device_type):
    fake = install_fake(monkeypatch, device_type)
    dev = resolve_device(device_type, local_rank=3)
    assert dev == Device(type=device_type, index=3)
    assert (dev.type, dev.index) == (device_type, 3)
    assert fake.set_device_calls == [3]
    assert dev.dist_backend == BACKENDS[device_type]
    assert dev.module is fake
    # torch.device(f'{device_type}:3') needs the real plugin (it renames torch's privateuse1
    # backend); that path is covered in a subprocess by test_torch_device_once_backend_renamed.


def test_cuda(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=4)
    dev = resolve_device('cuda', local_rank=1)
    assert dev == Device('cuda', 1)
    assert dev.torch_device == torch.device('cuda:1')
    assert cuda.set_device_calls == [1]
    assert dev.dist_backend == 'nccl'


def test_cpu():
    dev = resolve_device('cpu', local_rank=5)
    assert dev == Device('cpu', None)
    assert dev.torch_device == torch.device('cpu')
    assert dev.dist_backend == 'gloo'
    assert dev.module is None


def test_mps_has_no_index_and_uses_gloo(monkeypatch):
    monkeypatch.setattr(torch.mps, 'is_available', lambda: True)
    monkeypatch.setenv('LOCAL_RANK', '3')
    dev = resolve_device('mps')
    assert dev == Device('mps', None)
    assert dev.dist_backend == 'gloo'


@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
def test_local_rank_from_env(monkeypatch, device_type):
    fake = install_fake(monkeypatch, device_type)
    monkeypatch.setenv('LOCAL_RANK', '2')
    dev = resolve_device(device_type)
    assert dev.index == 2
    assert fake.set_device_calls == [2]


def test_explicit_local_rank_zero_beats_env(monkeypatch):
    fake = install_fake(monkeypatch, 'npu')
    monkeypatch.setenv('LOCAL_RANK', '2')
    assert resolve_device('npu', local_rank=0).index == 0   # 0 is falsy: must not fall back to env
    assert fake.set_device_calls == [0]


def test_no_local_rank_anywhere_is_zero(monkeypatch):
    fake = install_fake(monkeypatch, 'npu')
    assert resolve_device('npu').index == 0
    assert fake.set_device_calls == [0]


@pytest.mark.parametrize('present, expected', [
    (('npu', 'sdaa', 'cuda', 'mps'), 'npu'),
    (('sdaa', 'cuda', 'mps'), 'sdaa'),
    (('npu', 'cuda'), 'npu'),
    (('cuda', 'mps'), 'cuda'),
    (('mps',), 'mps'),
    ((), 'cpu'),
])
def test_auto_order(monkeypatch, present, expected):
    fakes = {t: install_fake(monkeypatch, t) for t in ('npu', 'sdaa') if t in present}
    if 'cuda' in present:
        fakes['cuda'] = FakeCuda(monkeypatch)
    if 'mps' in present:
        monkeypatch.setattr(torch.mps, 'is_available', lambda: True)
    dev = resolve_device('auto', local_rank=0)
    assert dev.type == expected
    # only the chosen device is made current
    for device_type, fake in fakes.items():
        assert fake.set_device_calls == ([0] if device_type == expected else [])


def test_auto_skips_installed_plugin_without_device(monkeypatch):
    install_fake(monkeypatch, 'npu', available=False)
    install_fake(monkeypatch, 'sdaa')
    assert resolve_device('auto', local_rank=0).type == 'sdaa'


def test_auto_with_nothing_is_cpu():
    assert resolve_device('auto') == Device('cpu', None)
    assert resolve_device() == Device('cpu', None)


@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
def test_local_rank_beyond_device_count(monkeypatch, device_type):
    fake = install_fake(monkeypatch, device_type, count=2)
    with pytest.raises(UsageError) as excinfo:
        resolve_device(device_type, local_rank=2)
    message = str(excinfo.value)
    assert one_line(message)
    assert 'local rank 2' in message and device_type in message
    assert '2 are visible' in message and 'fewer processes' in message
    assert fake.set_device_calls == []


def test_local_rank_beyond_cuda_count_from_env(monkeypatch):
    cuda = FakeCuda(monkeypatch, count=1)
    monkeypatch.setenv('LOCAL_RANK', '1')
    with pytest.raises(UsageError, match='local rank 1 needs 2 cuda devices'):
        resolve_device('cuda')
    assert cuda.set_device_calls == []


@pytest.mark.parametrize('device_type, package, hint', [
    ('npu', 'torch_npu', 'pip install torch-npu'),
    ('sdaa', 'torch_sdaa', 'Tecorigin'),
])
def test_missing_plugin(device_type, package, hint):
    # the autouse fixture left sys.modules[package] = None: importing it raises ImportError
    with pytest.raises(UsageError) as excinfo:
        resolve_device(device_type)
    message = str(excinfo.value)
    assert one_line(message)
    assert package in message and hint in message
    assert f'--device {device_type}' in message


@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
def test_plugin_present_but_no_device(monkeypatch, device_type):
    fake = install_fake(monkeypatch, device_type, available=False)
    with pytest.raises(UsageError) as excinfo:
        resolve_device(device_type)
    message = str(excinfo.value)
    assert one_line(message)
    assert f'no {device_type} device is available' in message
    assert fake.set_device_calls == []


def test_cuda_unavailable(monkeypatch):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', 'placeholder')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    with pytest.raises(UsageError) as excinfo:
        resolve_device('cuda')
    message = str(excinfo.value)
    assert one_line(message)
    assert 'no cuda device is available' in message and 'CUDA build of PyTorch' in message
    # an empty CUDA_VISIBLE_DEVICES hides every GPU of a machine that has them: the install hint was wrong there
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    with pytest.raises(UsageError, match=r"^--device cuda was asked for but no cuda device is available, and "
                                         r"CUDA_VISIBLE_DEVICES is '', which hides the cards that are not in it: "
                                         r"unset it, or name the cards to use$"):
        resolve_device('cuda')


def test_mps_unavailable():
    with pytest.raises(UsageError, match='no mps device'):
        resolve_device('mps')


@pytest.mark.parametrize('name', ['gpu', 'xpu', 'CUDA', ''])
def test_unknown_device(name):
    with pytest.raises(UsageError) as excinfo:
        resolve_device(name)
    message = str(excinfo.value)
    assert one_line(message) and '--device must be' in message and repr(name) in message


class _ImportRecorder(importlib.abc.MetaPathFinder):
    """A meta-path finder that only records which top-level modules were looked for."""

    def __init__(self):
        self.asked = []

    def find_spec(self, fullname, path=None, target=None):
        self.asked.append(fullname)
        return None


@pytest.mark.parametrize('device_type', ['cpu', 'cuda'])
def test_plugins_imported_only_when_asked(monkeypatch, device_type):
    for plugin in PLUGINS.values():
        monkeypatch.delitem(sys.modules, plugin, raising=False)
    recorder = _ImportRecorder()
    monkeypatch.setattr(sys, 'meta_path', [recorder] + sys.meta_path)
    if device_type == 'cuda':
        FakeCuda(monkeypatch)
    resolve_device(device_type, local_rank=0)
    assert not set(PLUGINS.values()) & set(recorder.asked)


# ------------------------------------------------------------------------ precision

@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
@pytest.mark.parametrize('bf16, expected', [(True, 'bf16'), (False, 'fp16')])
def test_auto_precision_on_vendor_device(monkeypatch, device_type, bf16, expected):
    install_fake(monkeypatch, device_type, bf16=bf16)
    assert Device(device_type, 0).resolve_precision('auto') == expected


@pytest.mark.parametrize('bf16, expected', [(True, 'bf16'), (False, 'fp16')])
def test_auto_precision_on_cuda(monkeypatch, bf16, expected):
    FakeCuda(monkeypatch, bf16=bf16)
    assert Device('cuda', 0).resolve_precision('auto') == expected


def test_auto_precision_without_bf16_probe_is_fp16(monkeypatch):
    install_fake(monkeypatch, 'npu')
    monkeypatch.delattr(FakeAccelerator, 'is_bf16_supported')  # a plugin without the probe
    assert Device('npu', 0).resolve_precision('auto') == 'fp16'


def test_auto_precision_on_cpu_is_fp32():
    assert Device('cpu', None).resolve_precision('auto') == 'fp32'


@pytest.mark.parametrize('precision', ['bf16', 'fp16', 'fp32'])
def test_explicit_precision_passes_through(monkeypatch, precision):
    install_fake(monkeypatch, 'npu', bf16=False)
    assert Device('cpu', None).resolve_precision(precision) == precision
    assert Device('npu', 0).resolve_precision(precision) == precision


@pytest.mark.parametrize('precision', ['fp8', 'bfloat16', 'FP16', None])
def test_bad_precision(precision):
    with pytest.raises(UsageError) as excinfo:
        Device('cpu', None).resolve_precision(precision)
    message = str(excinfo.value)
    assert one_line(message) and '--precision must be one of' in message and repr(precision) in message


# ----------------------------------------------------------------------- GradScaler

@pytest.mark.parametrize('device_type', ['cpu', 'npu', 'sdaa'])
@pytest.mark.parametrize('precision', ['bf16', 'fp32'])
def test_no_scaler_without_fp16(monkeypatch, device_type, precision):
    if device_type != 'cpu':
        install_fake(monkeypatch, device_type)
    assert Device(device_type, None if device_type == 'cpu' else 0).grad_scaler(precision) is None


@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
def test_fp16_uses_vendor_scaler(monkeypatch, device_type):
    install_fake(monkeypatch, device_type)
    assert isinstance(Device(device_type, 0).grad_scaler('fp16'), FakeGradScaler)


def test_fp16_without_vendor_amp_falls_back_to_torch_amp(monkeypatch):
    install_fake(monkeypatch, 'npu', amp=False)
    scaler = Device('npu', 0).grad_scaler('fp16')
    assert type(scaler) is torch.amp.GradScaler


def test_fp16_on_cpu_uses_torch_amp_scaler():
    scaler = Device('cpu', None).grad_scaler('fp16')
    assert type(scaler) is torch.amp.GradScaler
    assert scaler.is_enabled()


def test_fp16_on_cuda_uses_torch_amp_not_deprecated_cuda_amp(monkeypatch):
    FakeCuda(monkeypatch)
    scaler = Device('cuda', 0).grad_scaler('fp16')
    assert type(scaler) is torch.amp.GradScaler


# ------------------------------------------------------------------------- autocast

def test_fp32_autocast_is_a_no_op():
    ctx = Device('cpu', None).autocast('fp32')
    assert isinstance(ctx, contextlib.nullcontext)
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with ctx:
        assert not torch.is_autocast_enabled('cpu')
        assert (a @ b).dtype == torch.float32


def test_cpu_bf16_autocast():
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with Device('cpu', None).autocast('bf16'):
        assert torch.is_autocast_enabled('cpu')
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        out = a @ b
        assert out.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled('cpu')
    assert (a @ b).dtype == torch.float32


# --------------------------------------------------------- synchronize, peak memory

@pytest.mark.parametrize('device_type', ['npu', 'sdaa', 'cuda', 'cpu'])
def test_synchronize_waits_for_its_own_accelerator_once_per_call(monkeypatch, device_type):
    """Device.synchronize (nothing in the project calls it yet) reaches its own accelerator's
    synchronize once per call and no other accelerator's; on the CPU, none. All three fakes are
    present, so a call that went to the wrong one would be counted there."""
    fakes = {t: install_fake(monkeypatch, t) for t in ('npu', 'sdaa')}
    fakes['cuda'] = FakeCuda(monkeypatch)
    dev = Device(device_type, None if device_type == 'cpu' else 0)
    for _ in range(3):
        dev.synchronize()
    assert {t: fake.synchronize_calls for t, fake in fakes.items()} == \
        {t: 3 if t == device_type else 0 for t in fakes}


def test_max_memory_allocated_cuda(monkeypatch):
    cuda = FakeCuda(monkeypatch, peak=4096)
    assert Device('cuda', 1).max_memory_allocated() == 4096
    assert cuda.memory_queries == [torch.device('cuda:1')]


def test_max_memory_allocated_cpu_is_zero():
    assert Device('cpu', None).max_memory_allocated() == 0


# A real torch_npu / torch_sdaa renames torch's privateuse1 backend, after which torch.device
# accepts 'npu:3' (without it, torch.device('npu:3') raises RuntimeError "Expected one of cpu,
# cuda, ... device type at start of device string: npu"). The rename is once per process and
# cannot be undone, so it runs in a forked child (cheap: torch is already imported), with the
# same fakes, to check torch_device and max_memory_allocated end to end.
def _in_renamed_backend_child(device_type):
    """Fork; in the child rename privateuse1 to device_type, resolve the fake device and
    report what it answers as JSON through a pipe. Returns the parsed report."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_fd)
            torch.utils.rename_privateuse1_backend(device_type)
            plugin = PLUGINS[device_type]
            fake = FakeAccelerator(count=8, peak=777)
            sys.modules[plugin] = types.ModuleType(plugin)
            setattr(torch, device_type, fake)
            os.environ.pop('LOCAL_RANK', None)
            dev = resolve_device(device_type, local_rank=3)
            report = dict(torch_device=str(dev.torch_device),
                          is_device=isinstance(dev.torch_device, torch.device),
                          same=dev.torch_device == torch.device(f'{device_type}:3'),
                          set_device=fake.set_device_calls,
                          peak=dev.max_memory_allocated(),
                          queried=[str(d) for d in fake.memory_queries],
                          backend=dev.dist_backend)
            status = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            report = dict(error=f'{type(e).__name__}: {e}')
        finally:
            with contextlib.suppress(BaseException):
                os.write(write_fd, json.dumps(report).encode())
                os.close(write_fd)
            os._exit(status)
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], 60)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read_fd, 'rb') as pipe:
        data = pipe.read() if ready else b''
    os.waitpid(pid, 0)
    assert data, f'the {device_type} child process gave no answer in 60 s'
    return json.loads(data)


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs os.fork')
@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
def test_torch_device_once_backend_renamed(device_type):
    assert _in_renamed_backend_child(device_type) == dict(
        torch_device=f'{device_type}:3', is_device=True, same=True, set_device=[3], peak=777,
        queried=[f'{device_type}:3'], backend=BACKENDS[device_type])


# ------------------------------------------------------------------------ util.dist

_WORLD_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
               'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')


@pytest.fixture
def world_env(monkeypatch):
    """Unset every variable read_world_from_env reads or writes, in a way monkeypatch will
    restore even when the code under test writes os.environ itself: setenv first records the
    original value (or its absence); a bare delenv of an absent variable records nothing."""
    for name in _WORLD_VARS:
        monkeypatch.setenv(name, 'placeholder')
        monkeypatch.delenv(name)
    return monkeypatch


def test_world_default_single_process(world_env):
    world = read_world_from_env()
    assert world == World(0, 1, 0)
    assert not world.distributed


@pytest.mark.parametrize('procid, ntasks, localid', [
    (1, 2, 1),   # one node, two tasks
    (3, 4, 1),   # the second task on the second of two nodes: local rank != rank
])
def test_world_from_slurm(world_env, procid, ntasks, localid):
    world_env.setenv('SLURM_PROCID', str(procid))
    world_env.setenv('SLURM_NTASKS', str(ntasks))
    world_env.setenv('SLURM_LOCALID', str(localid))
    world_env.setenv('MASTER_ADDR', 'node001')
    world_env.setenv('MASTER_PORT', '29500')
    world = read_world_from_env()
    assert world == World(rank=procid, world_size=ntasks, local_rank=localid)
    assert world.distributed
    # copied to torchrun's names, which the device shim (LOCAL_RANK) and env:// read
    assert (os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK']) == (
        str(procid), str(ntasks), str(localid))
    assert device_shim.local_rank_from_env() == localid


def test_world_from_slurm_without_localid(world_env):
    world_env.setenv('SLURM_PROCID', '0')
    world_env.setenv('SLURM_NTASKS', '1')
    assert read_world_from_env() == World(0, 1, 0)   # one task needs no MASTER_ADDR


def test_slurm_multi_task_without_master_addr(world_env):
    world_env.setenv('SLURM_PROCID', '1')
    world_env.setenv('SLURM_NTASKS', '2')
    world_env.setenv('SLURM_LOCALID', '1')
    with pytest.raises(UsageError) as excinfo:
        read_world_from_env()
    message = str(excinfo.value)
    assert one_line(message) and 'MASTER_ADDR' in message and 'MASTER_PORT' in message
    assert message.startswith('SLURM says 2 tasks:') and message.endswith('torchrun --standalone --nproc_per_node 1')


@pytest.mark.parametrize('variables, names', [
    ({'RANK': '1', 'WORLD_SIZE': '1'}, 'RANK and WORLD_SIZE'),
    ({'RANK': '0', 'WORLD_SIZE': '0'}, 'RANK and WORLD_SIZE'),
    ({'SLURM_PROCID': '1', 'SLURM_NTASKS': '1'}, 'SLURM_PROCID and SLURM_NTASKS'),
])
def test_a_rank_outside_its_world_is_refused(world_env, variables, names):
    """A rank at or above the world size ended in a traceback deep in the sampler, and --knn or
    --eval printed nothing (printing is rank 0's) and left out an image from their accuracy."""
    for name, value in variables.items():
        world_env.setenv(name, value)
    with pytest.raises(UsageError, match=rf'^this process is rank \d of a world of \d process(es)? \(from {names}\): '
                                         r'ranks go from 0 to the world size less 1; start the'):
        read_world_from_env()


def test_torchrun_variables_win_over_slurm(world_env):
    world_env.setenv('RANK', '3')
    world_env.setenv('WORLD_SIZE', '4')
    world_env.setenv('LOCAL_RANK', '0')
    world_env.setenv('SLURM_PROCID', '1')
    world_env.setenv('SLURM_NTASKS', '2')
    world_env.setenv('SLURM_LOCALID', '1')
    assert read_world_from_env() == World(rank=3, world_size=4, local_rank=0)
    assert os.environ['RANK'] == '3' and os.environ['LOCAL_RANK'] == '0'


# ----------------------------------------------------------------------------- broken plugins and bad ranks

class BrokenPluginFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import <name>` fail the way an installed plugin without its driver libraries does."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path, target=None):
        import importlib.util
        return importlib.util.spec_from_loader(fullname, self) if fullname == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise OSError('libhccl.so: cannot open shared object file: No such file or directory')


def install_broken_plugin(monkeypatch, device_type):
    monkeypatch.delitem(sys.modules, PLUGINS[device_type])
    monkeypatch.setattr(sys, 'meta_path', [BrokenPluginFinder(PLUGINS[device_type])] + sys.meta_path)


@pytest.mark.parametrize('device_type', ['npu', 'sdaa'])
def test_broken_plugin_asked_for_is_a_clear_error(monkeypatch, device_type):
    install_broken_plugin(monkeypatch, device_type)
    with pytest.raises(UsageError) as info:
        resolve_device(device_type)
    message = str(info.value)
    assert '\n' not in message and PLUGINS[device_type] in message and 'libhccl.so' in message


def test_auto_skips_a_broken_plugin_with_a_warning(monkeypatch):
    install_broken_plugin(monkeypatch, 'npu')
    fake_cuda = FakeCuda(monkeypatch)
    with pytest.warns(UserWarning, match='torch_npu is installed but does not import'):
        device = resolve_device('auto', local_rank=1)
    assert (device.type, device.index, fake_cuda.set_device_calls) == ('cuda', 1, [1])


@pytest.mark.parametrize('value', ['-1', 'one'])
def test_bad_local_rank_env(monkeypatch, value):
    install_fake(monkeypatch, 'npu')
    monkeypatch.setenv('LOCAL_RANK', value)
    with pytest.raises(UsageError, match='LOCAL_RANK'):
        resolve_device('npu')


def test_negative_local_rank(monkeypatch):
    fake = install_fake(monkeypatch, 'npu')
    with pytest.raises(UsageError, match='0 or more'):
        resolve_device('npu', local_rank=-1)
    assert fake.set_device_calls == []


def test_slurm_without_ntasks_is_one_task(world_env):
    world_env.setenv('SLURM_PROCID', '0')
    assert read_world_from_env() == World(0, 1, 0)


def test_fp32_uses_tf32_on_cuda_except_for_alignment(monkeypatch):
    """A run's start on CUDA allows TF32 for fp32 matmuls and convolutions; --align (deterministic)
    keeps full fp32. Nothing changes on the CPU."""
    import torch
    import main_pretrain
    from util import launch
    # torch's backend flags are properties of module stand-ins, which pytest's monkeypatch (9.2 and
    # newer) cannot restore: they are saved and put back by hand
    flags = [(torch.backends.cuda.matmul, 'allow_tf32'), (torch.backends.cudnn, 'allow_tf32'),
             (torch.backends.cudnn, 'deterministic'), (torch.backends.cudnn, 'benchmark')]
    saved = [getattr(owner, name) for owner, name in flags]
    precision = torch.get_float32_matmul_precision()
    monkeypatch.setattr(launch, 'resolve_device', lambda name, local_rank: Device('cuda', 0))
    for stub in ('check_run_args', 'lock_output_dir', 'watch_nondeterministic_kernels'):
        monkeypatch.setattr(launch, stub, lambda *a: None)
    monkeypatch.setattr(launch.dist, 'init_process_group', lambda world, device: None)
    monkeypatch.setattr(launch.signals, 'join_agreement_group', lambda: None)
    def args():  # main_pretrain's own flags, so new ones reach the test as they reach a run
        return main_pretrain.get_args_parser().parse_args(
            ['--data_path', 'demo', '--device', 'cuda', '--precision', 'fp32', '--output_dir', ''])
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        fast = args()
        launch.start_run(fast)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert fast.compile  # --compile's default on CUDA
        # as a fast-fp32 run (and torch's own cudnn default) leaves them: --align must turn both off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        aligned = args()
        launch.start_run(aligned, deterministic=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert aligned.compile is False
        Device('cpu', None).use_fast_fp32()
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.use_deterministic_algorithms(False)
        for (owner, name), value in zip(flags, saved):
            setattr(owner, name, value)
