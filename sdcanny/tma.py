"""What Hopper's tensor-memory descriptors (Triton's TensorDescriptor) need of a tensor, for our
kernels that read through them (sdcanny/geglu_kernel.py, sdcanny/scores_kernel.py)."""
import torch


def described_as_is(t: torch.Tensor) -> bool:
    """Whether a descriptor can read `t` in place: its last axis contiguous, the other strides and its
    start 16-byte aligned."""
    size = t.element_size()
    return t.stride(-1) == 1 and all(s * size % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0


def describable(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy of it where a descriptor cannot read it in place."""
    return t if described_as_is(t) else t.clone(memory_format=torch.contiguous_format)
