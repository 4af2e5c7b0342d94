"""The step's cross-attention shapes inside a chain of compiled layers (issue 11), three ways:
the query projection, SDPA over the text's keys and values and the output projection (as before
networks.fold_cross_attention); the folded form, two batched products around a softmax per head
over the 77 text tokens; and the folded form with each head's tokens padded to a multiple of 8
(zero rows, masked to -inf before the softmax), so that every head's scores start 16 bytes aligned.

One iteration is the attention and the residual add; six iterations per compiled function, timed as
CUDA-graph replays, µs per iteration. Also checks each folded form against the first in fp32.

    python3 benchmarks/cross_attention_fold.py     # on the GPU
"""
import torch
import torch.nn.functional as F
from graph_timing import replay_us

HEADS, TOKENS, ITERATIONS = 8, 77, 6
SHAPES = [(1536, 320, 7), (384, 640, 7), (96, 1280, 7), (24, 1280, 2)]  # (queries, channels, calls a step)


def layers(channels, device, dtype):
    """Random weights of one cross-attention and its text's keys and values, batch 2."""
    scale = channels ** -0.5
    w_q, w_out = (torch.randn(channels, channels, device=device, dtype=dtype) * scale for _ in range(2))
    bias = torch.randn(channels, device=device, dtype=dtype) * 0.1
    k, v = (torch.randn(2, TOKENS, channels, device=device, dtype=dtype) for _ in range(2))
    return w_q, w_out, bias, k, v


def folded_rows(w_q, w_out, k, v, padded):
    """(score rows, value rows), (2, HEADS * tokens, C), tokens 77 or padded to 80 with zero rows."""
    b, t, c = k.shape
    d = c // HEADS
    wq = w_q.float().reshape(HEADS, d, c)
    wo = w_out.float().reshape(c, HEADS, d).permute(1, 2, 0)
    a = torch.matmul(k.float().reshape(b, t, HEADS, d).transpose(1, 2), wq) * d ** -0.5
    o = torch.matmul(v.float().reshape(b, t, HEADS, d).transpose(1, 2), wo)
    if padded:
        a, o = (F.pad(r, (0, 0, 0, -t % 8)) for r in (a, o))
    return (r.reshape(b, -1, c).to(k.dtype) for r in (a, o))


def chain(form, w_q, w_out, bias, k, v):
    c = w_q.shape[0]
    d = c // HEADS
    rows = None if form == "sdpa" else tuple(folded_rows(w_q, w_out, k, v, form == "folded, padded"))
    mask = torch.zeros(TOKENS - TOKENS % -8, device=k.device, dtype=k.dtype)
    mask[TOKENS:] = float("-inf")

    def run(x):
        n = x.shape[1]
        for _ in range(ITERATIONS):
            if rows is None:
                q = F.linear(x, w_q).reshape(2, n, HEADS, d).transpose(1, 2)
                heads = [t.reshape(2, TOKENS, HEADS, d).transpose(1, 2) for t in (k, v)]
                o = F.scaled_dot_product_attention(q, *heads).transpose(1, 2).reshape(2, n, c)
                out = F.linear(o, w_out, bias)
            else:
                scores = torch.matmul(x, rows[0].transpose(1, 2)).reshape(2, n, HEADS, -1)
                if scores.shape[-1] != TOKENS:
                    scores = scores + mask
                out = torch.matmul(scores.softmax(dim=-1).reshape(2, n, -1), rows[1]) + bias
            x = out + x
        return x
    return run


def main():
    torch._dynamo.config.recompile_limit = 256
    print(torch.__version__, torch.cuda.get_device_name())
    forms = ("sdpa", "folded", "folded, padded")
    totals = dict.fromkeys(forms, 0.0)
    for queries, channels, per_step in SHAPES:
        weights = layers(channels, "cuda", torch.half)
        x = torch.randn(2, queries, channels, device="cuda", dtype=torch.half)
        want = chain("sdpa", *(w.float() for w in weights))(x.float())
        row = {}
        for form in forms:
            with torch.no_grad():
                error = (chain(form, *(w.float() for w in weights))(x.float()) - want).norm() / want.norm()
                compiled = torch.compile(chain(form, *weights), fullgraph=True, dynamic=False,
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
