"""What our kernels that read through Hopper's tensor-memory descriptors (Triton's TensorDescriptor;
sdcanny/geglu_kernel.py, sdcanny/scores_kernel.py) need: of the GPU, and of a tensor. Imports no
triton, so the ops' modules can ask it before their kernels are imported."""
from __future__ import annotations

import torch

from . import compat

NEEDS = (9, 0)  # compute capability with tensor-memory descriptors (Hopper)


def unavailable_reason(device: torch.device, kernel: str, otherwise: str) -> str | None:
    """None where a descriptor kernel, called as a custom op, can run on `device`; else why not, in
    one line naming the `kernel` and saying what runs `otherwise`."""
    return compat.custom_kernel_unavailable_reason(device, kernel, otherwise, NEEDS,
                                                   "reads through tensor-memory descriptors")


def described_as_is(t: torch.Tensor) -> bool:
    """Whether a descriptor can read `t` in place: its last axis contiguous, the other strides and its
    start 16-byte aligned."""
    size = t.element_size()
    return t.stride(-1) == 1 and all(s * size % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def describable(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy of it where a descriptor cannot read it in place."""
    return t if described_as_is(t) else t.clone(memory_format=torch.contiguous_format)
