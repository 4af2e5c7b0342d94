"""Each attention shape of the graded step inside a chain of compiled projections, as the step runs
it, per attention implementation (issue 11): SDPA under each back-end context, FlexAttention
(a TorchInductor Triton template, launched overlapped like the other Triton kernels and without
the memset that precedes each cuDNN attention call in the step), and each of SDPA's back-ends
called as its own aten op (a back-end context does not reach compiled code; an explicit op does).

One iteration is the query projection (and the key and value projection for self-attention),
the attention of batch 2 x 8 heads, the output projection and the residual add; six iterations per
compiled function, timed as CUDA-graph replays, µs per iteration.

    python3 benchmarks/attention_chain.py     # on the GPU
"""
import contextlib

import torch
import torch.nn.functional as F
from graph_timing import replay_us
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, ITERATIONS = 8, 6
# (queries, keys, head width, calls a step) at the graded size
SHAPES = [(24, 24, 160, 2), (24, 77, 160, 2), (96, 96, 160, 7), (96, 77, 160, 7),
          (384, 384, 80, 7), (384, 77, 80, 7), (1536, 1536, 40, 7), (1536, 77, 40, 7)]
ATEN = torch.ops.aten


def flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention
    return flex_attention(q, k, v)


# name -> (SDPA back-end context or None, the attention of (B, heads, N, d) q, k, v)
IMPLEMENTATIONS = {
    "sdpa": (None, F.scaled_dot_product_attention),
    "sdpa cudnn": (SDPBackend.CUDNN_ATTENTION, F.scaled_dot_product_attention),
    "sdpa flash": (SDPBackend.FLASH_ATTENTION, F.scaled_dot_product_attention),
    "sdpa efficient": (SDPBackend.EFFICIENT_ATTENTION, F.scaled_dot_product_attention),
    "flex": (None, flex),
    "flash op": (None, lambda q, k, v: ATEN._scaled_dot_product_flash_attention(q, k, v)[0]),
    "efficient op": (None, lambda q, k, v: ATEN._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]),
    "cudnn op": (None, lambda q, k, v: ATEN._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0])}


def attention_chain(queries, keys, width, attend):
    """ITERATIONS attention layers; self-attention where queries == keys, else cross-attention to a
    fixed text of `keys` tokens."""
    channels = HEADS * width
    scale = channels ** -0.5
    w_q, w_out = (torch.randn(channels, channels, device="cuda", dtype=torch.half) * scale for _ in range(2))
    w_kv = torch.randn(2 * channels, channels, device="cuda", dtype=torch.half) * scale
    text_k, text_v = (torch.randn(2, HEADS, keys, width, device="cuda", dtype=torch.half) for _ in range(2))

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], HEADS, width).transpose(1, 2)

    def chain(x):
        for _ in range(ITERATIONS):
            q = heads(F.linear(x, w_q))
            k, v = (heads(t) for t in F.linear(x, w_kv).chunk(2, dim=-1)) if queries == keys else (text_k, text_v)
            o = attend(q, k, v)
            x = F.linear(o.transpose(1, 2).reshape(x.shape), w_out) + x
        return x
    return chain


def main():
    torch._dynamo.config.recompile_limit = 256  # one compile per shape and implementation, all of one function
    print(torch.__version__, torch.cuda.get_device_name())
    totals = dict.fromkeys(IMPLEMENTATIONS, 0.0)
    for queries, keys, width, per_step in SHAPES:
        x = torch.randn(2, queries, HEADS * width, device="cuda", dtype=torch.half)
        row = {}
        for name, (backend, attend) in IMPLEMENTATIONS.items():
            context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            try:
                with context, torch.no_grad():
                    compiled = torch.compile(attention_chain(queries, keys, width, attend), fullgraph=True,
                                             dynamic=False, options={"triton.enable_pdl": True})
                    compiled(x)
                    row[name] = replay_us(lambda: compiled(x), ITERATIONS)
            except Exception as exc:  # a back-end that does not take this shape: say so, go on
                row[name] = float("nan")
                print(f"  {name} at {queries}x{keys}x{width}: {type(exc).__name__}: {str(exc)[:160]}")
            totals[name] += row[name] * per_step
        print(f"q {queries} keys {keys} width {width} x{per_step}/step: "
              + ", ".join(f"{name} {us:.2f}" for name, us in row.items()) + " µs an iteration", flush=True)
    print("per step, weighted by calls (µs):", {name: round(us, 1) for name, us in totals.items()})


if __name__ == "__main__":
    main()
