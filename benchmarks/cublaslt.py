"""cuBLASLt's matrix product through ctypes, with the algorithm chosen by the caller: torch asks
cuBLASLt's heuristic for one algorithm per shape and runs it; this module asks for up to
`count` candidates, so that a benchmark can time each one.

Only what the step's products need: fp16 operands and output, fp32 accumulation and scale,
y (M, N) = x (M, K) @ w (N, K)^T (+ bias (N,)), row-major, as F.linear. In cuBLASLt's
column-major terms that is y^T = op_T(w) x^T with w stored K x N (ld K) and x stored K x M (ld K),
the layout torch itself passes ("TN").

The library is the one torch has loaded (found in /proc/self/maps after a product on the GPU),
so its version is torch's own.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

CUBLAS_COMPUTE_32F = 68
CUDA_R_16F, CUDA_R_32F = 2, 0
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
EPILOGUE_BIAS = 4
OP_N, OP_T = 0, 1
PREF_MAX_WORKSPACE_BYTES = 1
WORKSPACE_BYTES = 32 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def loaded_library() -> ctypes.CDLL:
    """libcublasLt as torch loaded it."""
    a = torch.ones(8, 8, device="cuda", dtype=torch.float16)
    torch.mm(a, a)  # loads cuBLAS(Lt) if nothing has yet
    torch.cuda.synchronize()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "libcublasLt.so" in path:
            return ctypes.CDLL(path)
    raise RuntimeError("libcublasLt is not loaded in this process")


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cuBLAS status {status}")


@dataclass
class Plan:
    """One shape's descriptors and candidate algorithms."""
    desc: ctypes.c_void_p
    layouts: tuple  # (w, x, y)
    candidates: list  # HeuristicResult, best first by the heuristic


class CublasLt:
    def __init__(self):
        self.lib = loaded_library()
        self.handle = ctypes.c_void_p()
        check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _layout(self, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        layout = ctypes.c_void_p()
        check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), CUDA_R_16F, ctypes.c_uint64(rows),
                                                  ctypes.c_uint64(cols), ctypes.c_int64(ld)), "layout")
        return layout

    def _set(self, desc, attribute: int, value: ctypes._SimpleCData) -> None:
        check(self.lib.cublasLtMatmulDescSetAttribute(desc, attribute, ctypes.byref(value), ctypes.sizeof(value)),
              f"descriptor attribute {attribute}")

    def plan(self, m: int, k: int, n: int, bias: torch.Tensor | None, count: int = 32) -> Plan:
        """Descriptors for y = x @ w^T (+ bias) and the heuristic's first `count` algorithms that
        fit the workspace. The bias pointer is part of the descriptor: `bias` is the tensor the
        plan's products will add."""
        desc = ctypes.c_void_p()
        check(self.lib.cublasLtMatmulDescCreate(ctypes.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "descriptor")
        self._set(desc, DESC_TRANSA, ctypes.c_int32(OP_T))
        self._set(desc, DESC_TRANSB, ctypes.c_int32(OP_N))
        if bias is not None:
            self._set(desc, DESC_EPILOGUE, ctypes.c_uint32(EPILOGUE_BIAS))
            self._set(desc, DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
        layouts = (self._layout(k, n, k), self._layout(k, m, k), self._layout(n, m, n))
        pref = ctypes.c_void_p()
        check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        size = ctypes.c_size_t(WORKSPACE_BYTES)
        check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size),
                                                            ctypes.sizeof(size)), "workspace preference")
        results = (HeuristicResult * count)()
        returned = ctypes.c_int()
        check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, layouts[0], layouts[1], layouts[2],
                                                      layouts[2], pref, count, results, ctypes.byref(returned)),
              "heuristic")
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        candidates = [results[i] for i in range(returned.value) if results[i].state == 0]
        return Plan(desc, layouts, candidates)

    def run(self, plan: Plan, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, algo: HeuristicResult) -> torch.Tensor:
        """out = x @ w^T (+ the plan's bias) with `algo`, on torch's current stream."""
        w_layout, x_layout, y_layout = plan.layouts
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(self.lib.cublasLtMatmul(self.handle, plan.desc, ctypes.byref(self.alpha), ctypes.c_void_p(w.data_ptr()),
                                      w_layout, ctypes.c_void_p(x.data_ptr()), x_layout, ctypes.byref(self.beta),
                                      ctypes.c_void_p(out.data_ptr()), y_layout, ctypes.c_void_p(out.data_ptr()),
                                      y_layout, ctypes.byref(algo.algo), ctypes.c_void_p(self.workspace.data_ptr()),
                                      ctypes.c_size_t(WORKSPACE_BYTES), stream), "cublasLtMatmul")
        return out
