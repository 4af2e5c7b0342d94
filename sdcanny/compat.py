"""What the running torch offers, decided once, by looking at the API rather than at version numbers.

The project runs on torch 2.0.1 (the hackathon docker: Python 3.8, CUDA 11.8) and on today's
releases. Everything that differs between them is answered here; no other module compares torch
versions or probes signatures.

| feature | torch 2.0 | later |
| --- | --- | --- |
| `torch.load(mmap=True)` | absent | 2.1+ (zip-format files only) |
| `load_state_dict(assign=True)` | absent: modules are built on the CPU and filled | 2.1+: built on meta, tensors assigned |
| `torch.onnx.export(dynamo=...)` | absent (TorchScript exporter only) | 2.5+: pass dynamo=False |
| highest ONNX opset of the TorchScript exporter | 18 | 20 |
| TorchInductor option `conv_1x1_as_mm` | absent | present |
| `torch.compile` on Python 3.11+ | unsupported | supported |
| torch.compile's generated code saved for a later process (`aot_compile`, `torch.compiler.load_compiled_function`) | absent | 2.11 has it |
| fp16 convolutions on the CPU | absent | present (used to trace fp16 ONNX graphs without a GPU) |
| `torch.library.custom_op` (our Triton GroupNorm and attention as ops torch.compile can call) | absent | 2.4+ |
| `torch.compiler.is_compiling` | `torch._dynamo.is_compiling` | 2.3+ |
| e4m3 x e4m3 into one fp32 tensor (`torch._scaled_mm`; the fp8 patch products) | absent (no fp8 dtype) | 2.5+ (2.1-2.4 return a pair) |

And one thing of triton's: whether our own Triton kernels launch with programmatic dependent launch
(`kernel_launches_overlap`: triton's `launch_pdl` option and grid-dependency intrinsics, on a GPU of
compute capability 9.0+).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
import zipfile
from pathlib import Path

import torch

TORCH_LOAD_MMAP = "mmap" in inspect.signature(torch.load).parameters
LOAD_STATE_DICT_ASSIGN = "assign" in inspect.signature(torch.nn.Module.load_state_dict).parameters
_ONNX_EXPORT_DYNAMO_ARG = "dynamo" in inspect.signature(torch.onnx.export).parameters
CUSTOM_OPS = hasattr(torch.library, "custom_op")
_CUSTOM_OP_TAGS = CUSTOM_OPS and "tags" in inspect.signature(torch.library.custom_op).parameters


def _is_compiling_function():
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling
    return importlib.import_module("torch._dynamo").is_compiling  # 2.0-2.2: not imported with torch (0.1 s)


# Whether torch.compile is tracing the caller; traced, a constant True. Picked here, once: dynamo
# cannot trace the lookup itself
is_compiling = _is_compiling_function()


def custom_kernel_unavailable_reason(device: torch.device, kernel: str, otherwise: str,
                                     needs: tuple[int, int] | None = None, because: str = "") -> str | None:
    """None where one of our Triton kernels, called as a custom op, can run on `device` (and is used
    there: on compute capability `needs` or later, where given, `because` saying why); else why
    not, in one line naming the `kernel` and saying what runs `otherwise`."""
    if device.type != "cuda":
        return f"{kernel} needs a CUDA device, not {device.type}"
    if not CUSTOM_OPS:
        return f"torch {torch.__version__} has no torch.library.custom_op (2.4+): {otherwise}"
    if importlib.util.find_spec("triton") is None:
        return f"triton is not installed, so {otherwise}"
    short = capability_short_of(device, needs) if needs is not None else None
    if short is not None:
        return (f"{kernel} {because} (compute capability {'.'.join(map(str, needs))}+), not on this {short} GPU: "
                f"{otherwise}")
    return None


def our_kernels_run_on(t: torch.Tensor) -> bool:
    """Whether our Triton kernels (the ops' kernel paths) take `t`: on a GPU, or on the CPU under
    Triton's interpreter (TRITON_INTERPRET=1, numpy), which is how the tests check them without one."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def capability_short_of(device: torch.device, needed: tuple[int, int]) -> str | None:
    """None where the GPU `device` has compute capability `needed` or later; else its own, as "8.6"
    (for the notes that say why one of our kernels is not used there)."""
    capability = torch.cuda.get_device_capability(device)
    return None if tuple(capability) >= tuple(needed) else ".".join(map(str, capability))


def kernel_launches_overlap(device: torch.device) -> bool:
    """Whether our Triton kernels (GroupNorm, attention) on `device` launch with programmatic
    dependent launch, as TorchInductor's do with `triton.enable_pdl`: each starts while the kernel
    ahead of it finishes and waits for that kernel's results in place (`tl.extra.cuda.gdc_wait`).
    Needs compute capability 9.0+ and a triton with the launch option and the intrinsics."""
    if device.type != "cuda":
        return False
    return _kernel_launches_overlap(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _kernel_launches_overlap(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index) < (9, 0):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as triton_cuda
    except ImportError:
        return False
    return hasattr(triton_cuda, "gdc_wait") and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def overlap_launch_options(overlap: bool) -> dict:
    """The keyword arguments that launch one of our Triton kernels with programmatic dependent launch
    where `overlap` (a kernel_launches_overlap answer), none otherwise."""
    return {"launch_pdl": True} if overlap else {}


def custom_op_layout_tags() -> tuple:
    """Tags for a custom op whose inputs must reach it with the strides they had when traced
    (TorchInductor may otherwise lay its own buffers out afresh): the strictest tag this torch has,
    where custom_op takes tags at all."""
    if not _CUSTOM_OP_TAGS:
        return ()
    for name in ("needs_exact_strides", "needs_fixed_stride_order"):
        if hasattr(torch.Tag, name):
            return (getattr(torch.Tag, name),)
    return ()


def torch_load(path: Path) -> object:
    """`torch.load` of a checkpoint: tensors only, on the CPU, memory-mapped where both the torch
    and the file format allow it (mmap needs the zip format that torch.save has written since
    1.6; older "legacy" files are read whole)."""
    mmap = TORCH_LOAD_MMAP and zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", weights_only=True, **({"mmap": True} if mmap else {}))


def network_build_device() -> str:
    """Where `load_networks` builds modules before the weights go in: "meta" (no memory, the
    checkpoint's tensors are assigned) where load_state_dict can assign, else "cpu" (copied)."""
    return "meta" if LOAD_STATE_DICT_ASSIGN else "cpu"


def load_state_dict(module: torch.nn.Module, tensors: dict) -> None:
    """strict=True always; assign=True where torch has it (the module was built on meta)."""
    if LOAD_STATE_DICT_ASSIGN:
        module.load_state_dict(tensors, strict=True, assign=True)
    else:
        module.load_state_dict(tensors, strict=True)


def onnx_export_kwargs() -> dict:
    """Extra torch.onnx.export arguments that select the TorchScript exporter where torch has a
    choice (its dynamo exporter is slower on these graphs and is the default from torch 2.9)."""
    return {"dynamo": False} if _ONNX_EXPORT_DYNAMO_ARG else {}


def max_onnx_opset() -> int:
    """The highest opset the TorchScript exporter of this torch writes."""
    from torch.onnx import _constants
    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)


def fp8_product_unavailable_reason(device: torch.device) -> str | None:
    """None where torch._scaled_mm multiplies e4m3 matrices into one fp32 tensor on `device` (the
    form the fp8 patch products call), else why not in one line: tried once per device on two
    16 x 16 matrices."""
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no fp8 matrix product (torch._scaled_mm, 2.5+)"
    return _fp8_product_probe(str(device))


@functools.lru_cache(maxsize=None)
def _fp8_product_probe(device: str) -> str | None:
    a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    try:
        out = torch._scaled_mm(a, a.t(), one, one, out_dtype=torch.float32)
    except (RuntimeError, TypeError) as e:  # no fp8 tensor cores, or an older signature
        return f"torch {torch.__version__}'s fp8 matrix product does not run on {device}: {str(e).splitlines()[0]}"
    if not isinstance(out, torch.Tensor) or out[0, 0].item() != 16.0:
        return f"torch {torch.__version__}'s torch._scaled_mm does not give one product tensor (torch 2.5+ does)"
    return None


def cpu_runs_fp16_convolutions() -> bool:
    try:
        torch.nn.functional.conv2d(torch.zeros(1, 1, 2, 2, dtype=torch.half), torch.zeros(1, 1, 1, 1, dtype=torch.half))
    except RuntimeError:  # "slow_conv2d_cpu" not implemented for 'Half'
        return False
    return True


def compile_unavailable_reason(device_type: str = "cuda") -> str | None:
    """None if torch.compile (TorchInductor) can run here for `device_type`, else why not in one line."""
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "is_dynamo_supported"):
        if not dynamo.is_dynamo_supported():
            return f"torch {torch.__version__} does not support torch.compile on Python {sys.version.split()[0]}"
    elif sys.version_info >= (3, 11):  # torch 2.0: dynamo stops at 3.10 and has no probe for it
        return f"torch {torch.__version__} supports torch.compile only up to Python 3.10"
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile needs triton for CUDA kernels and it is not installed"
    return None


