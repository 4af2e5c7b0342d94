"""The step's cross-attention shapes inside a chain of compiled layers (issue 11), three ways:
the query projection, SDPA over the text's keys and values and the output projection (as before
networks.fold_cross_attention); the folded form, two batched products around a softmax per head
over the 77 text tokens; and the folded form with each head's tokens padded to a multiple of 8
(zero rows, masked to -inf before the softmax), so that every head's scores start 16 bytes aligned.

One iteration is the attention and the residual add; six iterations per compiled function, timed as
CUDA-graph replays, µs per iteration. Also checks each folded form against the first in fp32.

    python3 benchmarks/cross_attention_fold.py     # on the GPU
"""
import copy
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from graph_timing import replay_us

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdcanny.networks import CrossAttention  # noqa: E402

HEADS, TOKENS, ITERATIONS = 8, 77, 6
SHAPES = [(1536, 320, 7), (384, 640, 7), (96, 1280, 7), (24, 1280, 2)]  # (queries, channels, calls a step)


def layer(channels, device, dtype):
    """One cross-attention with random weights, and its text's keys and values, batch 2."""
    torch.manual_seed(channels)
    attn = CrossAttention(channels, channels, HEADS).to(device=device, dtype=dtype)
    attn.context_index = 0  # takes [k, v] (or the folded rows) as its context
    k, v = (torch.randn(2, TOKENS, channels, device=device).to(dtype) for _ in range(2))
    return attn, k, v


def padded_attention(attn, rows):
    """The folded attention with each head's rows padded with zeros to a multiple of 8 tokens and the
    padding's scores masked to -inf: the alternative measured here, not in the networks."""
    padding = -TOKENS % 8
    b = rows[0].shape[0]
    score_rows, value_rows = (F.pad(r.reshape(b, HEADS, TOKENS, -1), (0, 0, 0, padding)).reshape(b, -1, r.shape[-1])
                              for r in rows)
    mask = torch.zeros(TOKENS + padding, device=score_rows.device, dtype=score_rows.dtype)
    mask[TOKENS:] = float("-inf")

    def attend(x):
        n = x.shape[1]
        scores = torch.matmul(x, score_rows.transpose(1, 2)).reshape(2, n, HEADS, -1) + mask
        return torch.matmul(scores.softmax(dim=-1).reshape(2, n, -1), value_rows) + attn.to_out[0].bias
    return attend


def chain(form, attn, k, v):
    """ITERATIONS times the attention of `form` and the residual add; `attn` is not folded."""
    if form == "sdpa":
        attend = functools.partial(attn, context=[k, v])
    else:
        folded = copy.deepcopy(attn)
        folded.fold(TOKENS)
        rows = folded.fold_keys_values(k, v)
        attend = padded_attention(folded, rows) if form == "folded, padded" else functools.partial(folded, context=rows)

    def run(x):
        for _ in range(ITERATIONS):
            x = attend(x) + x
        return x
    return run


def main():
    torch._dynamo.config.recompile_limit = 256
    print(torch.__version__, torch.cuda.get_device_name())
    forms = ("sdpa", "folded", "folded, padded")
    totals = dict.fromkeys(forms, 0.0)
    for queries, channels, per_step in SHAPES:
        attn, k, v = layer(channels, "cuda", torch.half)
        reference = layer(channels, "cuda", torch.float)  # the same weights and text in fp32
        x = torch.randn(2, queries, channels, device="cuda", dtype=torch.half)
        row = {}
        with torch.no_grad():
            want = chain("sdpa", *reference)(x.float())
            for form in forms:
                error = (chain(form, *reference)(x.float()) - want).norm() / want.norm()
                compiled = torch.compile(chain(form, attn, k, v), fullgraph=True, dynamic=False,
                                         options={"triton.enable_pdl": True})
                compiled(x)
                row[form] = replay_us(lambda: compiled(x), ITERATIONS)
                totals[form] += row[form] * per_step
                print(f"  {form} at {queries} x {channels}: relative L2 from SDPA in fp32 {error:.1e}")
        print(f"q {queries} channels {channels} x{per_step}/step: "
              + ", ".join(f"{name} {us:.2f}" for name, us in row.items()) + " µs an iteration", flush=True)
    print("per step, weighted by calls (µs):", {name: round(us, 1) for name, us in totals.items()})


if __name__ == "__main__":
    main()
