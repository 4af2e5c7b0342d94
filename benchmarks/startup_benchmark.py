"""initialize() in fresh processes, as a user's start meets it: one child process per start, each
importing the entry point, then `hackathon(backend=...).initialize()` (for the torch back-end with
the programs of `preprocess.sh` in engines/ when they are current). Per start: the imports, the
initialize() time and its stages as the back-end reports them.

    python3 benchmarks/startup_benchmark.py --checkpoint /tmp/sd15.pth --processes 3 --out results/

With --profile, one more start runs initialize() under cProfile and the busiest functions go to
profile_initialize.txt (the whole profile to profile_initialize.prof). Writes startup.md and
startup.json to --out.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> None:
    """One start, reported as a JSON line on stdout."""
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import torch

    from canny2image_TRT import hackathon
    imported = time.perf_counter() - start
    h = hackathon(backend=args.backend, checkpoint=args.checkpoint, config=args.config, engine_dir=args.engine_dir)
    profiler = cProfile.Profile() if args.profile_to else None
    if profiler is not None:
        profiler.enable()
    h.initialize()
    if profiler is not None:
        profiler.disable()
        write_profile(profiler, Path(args.profile_to))
    backend = h.pipeline.backend
    print(json.dumps({"imports_s": imported, "initialize_s": h.initialize_seconds,
                      "startup": dict(getattr(backend, "startup", {})), "notes": list(getattr(backend, "notes", [])),
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "torch": torch.__version__}))


def write_profile(profiler: cProfile.Profile, path: Path, lines: int = 45) -> None:
    """The busiest functions to `path`, and the whole profile beside it (.prof, for pstats)."""
    profiler.dump_stats(str(path.with_suffix(".prof")))
    text = []
    for key in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(lines)
        text.append(f"==== initialize() by {key}\n{stream.getvalue()}")
    path.write_text("\n".join(text))


def start_child(args, profile_to: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", "--backend", args.backend, "--checkpoint", str(args.checkpoint),
               "--config", args.config, "--engine-dir", str(args.engine_dir)] + (["--profile-to", str(profile_to)] if profile_to else [])
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"a start failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(meta: dict, starts: list[dict]) -> str:
    stages = list(dict.fromkeys(name for s in starts for name in s["startup"]))
    header = ["start", "imports s", "initialize s", *(f"{name} s" for name in stages)]
    lines = [f"device: {meta['device']}; torch {meta['torch']}; date {meta['date']}; commit {meta['commit']}",
             f"command: `{meta['command']}`", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, s in enumerate(starts, 1):
        cells = [str(i), f"{s['imports_s']:.1f}", f"{s['initialize_s']:.1f}",
                 *(f"{s['startup'][name]:.1f}" if name in s["startup"] else "" for name in stages)]
        lines.append("| " + " | ".join(cells) + " |")
    times = [s["initialize_s"] for s in starts]
    lines += ["", f"initialize(): median {np.median(times):.1f} s, range {min(times):.1f}-{max(times):.1f} s "
              f"over {len(times)} fresh processes"]
    notes = sorted({note for s in starts for note in s["notes"]})
    return "\n".join(lines + [f"- said: {note}" for note in notes]) + "\n"


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from sdcanny.paths import DEFAULT_ENGINE_DIR, default_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    ap.add_argument("--engine-dir", type=Path, default=DEFAULT_ENGINE_DIR)
    ap.add_argument("--config", default="sd15")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="one more start, under cProfile")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--out", type=Path, default=Path("outputs/startup"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    starts = []
    for i in range(args.processes):
        starts.append(start_child(args))
        print(f"start {i + 1}: initialize {starts[-1]['initialize_s']:.1f} s {starts[-1]['startup']}", flush=True)
    if args.profile:
        profiled = start_child(args, args.out.resolve() / "profile_initialize.txt")
        print(f"profiled start: initialize {profiled['initialize_s']:.1f} s (under cProfile)", flush=True)
    meta = {"device": starts[0]["device"], "torch": starts[0]["torch"], "date": time.strftime("%Y-%m-%d"),
            "commit": args.commit, "command": " ".join(sys.argv)}
    (args.out / "startup.json").write_text(json.dumps({"meta": meta, "starts": starts}, indent=1))
    report = table(meta, starts)
    (args.out / "startup.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
