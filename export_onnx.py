"""Export the ONNX graphs of the TensorRT engines (clip, union, vae) into engines/.

    python3 export_onnx.py                       # SD1.5 at the graded 256x384, for the installed TensorRT
    python3 export_onnx.py --tensorrt 8.6        # the hackathon docker's: opset 17, fp32 graphs
    python3 export_onnx.py --tensorrt 11         # opset 18, the union and vae graphs in fp16 (strongly typed)
    python3 export_onnx.py --force --skip-parity union
    python3 export_onnx.py --config tiny --checkpoint /tmp/tiny.pth --engine-dir /tmp/engines

Each graph is simplified (where onnxsim or onnxslim is installed), checked (onnx.checker, shape
inference, spec I/O, finite constants) and run in onnxruntime (where installed) against PyTorch;
see sdcanny/onnx_export.py and docs/tensorrt.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdcanny.checkpoint import missing_checkpoint_message
from sdcanny.config import CONFIGS
from sdcanny.engine_specs import (
    DEFAULT_HEIGHT,
    DEFAULT_WIDTH,
    DOCKER_TARGET,
    ENGINE_NAMES,
    TARGETS,
    TYPINGS,
    engine_specs,
    installed_tensorrt_version,
    target_of,
)
from sdcanny.onnx_export import export_all, opset_for
from sdcanny.paths import DEFAULT_ENGINE_DIR, default_checkpoint


def choose_target(requested: str | None) -> str:
    if requested is not None:
        return requested
    version = installed_tensorrt_version()
    if version is None:
        print(f"[export] TensorRT is not installed here: exporting for TensorRT {DOCKER_TARGET} (the hackathon "
              "docker's), which TensorRT 10 builds too; pass --tensorrt 11 for TensorRT 11")
        return DOCKER_TARGET
    return target_of(version)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="default: %(default)s")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--height", type=int, default=DEFAULT_HEIGHT, help="image height (multiple of 64)")
    ap.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="image width (multiple of 64)")
    ap.add_argument("--engine-dir", type=Path, default=DEFAULT_ENGINE_DIR, help="default: %(default)s")
    ap.add_argument("--engines", nargs="+", choices=ENGINE_NAMES, default=list(ENGINE_NAMES))
    ap.add_argument("--tensorrt", choices=sorted(TARGETS), default=None,
                    help="the TensorRT the engines are for (default: the installed one, else 8.6)")
    ap.add_argument("--typing", choices=TYPINGS, default=None,
                    help="weak: fp32 graphs, TensorRT makes fp16 (8.6, 10); strong: fp16 graphs with fp32 "
                         "islands (10, 11). Default: the target's first")
    ap.add_argument("--force", action="store_true", help="re-export even where the .onnx is current")
    ap.add_argument("--skip-parity", nargs="*", choices=ENGINE_NAMES, default=[],
                    help="skip the onnxruntime-vs-PyTorch check of these graphs (saves time and RAM)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the parity check's random inputs")
    args = ap.parse_args(argv)
    if not args.checkpoint.is_file():
        print(missing_checkpoint_message(args.checkpoint), file=sys.stderr)
        return 1
    target_name = choose_target(args.tensorrt)
    target = TARGETS[target_name]
    typing = args.typing or target.typings[0]
    if typing not in target.typings:
        ap.error(f"TensorRT {target_name} builds only {' or '.join(target.typings)} typed networks")
    opset = opset_for(target_name)
    specs = engine_specs(CONFIGS[args.config], args.height, args.width, typing=typing)
    print(f"[export] for TensorRT {target_name}: opset {opset}, {typing} typing")
    export_all([specs[n] for n in args.engines], CONFIGS[args.config], args.checkpoint, args.engine_dir,
               args.force, tuple(args.skip_parity), args.seed, opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
