#!/usr/bin/env bash
# One image through the whole pipeline on built-in defaults; writes outputs/demo.png.
# Uses models/control_sd15_canny.pth when present, else a tiny synthetic checkpoint (CPU, seconds).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m sdcanny.demo "$@"
