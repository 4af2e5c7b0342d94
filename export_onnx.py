"""Export the fp32 ONNX graphs of the TensorRT engines (clip, union, vae) into engines/.

    python3 export_onnx.py                       # SD1.5 at the graded 256x384, skips current files
    python3 export_onnx.py --force --skip-parity union
    python3 export_onnx.py --config tiny --checkpoint /tmp/tiny.pth --engine-dir /tmp/engines

Each graph is simplified, checked (onnx.checker, shape inference, spec I/O, finite constants) and
run in onnxruntime against PyTorch; see sdcanny/onnx_export.py and docs/tensorrt.md.
"""
import argparse
import sys
from pathlib import Path

from sdcanny.checkpoint import DEFAULT_CHECKPOINT, missing_checkpoint_message
from sdcanny.config import CONFIGS
from sdcanny.engine_specs import DEFAULT_HEIGHT, DEFAULT_WIDTH, ENGINE_NAMES, engine_specs
from sdcanny.onnx_export import OPSET, export_all


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help="image height (multiple of 64)")
    ap.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="image width (multiple of 64)")
    ap.add_argument("--engine-dir", type=Path, default=Path("engines"))
    ap.add_argument("--engines", nargs="+", choices=ENGINE_NAMES, default=list(ENGINE_NAMES))
    ap.add_argument("--force", action="store_true", help="re-export even where the .onnx is current")
    ap.add_argument("--skip-parity", nargs="*", choices=ENGINE_NAMES, default=[],
                    help="skip the onnxruntime-vs-PyTorch check of these graphs (saves time and RAM)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the parity check's random inputs")
    ap.add_argument("--opset", type=int, default=OPSET)
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        print(missing_checkpoint_message(args.checkpoint), file=sys.stderr)
        return 1
    specs = engine_specs(CONFIGS[args.config], args.height, args.width)
    export_all([specs[n] for n in args.engines], CONFIGS[args.config], args.checkpoint, args.engine_dir,
               args.force, tuple(args.skip_parity), args.seed, args.opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
