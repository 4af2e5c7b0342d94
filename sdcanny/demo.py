"""`bash run_demo.sh`: one built-in photograph through hackathon().process(), saved as a PNG.

With models/control_sd15_canny.pth it runs the graded call on the fastest back-end; without it, it
makes the tiny synthetic checkpoint and runs the same call at a small resolution on the CPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from .config import TINY
from .image import stand_in_photo
from .optional import optional
from .paths import DEFAULT_CHECKPOINT, OUTPUTS_DIR, PROJECT_ROOT, default_checkpoint
from .pipeline import GRADED_CALL
from .synthetic import synthetic_state_dict, write_checkpoint

TINY_CHECKPOINT = PROJECT_ROOT / "models" / "tiny.pth"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default=None, help="reference | torch | trt (default: fastest available)")
    ap.add_argument("--out", type=Path, default=OUTPUTS_DIR / "demo.png")
    args = ap.parse_args(argv)

    checkpoint = default_checkpoint()
    if checkpoint.is_file():
        config, resolution = "sd15", 256
    else:
        print(f"{checkpoint} not found: using the tiny synthetic checkpoint {TINY_CHECKPOINT}.\n"
              "  Synthetic weights are random: the result is noise-like by design, not a picture. For a real\n"
              f"  image put the original control_sd15_canny.pth at {DEFAULT_CHECKPOINT}.")
        if not TINY_CHECKPOINT.is_file():
            write_checkpoint(synthetic_state_dict(TINY, seed=0), TINY_CHECKPOINT)
        checkpoint, config, resolution = TINY_CHECKPOINT, "tiny", 64

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from canny2image_TRT import hackathon

    h = hackathon(backend=args.backend, checkpoint=checkpoint, config=config)
    h.initialize()
    skimage_data = optional("skimage.data", "the demo uses a generated test pattern instead of its cat photo")
    image = (cv2.cvtColor(skimage_data.chelsea(), cv2.COLOR_RGB2BGR) if skimage_data is not None
             else stand_in_photo((300, 451, 3)))
    result = h.process(image, **{**GRADED_CALL, "prompt": "a cat", "image_resolution": resolution})[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), np.concatenate([cv2.resize(image, result.shape[1::-1]), result], axis=1))
    timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in h.pipeline.last_timings.items())
    print(f"wrote {args.out} (input | result, {result.shape[1]}x{result.shape[0]}); {timings}")


if __name__ == "__main__":
    main()
