"""Build the TensorRT engines (engines/<stem>.plan) from the ONNX graphs export_onnx.py wrote.

    python3 build_engines.py                         # all three, SD1.5 at 256x384
    python3 build_engines.py --precision vae=fp32    # per-engine precision override
    python3 build_engines.py --force

An engine is rebuilt when its .plan is missing, when its ONNX file changed, or when any build
flag changed (precision, optimization level, shapes, TensorRT version, GPU); the JSON record
beside each .plan holds what it was built from. Needs TensorRT 10 and a CUDA GPU.
"""
import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from sdcanny.config import CONFIGS
from sdcanny.engine_specs import (DEFAULT_HEIGHT, DEFAULT_OPTIMIZATION_LEVEL, DEFAULT_WIDTH, ENGINE_NAMES,
                                  build_flags, engine_specs, needs_rebuild, onnx_sha256, parse_precisions,
                                  write_build_record)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    ap.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    ap.add_argument("--engine-dir", type=Path, default=Path("engines"))
    ap.add_argument("--engines", nargs="+", choices=ENGINE_NAMES, default=list(ENGINE_NAMES))
    ap.add_argument("--precision", nargs="*", default=[], metavar="ENGINE=fp16|fp32",
                    help="override the table's precision, e.g. --precision clip=fp16 vae=fp32")
    ap.add_argument("--optimization-level", type=int, default=DEFAULT_OPTIMIZATION_LEVEL, choices=range(6))
    ap.add_argument("--force", action="store_true", help="rebuild even where the engine is current")
    ap.add_argument("--verbose", action="store_true", help="TensorRT's full build log")
    args = ap.parse_args(argv)

    try:
        import trt_utils  # only here: --help and this message work without TensorRT
    except ModuleNotFoundError as exc:
        print(f"build_engines.py needs TensorRT 10 ({exc}): pip install 'tensorrt>=10,<11'", file=sys.stderr)
        return 1
    trt_utils.require_tensorrt_10()
    if args.verbose:
        trt_utils.log_verbose()
    specs = engine_specs(CONFIGS[args.config], args.height, args.width, parse_precisions(args.precision))
    gpu, version = trt_utils.gpu_name(), trt_utils.tensorrt_version()
    timing_cache = args.engine_dir / "timing_cache.bin"
    for name in tqdm(args.engines, desc="engines", unit="engine"):
        spec = specs[name]
        if not spec.onnx_path(args.engine_dir).is_file():
            print(f"[build] {spec.onnx_path(args.engine_dir)} does not exist: run `python3 export_onnx.py` first",
                  file=sys.stderr)
            return 1
        flags = build_flags(spec, version, gpu, args.optimization_level)
        onnx_hash = onnx_sha256(spec.onnx_path(args.engine_dir))
        reason = "--force" if args.force else needs_rebuild(spec, args.engine_dir, flags, onnx_hash)
        if reason is None:
            tqdm.write(f"[build] {name}: {spec.plan_path(args.engine_dir)} is up to date")
            continue
        tqdm.write(f"[build] {name}: building {spec.precision} engine ({reason}); this takes minutes at "
                   f"optimization level {args.optimization_level}")
        spec.build_record_path(args.engine_dir).unlink(missing_ok=True)  # no record: never taken as current
        seconds = trt_utils.build_engine(spec.onnx_path(args.engine_dir), spec.plan_path(args.engine_dir),
                                         spec.precision, args.optimization_level,
                                         {t.name: t.shape for t in spec.inputs}, spec.fp32_from, timing_cache)
        write_build_record(spec, args.engine_dir, onnx_hash, flags, seconds)
        size = spec.plan_path(args.engine_dir).stat().st_size / 1e6
        tqdm.write(f"[build] {name}: wrote {spec.plan_path(args.engine_dir)} ({size:.0f} MB) in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
