"""benchmarks/quantized_products.py's weight-only kernel on a CPU, in Triton's interpreter: run by
tests/test_quantization.py as a subprocess with TRITON_INTERPRET=1 (set before triton is imported).
Prints one line per check; exits non-zero on the first that fails.

The kernel against float64 maths of the weights it was given (fp16, or int8 / uint8 with their
scales): both operand orders, one K slice and three (the slices summed by the last program of a
tile), a bias and none, rows past the last masked; a second call gives the same output bit for bit
and leaves every tile counter at zero.
"""
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quantized_products as qp  # noqa: E402
from row_quantization import dequantize_rows, quantize_rows  # noqa: E402

g = torch.Generator().manual_seed(0)
for (m, k, n), mode, w_first, split_k, has_bias in itertools.product(
        ((48, 384, 64), (70, 256, 128)), ("fp16", "int8", "uint8"), (True, False), (1, 3), (True, False)):
    x = torch.randn(m, k, generator=g).half()
    w = (torch.randn(n, k, generator=g) * 0.05).half()
    bias = torch.randn(n, generator=g).half() if has_bias else None
    if mode == "fp16":
        stored, scale, weights = w, None, w.double()
    else:
        stored, scale = quantize_rows(w, mode)
        weights = dequantize_rows(stored, scale, mode).double()
    want = x.double() @ weights.t() + (bias.double() if has_bias else 0)
    got = qp.weight_only_product(x, stored, bias, scale, mode, w_first=w_first, block_n=32, block_k=64,
                                 split_k=split_k)
    again = qp.weight_only_product(x, stored, bias, scale, mode, w_first=w_first, block_n=32, block_k=64,
                                   split_k=split_k)
    error = float((got.double() - want).norm() / want.norm())
    counters = qp._COUNTERS[x.device]
    ok = error < 1e-3 and torch.equal(got, again) and int(counters.abs().sum()) == 0 and got.dtype == torch.float16
    print(f"kernel {m}x{k}->{n} {mode} w_first={w_first} split={split_k} bias={has_bias}: rel L2 {error:.1e} "
          f"{'ok' if ok else 'FAILED'}")
    if not ok:
        sys.exit(1)
