"""How much the canny map steers the image on synthetic checkpoints: PSNR between the graded call's
outputs for two different photographs, and (for scale) for two different prompts, per
`--control-gain` of sdcanny.synthetic. Low PSNR = strong influence; a fidelity comparison can only
see an error in the hint path (resize, Canny, hint block, control scales) where the hint steers.

    python3 benchmarks/hint_influence.py --config sd15 --gains 1,4,16,64      # on a GPU: ~10 s per gain
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcanny.checkpoint import load_state_networks  # noqa: E402
from sdcanny.config import CONFIGS  # noqa: E402
from sdcanny.metrics import psnr  # noqa: E402
from sdcanny.pipeline import GRADED_CALL, Canny2Image  # noqa: E402
from sdcanny.reference import ReferenceBackend  # noqa: E402
from sdcanny.synthetic import synthetic_state_dict  # noqa: E402


def photographs(height: int) -> tuple:
    import skimage.data
    width = height * 3 // 2
    return tuple(cv2.resize(cv2.cvtColor(getattr(skimage.data, name)(), cv2.COLOR_RGB2BGR), (width, height))
                 for name in ("chelsea", "coffee"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--gains", default="1,4,16,64")
    ap.add_argument("--resolution", type=int, default=GRADED_CALL["image_resolution"])
    ap.add_argument("--steps", type=int, default=GRADED_CALL["ddim_steps"])
    args = ap.parse_args()
    cfg, device = CONFIGS[args.config], "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    a, b = photographs(args.resolution)
    call = {**GRADED_CALL, "image_resolution": args.resolution, "ddim_steps": args.steps}
    print(f"| control gain | photo swap PSNR dB | prompt swap PSNR dB | ({args.config}, {device}, "
          f"resolution {args.resolution}, {args.steps} steps) |\n|---|---|---|---|")
    for gain in (float(g) for g in args.gains.split(",")):
        start = time.perf_counter()
        nets = load_state_networks(synthetic_state_dict(cfg, seed=0, control_gain=gain), cfg)
        pipe = Canny2Image(ReferenceBackend(nets, device), cfg)
        out_a, out_b = pipe.process(a, **call)[0], pipe.process(b, **call)[0]
        out_prompt = pipe.process(a, **{**call, "prompt": "a cat"})[0]
        print(f"| {gain:g} | {psnr(out_a, out_b):.1f} | {psnr(out_a, out_prompt):.1f} | "
              f"{time.perf_counter() - start:.0f} s |", flush=True)
        del nets, pipe
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()
