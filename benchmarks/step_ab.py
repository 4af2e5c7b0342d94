"""Variants of the fast back-end's graded step against each other in one process: each variant
(gpu_benchmark.py's VARIANTS) built and run on a graded photo until its step is a CUDA graph, then
the variants' step graphs replayed in turn, round after round (the order rotated each round), so
that drift of the machine's clock or temperature falls on all of them alike.

Whole calls in one process differ by up to 0.6 ms between two runs of the same variant
(docs/benchmarks.md), about 30 µs a step. Here each build's step comes out within a few
microseconds (the 10th to 90th percentile of its samples about 10 µs apart); what remains is
between builds. Each sample is `--replays` back-to-back replays of one variant's step graph, timed
by CUDA events; each variant's latents are put back before its sample, so every replay computes the
same step. The difference against the first build is the median of the rounds' paired differences.

    python3 benchmarks/step_ab.py --variants jit,attention-1536,attention-1536,jit [--rounds 40 --replays 20]

(a variant named again is built again, in the same process: its row is the method's own spread).
Name them in a balanced order (A,B,B,A): in the H100 runs of docs/benchmarks.md, a process's later
builds of the same variant ran 0-34 µs a step slower than its first.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from canny2image_TRT import hackathon  # noqa: E402
from gpu_benchmark import COMPILED_IN_PROCESS, NO_PROGRAMS_DIR, VARIANTS, graded_photos  # noqa: E402
from graph_timing import graph_us  # noqa: E402
from sdcanny.paths import DEFAULT_ENGINE_DIR, default_checkpoint  # noqa: E402
from sdcanny.pipeline import GRADED_ARGS  # noqa: E402


def captured_step(variant: str, checkpoint: Path, image) -> tuple:
    """(hackathon, step graph, latents buffer, its value after the call) for `variant`: two graded
    calls, the step captured in the first and replayed in the second."""
    engine_dir = NO_PROGRAMS_DIR if variant in COMPILED_IN_PROCESS else DEFAULT_ENGINE_DIR
    h = hackathon(backend="torch", checkpoint=checkpoint, engine_dir=engine_dir, backend_options=VARIANTS[variant])
    h.initialize()
    for _ in range(2):
        h.process(image, *GRADED_ARGS)
    run = next(reversed(h.pipeline.backend.runs.values()))
    if "step" not in run.graphs:
        raise RuntimeError(f"{variant}: the step was not captured (form {run.form})")
    return h, run.graphs["step"], run.buffers.x, run.buffers.x.clone()


def build_labels(variants: list[str]) -> list[str]:
    """A label per build: a variant named again is built again, and its difference from its first
    build is the method's own spread."""
    counts: dict = {}
    labels = []
    for v in variants:
        counts[v] = counts.get(v, 0) + 1
        labels.append(v if counts[v] == 1 else f"{v} (build {counts[v]})")
    return labels


def time_rounds(steps: dict, labels: list[str], rounds: int, replays: int) -> dict:
    """label -> µs a step, one sample a round: the builds in turn, the order rotated each round."""
    samples: dict = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            _, graph, x, x0 = steps[label]
            x.copy_(x0)  # every sample computes the same step
            samples[label].append(graph_us(graph, replays))
    return samples


def table(samples: dict, base: str) -> list[str]:
    """Markdown rows: each build's median and spread, and its median paired difference from `base`."""
    lines = [f"| variant | step µs, median | p10 | p90 | against {base}: median paired difference µs "
             "| per graded call (x20) ms |", "|---|---|---|---|---|---|"]
    for label, own in samples.items():
        s = sorted(own)
        diff = statistics.median(a - b for a, b in zip(own, samples[base]))
        lines.append(f"| {label} | {statistics.median(s):.1f} | {s[len(s) // 10]:.1f} | {s[len(s) * 9 // 10]:.1f} | "
                     f"{diff:+.1f} | {diff * 20 / 1000:+.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    ap.add_argument("--variants", required=True, help=f"two or more of {', '.join(VARIANTS)}; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--replays", type=int, default=20, help="step replays a sample (a graded call makes 20)")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", type=Path, default=Path("outputs/step_ab.md"))
    args = ap.parse_args()
    variants = args.variants.split(",")
    if len(variants) < 2 or not set(variants) <= set(VARIANTS):
        ap.error(f"--variants takes two or more of {', '.join(VARIANTS)}, got {args.variants}")
    labels = build_labels(variants)
    image = next(iter(graded_photos(1).values()))
    steps = {}
    for label, v in zip(labels, variants):
        start = time.perf_counter()
        steps[label] = captured_step(v, args.checkpoint, image)
        print(f"{label}: built and captured in {time.perf_counter() - start:.0f} s", flush=True)
    samples = time_rounds(steps, labels, args.rounds, args.replays)
    lines = [f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}; "
             f"commit {args.commit}", f"command: `{' '.join(sys.argv)}`",
             f"{args.rounds} rounds of {args.replays} step replays a variant, the order rotated each round", "",
             *table(samples, labels[0])]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
