#!/usr/bin/env bash
# One image through the whole pipeline on built-in defaults; writes outputs/demo.png.
# Uses models/control_sd15_canny.pth (or the hackathon docker's) when present, else a tiny synthetic
# checkpoint (CPU, seconds), whose random weights draw noise by design: put the real checkpoint in
# models/ for a real picture.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m sdcanny.demo "$@"
