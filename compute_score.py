"""Graded run of the TensorRT Hackathon 2023 canny2image task: fidelity and speed, with a report.

    python3 compute_score.py                                   # fastest back-end, built-in photos
    python3 compute_score.py --images pictures_croped          # the hackathon's bird_*.jpg
    python3 compute_score.py --backend trt --against torch     # any two back-ends
    python3 compute_score.py --config tiny --checkpoint models/tiny.pth --resolution 64   # CPU / CI

Each image goes through process(img, prompt, "best quality, extremely detailed", "longbody, lowres,
bad anatomy, bad hands, missing fingers", 1, 256, 20, False, 1, 9, 2946901, 0.0, 100, 200) on the
candidate back-end and is compared with the fp32 reference's image (cached on disk). Prints per
image and on average: latency, PD, PSNR, SSIM, and the hackathon's gates (mean PD < 12, mean
latency < 2600 ms); writes images, score.json, summary.md and contact_sheet.png to --out.
Exit status: 0 on success (gates failing too, unless --strict: then 1), 2 on bad input.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sdcanny.backends import BACKENDS
from sdcanny.config import CONFIGS
from sdcanny.paths import default_checkpoint
from sdcanny.score import DEFAULT_CACHE_DIR, GRADED, ScoreError, ScoreOptions, run


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="CPU / CI: --config tiny --checkpoint models/tiny.pth --resolution 64 "
                                        "(make it with: python3 -m sdcanny.synthetic --config tiny --out "
                                        "models/tiny.pth). See docs/scoring.md.")
    ap.add_argument("--backend", choices=BACKENDS, default=None,
                    help="candidate back-end (default: the fastest available: trt, torch, reference)")
    ap.add_argument("--against", choices=BACKENDS, default="reference",
                    help="back-end the candidate is compared with (default: reference, whose images are cached)")
    ap.add_argument("--images", type=Path, default=None,
                    help="directory of test images (*.jpg, *.png, ...), read with cv2.imread; default: "
                         "built-in photographs from scikit-image, each with its own prompt")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N images")
    ap.add_argument("--prompt", default=None,
                    help="prompt for every image (default: 'a bird' for --images, per-image for built-ins)")
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="default: %(default)s")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15", help="model config (default: sd15)")
    ap.add_argument("--resolution", type=int, default=GRADED["image_resolution"],
                    help=f"image_resolution (default: {GRADED['image_resolution']})")
    ap.add_argument("--steps", type=int, default=GRADED["ddim_steps"],
                    help=f"ddim_steps (default: {GRADED['ddim_steps']})")
    ap.add_argument("--seed", type=int, default=GRADED["seed"], help=f"default: {GRADED['seed']}")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs on the first image before timing (default: 1)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="timed runs per image; the median is reported (default: 1)")
    ap.add_argument("--no-reference-timing", action="store_true",
                    help="do not time the --against back-end (no speedup figure); cached images are reused")
    ap.add_argument("--refresh", action="store_true", help="recompute the cached reference images")
    ap.add_argument("--step-error", action="store_true",
                    help="also report the per-step latent divergence between the two back-ends")
    ap.add_argument("--out", type=Path, default=None, help="report directory (default outputs/score-<timestamp>/)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                    help=f"reference image cache (default: {DEFAULT_CACHE_DIR}/)")
    ap.add_argument("--device", default=None, help="torch device for the back-ends (default: cuda if present)")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless both hackathon gates pass")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    opts = ScoreOptions(
        backend=args.backend, against=args.against, checkpoint=args.checkpoint, config=args.config,
        images=args.images, limit=args.limit, resolution=args.resolution, steps=args.steps, seed=args.seed,
        prompt=args.prompt, warmup=args.warmup, repeat=args.repeat, reference_timing=not args.no_reference_timing,
        refresh=args.refresh, step_error=args.step_error, out=args.out, cache_dir=args.cache_dir,
        device=args.device, command=shlex.join(["python3", "compute_score.py", *argv]))
    try:
        from canny2image_TRT import hackathon
        report = run(opts, hackathon)
    except ScoreError as exc:
        print(f"compute_score.py: error: {exc}", file=sys.stderr)
        return 2
    if args.strict and report["gates"]["verdict"] != "PASS":
        print(f"compute_score.py: --strict: the gates did not pass ({report['gates']['verdict']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
