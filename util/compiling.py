"""torch.compile around the model, and the eager model where compiling fails."""
import logging

import torch

from util import dist
from util.errors import UsageError, first_line


# torch.compile's modes: reduce-overhead replays each step as CUDA graphs (the host launches one
# graph instead of every kernel); max-autotune also searches matmul tilings (minutes more compiling).
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def resolve_compile(args, device_type, deterministic):
    """Fill in --compile: a --compile_mode turns it on, else compiles_by_default; --compile_mode
    with --no-compile is refused. Fills --compile_mode with 'default' where none was given."""
    if args.compile_mode is not None and args.compile is False:
        raise UsageError(f'--compile_mode {args.compile_mode} is a mode of torch.compile, which --no-compile turns '
                         f'off: give one of the two')
    if args.compile is None:
        args.compile = args.compile_mode is not None or compiles_by_default(device_type, deterministic)
    args.compile_mode = args.compile_mode or 'default'
    if args.compile and deterministic:
        print('warning: --align with --compile: compiled kernels fuse and round unlike eager ones, so align with a run '
              'compiled alike, or leave --compile out', flush=True)


def compiles_by_default(device_type, deterministic):
    """--compile's default: on with CUDA, where it was measured faster; off on the other devices
    (their compilers are their vendors' to prove) and for --align (its kernels are not the eager
    ones that another device's run is compared with)."""
    return device_type == 'cuda' and not deterministic


def compile_and_wrap(model, device, args):
    """Activation checkpointing with --grad_ckpt, DDP around the model when distributed, then
    torch.compile with --compile (in --compile_mode)."""
    if args.grad_ckpt:
        if not hasattr(model, 'set_grad_checkpointing'):
            raise UsageError(f'--grad_ckpt: {type(model).__name__} has no activation checkpointing (timm\'s '
                             f'set_grad_checkpointing); run without it')
        model.set_grad_checkpointing(True)
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            print('warning: --grad_ckpt recomputes each checkpointed forward in the backward, and BatchNorm layers '
                  'update their running statistics again then: the same losses and gradients, but statistics that '
                  'differ from a run without it', flush=True)
    model_ddp = dist.wrap_ddp(model, device)
    if args.compile and device.type != 'cuda':
        # inductor's C++ backend looks for a CUDA toolkit when it loads, and a CUDA build of torch on a
        # machine without a GPU warns "No CUDA runtime is found": noise for a run on another device
        logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    if not args.compile:
        return model_ddp
    # the first step waits for the compiler (seconds to minutes, without a word of output): said up front
    print(f'torch.compile (mode {args.compile_mode}) compiles the training step in its first call, which takes '
          f'longer than the steps after it (--no-compile trains eagerly)', flush=True)
    return compile_with_fallback(model_ddp, args.compile_mode)


def compile_with_fallback(model, mode='default'):
    """torch.compile(model, mode=mode), or `model` itself from the first call whose compilation
    fails."""
    return EagerFallback(model, torch.compile(model, mode=mode))


class EagerFallback(torch.nn.Module):
    """The compiled model, or the model itself from the first call whose compilation fails (no
    Triton, no C++ compiler, an op the backend lacks): one line says so, and the step runs eagerly,
    as every later one. Attributes the loop asks for (no_sync under DDP) are the model's."""

    def __init__(self, model, compiled):
        super().__init__()
        self.model = model
        self.__dict__['compiled'] = compiled  # not a submodule: its parameters are the model's

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # compiling failed (Inductor's errors included)
                cause = getattr(e, 'inner_exception', None) or e  # what the backend raised, when it was the backend
                print(f'torch.compile failed ({type(cause).__name__}: {first_line(cause)}): training without it '
                      f'(--no-compile skips it)', flush=True)
                self.__dict__['compiled'] = None
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.model, name)
