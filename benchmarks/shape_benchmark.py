"""Per size: the first process() in a fresh process (its parts' first runs uncaptured, the step
captured at its second step), the second (which captures encode and decode) and the steady state
after them, plus the initialize() that precedes them; for the torch back-end as `initialize()`
finds it (with the programs of `preprocess.sh` in engines/ when they are current).

    python3 benchmarks/shape_benchmark.py --checkpoint /tmp/sd15.pth --out results/

The input is a 2:3 photograph, so image_resolution r gives an r x 1.5r work image (256 -> the
graded 256x384), both sides rounded to multiples of 64 as the front end rounds them. Sizes run
largest first, so a run cut short by --budget-s still has the worst first calls. Writes shapes.md
and shapes.json to --out after every size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from canny2image_TRT import hackathon  # noqa: E402
from gpu_benchmark import graded_photos  # noqa: E402
from sdcanny.image import work_size  # noqa: E402
from sdcanny.paths import DEFAULT_ENGINE_DIR, default_checkpoint  # noqa: E402
from sdcanny.pipeline import GRADED_CALL, Canny2Image  # noqa: E402


def timed_call(pipeline: Canny2Image, img, **call) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipeline.process(img, **call)
    return time.perf_counter() - start


def measure_size(pipeline: Canny2Image, img: np.ndarray, call: dict, repeats: int) -> dict:
    """One size's row (the size `call`'s image_resolution and num_samples make of `img`): its first
    call, second call and steady state (median of `repeats`) on the torch back-end, the form it ran
    in and what the back-end said during the first call."""
    backend, resolution, samples = pipeline.backend, call["image_resolution"], call["num_samples"]
    said = len(backend.notes)
    first = timed_call(pipeline, img, **call)
    run = next(reversed(backend.runs.values()))  # the size just used is the most recent
    notes = backend.notes[said:]  # e.g. a kind of programs loaded for this size, inside its first call
    second = timed_call(pipeline, img, **call)
    steady = [timed_call(pipeline, img, **call) for _ in range(repeats)]
    work = "x".join(map(str, work_size(*img.shape[:2], resolution)))
    return {"resolution": resolution, "samples": samples, "work": work, "form": run.form, "first_s": first,
            "second_s": second, "capture_s": run.capture_s, "steady_ms": float(np.median(steady)) * 1000,
            "notes": notes}


def table(meta: dict, rows: list[dict]) -> str:
    lines = [f"device: {meta['device']}; torch {meta['torch']}; date {meta['date']}; commit {meta['commit']}",
             f"command: `{meta['command']}`",
             f"initialize(): {meta['initialize_s']:.1f} s ({meta['startup']})", "",
             "| image_resolution | work size | num_samples | form | first call s | second call s | capture s (both) "
             "| steady ms (median) | first / steady | second / steady |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['work']} | {r['samples']} | {r['form']} | {r['first_s']:.2f} "
                     f"| {r['second_s']:.2f} | {r['capture_s']:.2f} | {r['steady_ms']:.1f} "
                     f"| {r['first_s'] * 1000 / r['steady_ms']:.2f}x | {r['second_s'] * 1000 / r['steady_ms']:.2f}x |")
    noted = [f"- {r['work']} x{r['samples']}: {note}" for r in rows for note in r.get("notes", ())]
    if noted:
        lines += ["", "Said during a first call:", *noted]
    if rows:
        worst = max(rows, key=lambda r: r["first_s"])
        res = sorted({r["resolution"] for r in rows})
        ns = sorted({r["samples"] for r in rows})
        lines += ["", f"worst first call: {worst['first_s']:.2f} s ({worst['work']}, {worst['samples']} samples) "
                  f"over resolutions {res[0]}..{res[-1]} and num_samples {ns[0]}..{ns[-1]} ({len(rows)} sizes)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    ap.add_argument("--engine-dir", type=Path, default=DEFAULT_ENGINE_DIR)
    ap.add_argument("--resolutions", default="256,320,384,448,512,576,640,704,768")
    ap.add_argument("--samples", default="1,2,3,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", choices=["default", "none"], default="default",
                    help="none: an eager back-end (initialize() then compiles nothing; other sizes are eager anyway)")
    ap.add_argument("--tune-new-sizes", action="store_true", help="cuDNN times its convolution algorithms for every new size, not the first alone")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new size after this many seconds")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", type=Path, default=Path("outputs/shapes"))
    args = ap.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    options = {"compile": None if args.compile == "none" else args.compile, "tune_new_sizes": args.tune_new_sizes}
    h = hackathon(backend="torch", checkpoint=args.checkpoint, engine_dir=args.engine_dir, backend_options=options)
    h.initialize()
    backend = h.pipeline.backend
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": args.commit, "command": " ".join(sys.argv), "initialize_s": h.initialize_seconds,
            "startup": backend.startup_summary()}
    img = next(iter(graded_photos(1).values()))  # 256x384 (2:3)
    sizes = [(int(r), int(n)) for r in args.resolutions.split(",") for n in args.samples.split(",")]
    sizes.sort(key=lambda rn: -rn[0] * rn[0] * rn[1])  # most work first
    rows = []
    for resolution, samples in sizes:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget reached: {len(sizes) - len(rows)} sizes not run", flush=True)
            break
        call = {**GRADED_CALL, "num_samples": samples, "image_resolution": resolution}
        row = measure_size(h.pipeline, img, call, args.repeats)
        rows.append(row)
        print(f"{resolution} x{samples}: first {row['first_s']:.2f} s, second {row['second_s']:.2f} s, steady "
              f"{row['steady_ms']:.1f} ms ({row['form']}){''.join('; ' + n for n in row['notes'])}", flush=True)
        (args.out / "shapes.md").write_text(table(meta, rows))
        (args.out / "shapes.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(meta, rows))


if __name__ == "__main__":
    main()
