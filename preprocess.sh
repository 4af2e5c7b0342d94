#!/usr/bin/env bash
# Prepares the fast back-ends: exports the ONNX graphs, then builds the TensorRT engines where
# TensorRT is installed (otherwise compiles the PyTorch back-end's stages ahead of time into
# $ENGINE_DIR/torch_programs). Re-runnable: current ONNX files, engines and programs are kept.
# Any failing step stops the script with a non-zero status.
#
#   bash preprocess.sh
#   CHECKPOINT=/path/to.pth CONFIG=tiny ENGINE_DIR=/tmp/engines PYTHON=python3.8 bash preprocess.sh
#
# The checkpoint defaults to models/control_sd15_canny.pth, else the hackathon docker's
# /home/player/ControlNet/models/control_sd15_canny.pth. The ONNX graphs and engines are for the
# installed TensorRT (8.6: opset 17, fp32 graphs, weakly typed fp16 engines; 10.x: the same at
# opset 18; 11.x: fp16 graphs with fp32 islands, strongly typed engines).
set -euo pipefail
cd "$(dirname "$0")"

DOCKER_CHECKPOINT=/home/player/ControlNet/models/control_sd15_canny.pth
if [[ -z "${CHECKPOINT:-}" ]]; then
    CHECKPOINT=models/control_sd15_canny.pth
    [[ ! -f "$CHECKPOINT" && -f "$DOCKER_CHECKPOINT" ]] && CHECKPOINT=$DOCKER_CHECKPOINT
fi
CONFIG=${CONFIG:-sd15}
ENGINE_DIR=${ENGINE_DIR:-engines}
PYTHON=${PYTHON:-python3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # many threads on a shared CPU are slower, not faster

if [[ ! -f "$CHECKPOINT" ]]; then
    echo "preprocess.sh: checkpoint $CHECKPOINT not found." >&2
    echo "  Put the original ControlNet 1.0 canny checkpoint there, or make a synthetic one:" >&2
    echo "    python3 -m sdcanny.synthetic --config $CONFIG --out $CHECKPOINT" >&2
    exit 1
fi

echo "== [1/2] ONNX export ($CONFIG, $CHECKPOINT -> $ENGINE_DIR/)"
$PYTHON export_onnx.py --checkpoint "$CHECKPOINT" --config "$CONFIG" --engine-dir "$ENGINE_DIR"

if $PYTHON -c 'import tensorrt' 2>/dev/null; then
    echo "== [2/2] TensorRT engines"
    $PYTHON build_engines.py --config "$CONFIG" --engine-dir "$ENGINE_DIR"
else
    echo "== [2/2] TensorRT is not installed (python3 -c 'import tensorrt' fails): preparing the torch back-end instead"
    if $PYTHON -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        $PYTHON -m sdcanny.fast --prepare --checkpoint "$CHECKPOINT" --config "$CONFIG" \
            --program-dir "$ENGINE_DIR/torch_programs"
    else
        echo "   no CUDA GPU visible: nothing to prepare for the torch back-end on this machine"
    fi
fi
echo "== done"
