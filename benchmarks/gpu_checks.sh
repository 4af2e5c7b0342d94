#!/usr/bin/env bash
# One device call's worth of GPU work (the device machine keeps nothing between sessions):
#   bash benchmarks/gpu_checks.sh tests [PYTEST ARGS]  the tests that need a GPU (the rest run in CI);
#                                            PYTEST ARGS replace the default selection
#   bash benchmarks/gpu_checks.sh export     the full-size ONNX exports for TensorRT 8.6 (fp32, opset 17)
#                                            and 11 (fp16 + fp32 islands), each checked in onnxruntime
#   bash benchmarks/gpu_checks.sh prepare ARGS  the torch back-end's ahead-of-time programs into engines/
#                                            (python3 -m sdcanny.fast --prepare ARGS), timed
#   bash benchmarks/gpu_checks.sh bench ARGS the reference-vs-torch benchmark (benchmarks/gpu_benchmark.py ARGS)
#   bash benchmarks/gpu_checks.sh ab ARGS    variants' step graphs against each other in one process
#                                            (benchmarks/step_ab.py ARGS)
#   bash benchmarks/gpu_checks.sh shapes ARGS first-call and steady latency per size in a fresh process
#                                            (benchmarks/shape_benchmark.py ARGS)
#   bash benchmarks/gpu_checks.sh startup ARGS initialize() in fresh processes, by stage
#                                            (benchmarks/startup_benchmark.py ARGS)
#   bash benchmarks/gpu_checks.sh breakdown  where one compiled graded step's time goes (stage graphs alone
#                                            and together, its kernels, attention per SDPA back-end)
#   bash benchmarks/gpu_checks.sh hint ARGS  the canny map's influence per synthetic control gain
#                                            (benchmarks/hint_influence.py ARGS)
# Expects .carry/bpe_simple_vocab_16e6.txt.gz (CLIP's BPE merges, from the open_clip_torch wheel): the
# tokenizer files are built from it into a Hugging Face cache, as the hackathon docker has them.
# Wheels carried in .whl/ (e.g. diffusers and what it needs, for `bench ... --diffusers`) are
# installed into /tmp/site first.
# Writes logs and tables under $OUT (or outputs/gpu_checks).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_checks}
mkdir -p "$OUT"
export SDCANNY_CLIP_BPE=$PWD/.carry/bpe_simple_vocab_16e6.txt.gz
export HF_HUB_CACHE=/tmp/sdcanny_hf_hub PYTHONUNBUFFERED=1
python3 tests/clip_files.py "$SDCANNY_CLIP_BPE" "$HF_HUB_CACHE" >/dev/null
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
CKPT=/tmp/sd15.pth
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
if [[ ${1:-} == hint ]]; then
    shift
    python3 benchmarks/hint_influence.py "$@" 2>&1 | tee "$OUT/hint.log" | grep -v Warning
    exit
fi
if [[ ${1:-tests} != tests && ! -f $CKPT ]]; then
    python3 -m sdcanny.synthetic --config sd15 --control-gain 4 --out $CKPT | tail -1  # synthetic.HINT_GAIN
fi
case "${1:-tests}" in
tests)
    shift
    [[ $# -gt 0 ]] || set -- tests/test_programs.py tests/test_fast.py tests/test_engines.py tests/test_onnx_export.py \
        -k "programs or gpu or captured or fp16 or strong"
    python3 -m pytest -q -p no:cacheprovider -rs "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
    ;;
prepare)
    shift
    start=$SECONDS
    python3 -m sdcanny.fast --prepare --checkpoint $CKPT "$@" 2>&1 | tee "$OUT/prepare.log" | grep -v -i warn
    echo "prepare: $((SECONDS - start)) s"
    cp engines/torch_programs/*.log "$OUT/" 2>/dev/null || true  # each kind's compile log
    ;;
shapes)
    shift
    python3 benchmarks/shape_benchmark.py --checkpoint $CKPT --out "$OUT" "$@" 2>&1 | tee "$OUT/shapes.log" | tail -50
    ;;
breakdown)
    OUT=$OUT python3 benchmarks/step_breakdown.py $CKPT 2>&1 | tee "$OUT/breakdown.log" | grep -v -i warn | tail -20
    ;;
startup)
    shift
    python3 benchmarks/startup_benchmark.py --checkpoint $CKPT --out "$OUT" "$@" 2>&1 | tee "$OUT/startup.log" | tail -20
    ;;
export)
    for target in 8.6 11; do
        start=$SECONDS
        python3 export_onnx.py --checkpoint $CKPT --engine-dir /tmp/onnx_$target --tensorrt $target --force 2>&1 \
            | tee "$OUT/export_$target.log" | grep -E "^\[export\]"
        echo "export for TensorRT $target: $((SECONDS - start)) s"
    done
    ;;
ab)
    shift
    python3 benchmarks/step_ab.py --checkpoint $CKPT --out "$OUT/step_ab.md" "$@" 2>&1 | tee "$OUT/step_ab.log" | grep -v -i warn | tail -20
    ;;
bench)
    shift
    python3 benchmarks/gpu_benchmark.py --checkpoint $CKPT --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | tail -30
    ;;
esac
