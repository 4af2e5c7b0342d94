"""Build the TensorRT engines (engines/<stem>.plan) from the ONNX graphs export_onnx.py wrote.

    python3 build_engines.py                         # all three, SD1.5 at 256x384, for the installed TensorRT
    python3 build_engines.py --precision vae=fp32    # per-engine precision override
    python3 build_engines.py --typing strong         # TensorRT 10: build from the fp16 graphs (export --typing strong)
    python3 build_engines.py --force

TensorRT 8.6 and 10.x build weakly typed fp16 engines from the fp32 graphs (with the timestep's
computations pinned to fp32; --fp32-norms pins the normalisations too); TensorRT 11 builds
strongly typed engines from the fp16 graphs with their fp32 islands. An engine is rebuilt when its .plan is missing, when
its ONNX file changed, or when any build flag changed (precision, typing, optimization level,
shapes, TensorRT version, GPU); the JSON record beside each .plan holds what it was built from.
Needs TensorRT (8.6, 10.x or 11.x) and a CUDA GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdcanny.config import CONFIGS
from sdcanny.engine_specs import (
    DEFAULT_HEIGHT,
    DEFAULT_OPTIMIZATION_LEVEL,
    DEFAULT_WIDTH,
    ENGINE_NAMES,
    TYPINGS,
    build_flags,
    engine_specs,
    needs_rebuild,
    onnx_sha256,
    parse_precisions,
    write_build_record,
)
from sdcanny.optional import progress, write
from sdcanny.paths import DEFAULT_ENGINE_DIR

# --fp32-norms: weakly typed fp16 engines keep these layer types in fp32, as the strongly typed graphs
# do (networks.fp32_islands). Off by default: on the H100 the same islands in the torch back-end
# bought no fidelity and cost 3.6 ms per image (docs/benchmarks.md); never measured on TensorRT
FP32_NORM_LAYER_TYPES = ("NORMALIZATION",)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    ap.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    ap.add_argument("--engine-dir", type=Path, default=DEFAULT_ENGINE_DIR, help="default: %(default)s")
    ap.add_argument("--engines", nargs="+", choices=ENGINE_NAMES, default=list(ENGINE_NAMES))
    ap.add_argument("--precision", nargs="*", default=[], metavar="ENGINE=fp16|fp32",
                    help="override the table's precision, e.g. --precision clip=fp16 vae=fp32")
    ap.add_argument("--typing", choices=TYPINGS, default=None,
                    help="default: weak where the installed TensorRT has it (8.6, 10), else strong (11)")
    ap.add_argument("--fp32-norms", action="store_true",
                    help="weak typing: pin the normalisation layers to fp32 as well (if PD suffers)")
    ap.add_argument("--optimization-level", type=int, default=DEFAULT_OPTIMIZATION_LEVEL, choices=range(6))
    ap.add_argument("--force", action="store_true", help="rebuild even where the engine is current")
    ap.add_argument("--verbose", action="store_true", help="TensorRT's full build log")
    args = ap.parse_args(argv)

    try:
        import trt_utils  # only here: --help and this message work without TensorRT
    except ImportError as exc:
        print(f"build_engines.py needs TensorRT 8.6, 10.x or 11.x ({exc}); in the hackathon docker it is "
              "installed, elsewhere: pip install tensorrt", file=sys.stderr)
        return 1
    trt_utils.require_supported()
    if args.verbose:
        trt_utils.log_verbose()
    typing = args.typing or trt_utils.FEATURES.default_typing()
    specs = engine_specs(CONFIGS[args.config], args.height, args.width, parse_precisions(args.precision), typing)
    gpu, version = trt_utils.gpu_name(), trt_utils.tensorrt_version()
    timing_cache = args.engine_dir / "timing_cache.bin"
    layer_types = FP32_NORM_LAYER_TYPES if args.fp32_norms else ()
    for name in progress(args.engines, desc="engines", unit="engine"):
        spec = specs[name]
        if not spec.onnx_path(args.engine_dir).is_file():
            typing_flag = " --typing strong" if spec.onnx_precision == "fp16" else ""
            print(f"[build] {spec.onnx_path(args.engine_dir)} does not exist: run `python3 export_onnx.py{typing_flag}` "
                  "first", file=sys.stderr)
            return 1
        flags = build_flags(spec, version, gpu, args.optimization_level)
        weak_fp16 = typing == "weak" and spec.precision == "fp16"
        flags["fp32_layer_types"] = list(layer_types) if weak_fp16 else []
        onnx_hash = onnx_sha256(spec.onnx_path(args.engine_dir))
        reason = "--force" if args.force else needs_rebuild(spec, args.engine_dir, flags, onnx_hash)
        if reason is None:
            write(f"[build] {name}: {spec.plan_path(args.engine_dir)} is up to date")
            continue
        write(f"[build] {name}: building a {typing}ly typed {spec.precision} engine ({reason}); this takes "
              f"minutes at optimization level {args.optimization_level}")
        spec.build_record_path(args.engine_dir).unlink(missing_ok=True)  # no record: never taken as current
        options = trt_utils.BuildOptions(precision=spec.precision, typing=typing,
                                         optimization_level=args.optimization_level,
                                         input_shapes={t.name: t.shape for t in spec.inputs},
                                         fp32_from=spec.fp32_from, fp32_layer_types=tuple(flags["fp32_layer_types"]))
        seconds = trt_utils.build_engine(spec.onnx_path(args.engine_dir), spec.plan_path(args.engine_dir), options,
                                         timing_cache)
        write_build_record(spec, args.engine_dir, onnx_hash, flags, seconds)
        size = spec.plan_path(args.engine_dir).stat().st_size / 1e6
        write(f"[build] {name}: wrote {spec.plan_path(args.engine_dir)} ({size:.0f} MB) in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
