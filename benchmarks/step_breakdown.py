"""Where one compiled sampler step's time goes, at the graded size: the step's stage graphs timed
alone and together (the ControlNet, the UNet's encoder half, both on two streams, the decoder
half), one step's kernels with stream, start, duration and grid (step_kernels.csv), and each
attention shape of the step under each SDPA back-end. Compiles in-process (about 90 s).

    python3 benchmarks/step_breakdown.py [CHECKPOINT]   # writes stage_times.txt, step_kernels.csv, attention.md to $OUT
"""
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from canny2image_TRT import hackathon  # noqa: E402
from gpu_benchmark import graded_photos, NO_PROGRAMS_DIR  # noqa: E402
from sdcanny.pipeline import GRADED_ARGS  # noqa: E402
from sdcanny.stages import step_inputs  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/diag"))
OUT.mkdir(parents=True, exist_ok=True)
CHECKPOINT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sd15.pth")
h = hackathon(backend="torch", checkpoint=CHECKPOINT, engine_dir=NO_PROGRAMS_DIR, backend_options={"compile": "default"})
t0 = time.perf_counter()
h.initialize()
print(f"initialize {time.perf_counter() - t0:.1f} s", flush=True)
imgs = list(graded_photos(4).values())
for img in imgs:
    h.process(img, *GRADED_ARGS)
backend = h.pipeline.backend
run = next(reversed(backend.runs.values()))
fns, b = run.fns, run.buffers
torch.cuda.synchronize()
ms = []
for img in imgs * 2:
    torch.cuda.synchronize()
    t = time.perf_counter()
    h.process(img, *GRADED_ARGS)
    ms.append((time.perf_counter() - t) * 1000)
print(f"graded ms: {sorted(ms)} median {sorted(ms)[len(ms)//2]:.1f}", flush=True)

x2 = step_inputs(b.x, backend.dtype, backend.share_first_layers)
control_time, unet_time = backend.stages.split_time_row(b.time_row)


def ctl():
    return fns["control"](x2, control_time, b.control_context, b.hint_features)


def enc():
    return fns["unet_encode"](x2, unet_time, b.unet_context)


def both():  # as the step runs them: the ControlNet on the side stream beside the encoder half
    return backend.encoder_halves(fns, b, x2, control_time, unet_time)


controls, (hh, skips) = both()
torch.cuda.synchronize()


def dec():
    return fns["unet_decode"](hh, skips, unet_time, b.unet_context, controls, b.control_scales, b.x.clone(),
                              b.step_row, b.guidance, b.noise)


def replay_ms(graph, replays: int, rounds: int) -> float:
    """Milliseconds per replay: the median over `rounds` of `replays` back-to-back replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return sorted(times)[len(times) // 2]


def graph_ms(fn, replays=50, rounds=5):
    """fn captured alone into a graph (after one uncaptured run), timed by replay_ms."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return replay_ms(graph, replays, rounds)


lines = []
for name, fn in (("control alone", ctl), ("unet_encode alone", enc), ("control || unet_encode", both),
                 ("unet_decode alone", dec)):
    lines.append(f"{name}: {graph_ms(fn):.3f} ms")
for name in run.graphs:  # text only where the prompts changed after the first call at this size
    lines.append(f"graph {name}: {replay_ms(run.graphs[name], replays=20, rounds=1):.3f} ms")
print("\n".join(lines), flush=True)
(OUT / "stage_times.txt").write_text("\n".join(lines) + "\n")

# one step's kernels
from torch.profiler import ProfilerActivity, profile  # noqa: E402
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    run.graphs["step"].replay()
    torch.cuda.synchronize()
prof.export_chrome_trace("/tmp/step_trace.json")
events = json.load(open("/tmp/step_trace.json"))["traceEvents"]
kern = [e for e in events if e.get("cat") == "kernel"]
kern.sort(key=lambda e: e["ts"])
t0 = kern[0]["ts"]
rows = ["start_us,dur_us,stream,grid,block,name"]
for e in kern:
    a = e.get("args", {})
    rows.append(f"{e['ts'] - t0:.1f},{e['dur']:.1f},{a.get('stream')},{'x'.join(map(str, a.get('grid', [])))},"
                f"{'x'.join(map(str, a.get('block', [])))},\"{e['name'][:150]}\"")
(OUT / "step_kernels.csv").write_text("\n".join(rows) + "\n")
by_stream = defaultdict(float)
for e in kern:
    by_stream[e["args"].get("stream")] += e["dur"]
span = kern[-1]["ts"] + kern[-1]["dur"] - t0
print(f"step kernels {len(kern)}, span {span:.0f} us, busy per stream {dict(by_stream)}", flush=True)


# attention shapes in the step, per SDPA backend
class Rec(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.overloadpacket.__name__:
            q, k = args[0], args[1]
            self.seen[(tuple(q.shape), tuple(k.shape), func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


st = backend.stages
rec = Rec()
with torch.no_grad(), rec:
    cs = st.control(x2, control_time, b.control_context, b.hint_features)
    e2 = st.unet_encode(x2, unet_time, b.unet_context)
    st.unet_decode(*e2, unet_time, b.unet_context, cs, b.control_scales, b.x.clone(), b.step_row, b.guidance, b.noise)
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
SDPA_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
att = ["| q | k | eager op | count | " + " | ".join(x.name for x in SDPA_BACKENDS) + " |"]
for (qs, ks, op), n in sorted(rec.seen.items()):
    q = torch.randn(qs, device="cuda", dtype=torch.float16)
    k = torch.randn(ks, device="cuda", dtype=torch.float16)
    v = torch.randn(ks, device="cuda", dtype=torch.float16)
    cells = []
    for be in SDPA_BACKENDS:
        try:
            with sdpa_kernel(be):
                per_call = graph_ms(lambda: F.scaled_dot_product_attention(q, k, v), replays=20)
            cells.append(f"{per_call * 1000:.1f}")
        except Exception as exc:  # a backend that does not take the shape
            cells.append(f"n/a ({type(exc).__name__})")
    att.append(f"| {qs} | {ks} | {op} | {n} | " + " | ".join(cells) + " |")
print("\n".join(att), flush=True)
(OUT / "attention.md").write_text("\n".join(att) + "\n")
