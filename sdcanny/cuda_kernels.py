"""CUDA C++ kernels of our own, compiled at run time by NVRTC and launched through the CUDA driver,
both reached through ctypes: nothing to build ahead and no CUDA toolkit, only the NVRTC library
that torch's CUDA builds bring (torch/lib or the nvidia-cuda-nvrtc wheel) and the driver.

A kernel is a .cu file beside this module, written without CUDA headers, and a set of macros; each
(file, macros, GPU architecture) is compiled once per process and loaded once per device. Launches
go on torch's current stream, so they are captured into CUDA graphs like torch's own kernels,
optionally with programmatic dependent launch (the kernel starts while the one ahead finishes and
waits for its results on the device: `griddepcontrol.wait`, compute capability 9.0+, a CUDA 12
driver).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import sys
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_uint, c_void_p
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent
MAX_DEFAULT_SHARED = 48 * 1024  # bytes a block may have without raising the kernel's limit
FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED = 8  # CUfunction_attribute
FUNC_ATTRIBUTE_NUM_REGS, FUNC_ATTRIBUTE_LOCAL_BYTES = 4, 3
LAUNCH_ATTRIBUTE_PROGRAMMATIC_SERIALIZATION = 6  # CUlaunchAttributeID


class LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union
    _fields_ = [("id", c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid_x", c_uint), ("grid_y", c_uint), ("grid_z", c_uint), ("block_x", c_uint),
                ("block_y", c_uint), ("block_z", c_uint), ("shared_bytes", c_uint), ("stream", c_void_p),
                ("attrs", POINTER(LaunchAttribute)), ("num_attrs", c_uint)]


class CudaKernelError(RuntimeError):
    """NVRTC or the driver refused: the message says which call and why."""


def _nvrtc_candidates() -> list[str]:
    """Where torch's CUDA builds keep NVRTC: torch/lib (bundled builds) or the nvidia wheels' lib
    folders beside torch (torch 2.1+), newest first; then the loader's own search."""
    torch_dir = Path(torch.__file__).resolve().parent
    patterns = [str(torch_dir / "lib" / "libnvrtc*.so*")]
    for site in {str(torch_dir.parent)} | set(sys.path):
        patterns += [os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*"),
                     os.path.join(site, "nvidia", "cu*", "lib", "libnvrtc.so*")]
    found = [p for pattern in patterns for p in sorted(glob.glob(pattern), reverse=True)
             if "builtins" not in os.path.basename(p)]
    return list(dict.fromkeys(found)) + ["libnvrtc.so"]


@functools.lru_cache(maxsize=None)
def nvrtc() -> ctypes.CDLL:
    """The NVRTC library; CudaKernelError naming the places tried where there is none."""
    tried = _nvrtc_candidates()
    for path in tried:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    raise CudaKernelError(f"no NVRTC library (libnvrtc) in {', '.join(tried)}")


@functools.lru_cache(maxsize=None)
def driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaKernelError(f"no CUDA driver library: {e}") from None


def nvrtc_version() -> tuple[int, int] | None:
    """(major, minor) of the NVRTC library `nvrtc` finds, or None where there is none."""
    try:
        lib = nvrtc()
    except CudaKernelError:
        return None
    major, minor = c_int(), c_int()
    lib.nvrtcVersion(byref(major), byref(minor))
    return major.value, minor.value


def _check_nvrtc(result: int, call: str) -> None:
    if result != 0:
        lib = nvrtc()
        lib.nvrtcGetErrorString.restype = c_char_p
        raise CudaKernelError(f"{call}: {lib.nvrtcGetErrorString(result).decode()}")


def _check_driver(result: int, call: str) -> None:
    if result != 0:
        text = c_char_p()
        driver().cuGetErrorString(result, byref(text))
        raise CudaKernelError(f"{call}: CUDA error {result} ({(text.value or b'?').decode()})")


@functools.lru_cache(maxsize=None)
def _uselocale():
    """libc's uselocale (c_void_p in and out), or None where this libc has none."""
    function = getattr(ctypes.CDLL(None), "uselocale", None)
    if function is not None:
        function.restype, function.argtypes = c_void_p, [c_void_p]
    return function


@contextlib.contextmanager
def _thread_locale_kept():
    """NVRTC 11 (11.7 measured) switches the calling thread to a locale of its own (uselocale) and
    leaves it there: Python's default text encoding in that thread then reads ASCII, and opening a
    UTF-8 file without an encoding fails. The thread's locale is put back after the block."""
    uselocale = _uselocale()
    saved = uselocale(None) if uselocale is not None else None
    try:
        yield
    finally:
        if uselocale is not None:
            uselocale(saved)