def aot_unavailable_reason() -> str | None:
    """None if this torch can save torch.compile's generated code for a later process to load
    (`aot_compile` and torch.compiler.load_compiled_function), else why not in one line."""
    reason = compile_unavailable_reason("cpu")
    if reason is not None:
        return reason
    if getattr(getattr(torch, "compiler", None), "load_compiled_function", None) is None:
        return f"torch {torch.__version__} cannot save compiled code for a later process (torch 2.11 can)"
    return None


def inductor_options(wanted: dict) -> tuple[dict, list[str]]:
    """The TorchInductor options this torch knows, and the names of those it does not (dropped)."""
    from torch._inductor import config
    known = {k: v for k, v in wanted.items() if _has_option(config, k)}
    return known, sorted(set(wanted) - set(known))


def _has_option(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, part):
            return False
        node = getattr(node, part)
    return True


def cuda_unavailable_reason() -> str | None:
    """None if torch can run on a CUDA GPU here, else what is missing, in one line."""
    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no CUDA device "
            "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)")


def check_device(device: str | None) -> None:
    """Refuses, naming what is missing, a device string torch cannot use here (None: decided later)."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {exc}") from exc
    if parsed.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise ValueError(f"device {device!r}: {reason}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":
        raise ValueError(f"device {device!r}: this project runs on 'cpu' or 'cuda' devices")
