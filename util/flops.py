"""Training FLOPs and model FLOP utilisation (MFU).

`training_flops_per_image` counts the floating-point operations of one training step (forward
and backward) with torch's FlopCounterMode, on meta (or fake) tensors: nothing is computed, no
memory is taken (half a second on the CPU for a ViT), the model's weights, gradients and every
random generator stay as they were, so counting at start-up leaves an --align run bit-identical.
`FlopRate` turns the images/s of the training loop into achieved TFLOP/s and MFU against
`PEAK_TFLOPS`, the dense peak of the devices we know.
"""
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from util.errors import first_line
from util.logger import counted

# Dense (no 2:4 sparsity) peak throughput of one device in TFLOP/s by precision, matched in this
# order against the device's name (torch.cuda.get_device_name, torch.npu.get_device_name). fp32
# is the plain fp32 rate (--align: exact fp32), tf32 the rate of fp32 runs on CUDA, which use TF32
# tensor cores otherwise (util.device.use_fast_fp32). NVIDIA's datasheets quote tensor-core
# figures with 2:4 sparsity: the dense figure is half.
PEAK_TFLOPS = (
    # NVIDIA H100 PCIe datasheet (nvidia.com/en-us/data-center/h100): BF16/FP16 1,513 with sparsity, TF32 756, FP32 51
    ('H100 PCIe', {'bf16': 756.0, 'fp16': 756.0, 'tf32': 378.0, 'fp32': 51.0}),
    # NVIDIA H100 NVL, same datasheet: BF16/FP16 1,671 with sparsity, TF32 835, FP32 60
    ('H100 NVL', {'bf16': 835.5, 'fp16': 835.5, 'tf32': 417.5, 'fp32': 60.0}),
    # NVIDIA H100 SXM5 ("NVIDIA H100 80GB HBM3"), same datasheet: BF16/FP16 1,979 with sparsity, TF32 989, FP32 67
    ('H100', {'bf16': 989.4, 'fp16': 989.4, 'tf32': 494.7, 'fp32': 67.0}),
    # NVIDIA H200 NVL datasheet (nvidia.com/en-us/data-center/h200): BF16/FP16 1,671 with sparsity, TF32 835, FP32 60
    ('H200 NVL', {'bf16': 835.5, 'fp16': 835.5, 'tf32': 417.5, 'fp32': 60.0}),
    # NVIDIA H200 SXM, same datasheet: the H100 SXM's compute (1,979 with sparsity, TF32 989, FP32 67)
    ('H200', {'bf16': 989.4, 'fp16': 989.4, 'tf32': 494.7, 'fp32': 67.0}),
    # NVIDIA A100 datasheet (SXM4 and PCIe, 40 and 80 GB): BF16/FP16 312 dense (624 sparse), TF32 156, FP32 19.5
    ('A100', {'bf16': 312.0, 'fp16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),
    # Ascend 910B: APPROXIMATE. Huawei publishes no per-SKU figure; the FP16 figures quoted for the
    # 910B1-B4 range from 280 to 414 TFLOPS, 320 the most common (e.g. borimooc.com, "昇腾910B深度解析",
    # 2025). Give --peak_tflops for your card's exact figure.
    ('Ascend910B', {'bf16': 320.0, 'fp16': 320.0}),
)
# The CPU has no entry: its peak depends on the processor (cores x clock x vector width); MFU is
# n/a there unless --peak_tflops gives an estimate.


def device_name(device):
    """The name the accelerator gives itself ('NVIDIA H100 80GB HBM3', 'Ascend910B2'), or
    'N CPU cores' for the CPU."""
    get_name = getattr(device.module, 'get_device_name', None) if device.module is not None else None
    if get_name is None:
        threads = torch.get_num_threads()
        return counted(threads, 'CPU core') if device.type == 'cpu' else device.type
    return get_name(device.torch_device) if device.index is not None else get_name()


def matmul_precision(device, precision):
    """The precision whose peak applies: 'tf32' for fp32 on CUDA where TF32 matmuls are allowed."""
    if precision == 'fp32' and device.type == 'cuda' and torch.backends.cuda.matmul.allow_tf32:
        return 'tf32'
    return precision


def peak_tflops(name, precision):
    """The dense peak TFLOP/s of the device called `name` at a resolved precision; None when unknown."""
    compact = name.replace(' ', '').lower()
    for key, peaks in PEAK_TFLOPS:
        if key.replace(' ', '').lower() in compact:
            return peaks.get(precision)
    return None


class _LossOf(torch.nn.Module):
    """loss_fn(model, batch) as a module, so that functional_call can run it on other weights."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def training_flops(model, loss_fn, batch):
    """FLOPs of one forward and backward of `loss_fn(model, batch)`, as the training step runs them
    (gradients for the parameters that require them), counted over matrix products, convolutions
    and attention. The model runs on stand-ins of its weights and of the batch that have shapes but
    no values: meta tensors, or, where an op refuses the meta device (MaskFeat's autocast around its
    HOG target), fake CPU tensors, which cost 2-3x the time (a second for a ViT). Attention is
    counted as its math form (the same FLOPs as the fused kernels that the device runs).

    batch: a (nested) batch of CPU tensors, e.g. from `example_batch`
    returns: FLOPs of the whole batch
    """
    try:
        with torch.random.fork_rng(devices=[]):  # a CPU tensor drawn by the model, before a device mismatch
            return _count_flops(model, loss_fn, batch, device='meta')
    except Exception:  # noqa: BLE001 - whatever the meta device refused, fake tensors may still run
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode():  # on the CPU, whatever the model's device: no device plugin involved
            return _count_flops(model, loss_fn, batch, device='cpu')


def _count_flops(model, loss_fn, batch, device):
    """training_flops on stand-ins made on `device` (inside FakeTensorMode: fake tensors)."""
    def stand_in(tensor):
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype,
                                   device=device).requires_grad_(tensor.requires_grad)
    wrapper = _LossOf(model, loss_fn)
    state = {name: stand_in(t) for name, t in [*wrapper.named_parameters(), *wrapper.named_buffers()]}
    stand_in_batch = torch.utils._pytree.tree_map(lambda t: stand_in(t) if isinstance(t, torch.Tensor) else t, batch)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss = functional_call(wrapper, state, (stand_in_batch,))
        trained = [t for t in state.values() if t.requires_grad]
        torch.autograd.grad(loss, trained, allow_unused=True)
    return counter.get_total_flops()


def example_batch(batch_size, input_size, mask_generator=None, num_classes=None, soft_targets=False):
    """A batch in the form the training step takes, on the CPU: zero images (N, 3, S, S) with
    the pre-training masks of `mask_generator` (drawn from their own seeded generators, not from
    the global ones), or with class targets: (N,) indices, or (N, num_classes) soft targets (mixup).
    returns: (images, mask kwargs) or (images, targets)"""
    images = torch.zeros(batch_size, 3, input_size, input_size)
    if mask_generator is not None:
        samples = [mask_generator(torch.Generator().manual_seed(i)) for i in range(batch_size)]
        return images, {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
    if soft_targets:
        return images, torch.full((batch_size, num_classes), 1 / num_classes)
    return images, torch.zeros(batch_size, dtype=torch.long)


def training_flops_per_image(model, loss_fn, batch):
    """training_flops of `batch` per image (2 images: BatchNorm in training needs more than one)."""
    return training_flops(model, loss_fn, batch) / batch[0].shape[0]


def device_peak(device, precision, override=None):
    """The dense peak TFLOP/s of one device at a matmul precision: `override` (--peak_tflops), else
    the table's; None when unknown."""
    return override or peak_tflops(device_name(device), precision)


class FlopRate:
    """Achieved TFLOP/s per device and MFU from the images/s of all processes together."""

    def __init__(self, flops_per_image, peak, world_size=1):
        self.flops_per_image = flops_per_image
        self.peak = peak  # dense peak TFLOP/s of one device, None when unknown
        self.world_size = world_size

    def fields(self, ips, prefix=''):
        """{'tflops': achieved TFLOP/s per device, 'mfu': tflops / peak (only with a known peak)}"""
        tflops = self.flops_per_image * ips / self.world_size / 1e12
        fields = {f'{prefix}tflops': tflops}
        if self.peak:
            fields[f'{prefix}mfu'] = tflops / self.peak
        return fields

    @classmethod
    def of_run(cls, model, loss_fn, batch, device, precision, world_size, peak_override=None):
        """Count the FLOPs of the run's model once, look up the device's peak, say both; None when
        the count fails (a model with an op that neither meta nor fake tensors can run): the run goes on without."""
        try:
            flops = training_flops_per_image(model, loss_fn, batch)
        except Exception as e:  # noqa: BLE001 - counting is a report, never a reason to stop training
            print(f'FLOPs per image unknown ({type(e).__name__}: {first_line(e)}): no tflops or mfu in the log')
            return None
        name, precision = device_name(device), matmul_precision(device, precision)
        peak = device_peak(device, precision, peak_override)
        source = '--peak_tflops' if peak_override else 'util/flops.py'
        print(f'training FLOPs per image: {flops / 1e9:.3f} GFLOPs (forward + backward); peak of {name} at '
              f'{precision}: ' + (f'{peak:g} TFLOP/s ({source})' if peak else 'unknown, mfu n/a (--peak_tflops sets one)'))
        return cls(flops, peak, world_size)