def compile_cubin(source: str, name: str, options: list[str]) -> bytes:
    """NVRTC's machine code for `source` under `options` (which name the real architecture, as
    --gpu-architecture=sm_90); CudaKernelError with the compiler's log where it fails."""
    lib = nvrtc()
    program = c_void_p()
    _check_nvrtc(lib.nvrtcCreateProgram(byref(program), source.encode(), name.encode(), 0, None, None),
                 "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        with _thread_locale_kept():
            result = lib.nvrtcCompileProgram(program, len(encoded), (c_char_p * len(encoded))(*encoded))
        if result != 0:
            size = c_size_t()
            lib.nvrtcGetProgramLogSize(program, byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(program, log)
            raise CudaKernelError(f"NVRTC could not compile {name} ({' '.join(options)}):\n{log.value.decode()}")
        size = c_size_t()
        _check_nvrtc(lib.nvrtcGetCUBINSize(program, byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(byref(program))


def compile_options(macros: dict[str, int], capability: tuple[int, int], arch_specific: bool = False) -> list[str]:
    """NVRTC's options: machine code for `capability` (its architecture-specific features too, as
    sm_90a's wgmma, where `arch_specific`), and the macros as -D definitions."""
    arch = f"sm_{capability[0]}{capability[1]}{'a' if arch_specific else ''}"
    return [f"--gpu-architecture={arch}", "--std=c++14"] + [f"-D{key}={value}" for key, value in sorted(macros.items())]


@dataclass(frozen=True)
class Kernel:
    """One compiled entry point, ready to launch on the current stream."""
    function: int  # CUfunction
    threads: int
    shared_bytes: int
    registers: int
    local_bytes: int  # spills: more than 0 means slow code

    def launch(self, grid: tuple[int, int, int], args: list, overlap: bool = False) -> None:
        """Runs on torch's current stream. `args` are ctypes values in the kernel's parameter order;
        `overlap`: with programmatic dependent launch (the kernel must wait with griddepcontrol)."""
        params = (c_void_p * len(args))(*[ctypes.cast(byref(a), c_void_p) for a in args])
        stream = c_void_p(torch.cuda.current_stream().cuda_stream)
        if not overlap:  # cuLaunchKernel: every CUDA 11 driver has it
            _check_driver(driver().cuLaunchKernel(c_void_p(self.function), grid[0], grid[1], grid[2], self.threads, 1, 1,
                                                  self.shared_bytes, stream, params, None), "cuLaunchKernel")
            return
        attrs = (LaunchAttribute * 1)()
        attrs[0].id = LAUNCH_ATTRIBUTE_PROGRAMMATIC_SERIALIZATION
        attrs[0].value = (1).to_bytes(4, "little") + bytes(60)
        config = LaunchConfig(grid[0], grid[1], grid[2], self.threads, 1, 1, self.shared_bytes, stream, attrs, 1)
        _check_driver(driver().cuLaunchKernelEx(byref(config), c_void_p(self.function), params, None),
                      "cuLaunchKernelEx")


def _make_current(device_index: int) -> None:
    """Makes torch's context (the device's primary one) current in this thread where none is: the
    driver's module and launch calls act on the current context."""
    torch.cuda.init()
    lib = driver()
    current = c_void_p()
    _check_driver(lib.cuCtxGetCurrent(byref(current)), "cuCtxGetCurrent")
    if current.value:
        return
    device, context = c_int(), c_void_p()
    _check_driver(lib.cuDeviceGet(byref(device), device_index), "cuDeviceGet")
    _check_driver(lib.cuDevicePrimaryCtxRetain(byref(context), device), "cuDevicePrimaryCtxRetain")
    _check_driver(lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")


def _function_attribute(function: c_void_p, attribute: int) -> int:
    value = c_int()
    _check_driver(driver().cuFuncGetAttribute(byref(value), attribute, function), "cuFuncGetAttribute")
    return value.value


@functools.lru_cache(maxsize=None)
def _cubin(source_file: str, macros: tuple[tuple[str, int], ...], capability: tuple[int, int],
           arch_specific: bool) -> bytes:
    """SOURCE_DIR/`source_file` compiled once per process for each (macros, architecture), however
    many of its entry points are loaded (canny.cu has two)."""
    source = (SOURCE_DIR / source_file).read_text(encoding="utf-8")
    return compile_cubin(source, source_file, compile_options(dict(macros), capability, arch_specific))


@functools.lru_cache(maxsize=None)
def _module(cubin: bytes, device_index: int) -> int:
    """The machine code loaded into the device's primary context (a CUmodule, loaded for the
    process's life): a function of one context cannot be launched in another's."""
    _make_current(device_index)
    module = c_void_p()
    _check_driver(driver().cuModuleLoadData(byref(module), cubin), "cuModuleLoadData")
    return module.value


def load_kernel(source_file: str, entry: str, macros: tuple[tuple[str, int], ...], capability: tuple[int, int],
                threads: int, shared_bytes: int, arch_specific: bool = False) -> Kernel:
    """`entry` of SOURCE_DIR/`source_file` compiled with `macros` for `capability`, loaded into the
    current device's context, its shared-memory limit raised to `shared_bytes` where that is past
    the default. Cached per process and device."""
    return _kernel(source_file, entry, macros, capability, threads, shared_bytes, arch_specific,
                   torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _kernel(source_file: str, entry: str, macros: tuple[tuple[str, int], ...], capability: tuple[int, int],
            threads: int, shared_bytes: int, arch_specific: bool, device_index: int) -> Kernel:
    module = _module(_cubin(source_file, macros, capability, arch_specific), device_index)
    lib, function = driver(), c_void_p()
    _check_driver(lib.cuModuleGetFunction(byref(function), c_void_p(module), entry.encode()), "cuModuleGetFunction")
    if shared_bytes > MAX_DEFAULT_SHARED:
        _check_driver(lib.cuFuncSetAttribute(function, FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED, shared_bytes),
                      "cuFuncSetAttribute")
    return Kernel(function.value, threads, shared_bytes, _function_attribute(function, FUNC_ATTRIBUTE_NUM_REGS),
                  _function_attribute(function, FUNC_ATTRIBUTE_LOCAL_BYTES))
