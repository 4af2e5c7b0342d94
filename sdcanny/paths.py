"""Default locations, resolved from the project root rather than the working directory: the
hackathon's grader imports canny2image_TRT from wherever it runs.

Paths a user passes explicitly (command-line options, constructor arguments) keep their usual
meaning: relative to the working directory.
"""
from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_NAME = "control_sd15_canny.pth"
DEFAULT_CHECKPOINT = PROJECT_ROOT / "models" / CHECKPOINT_NAME
# where the hackathon docker (trt-hackathon:v2) keeps the original checkpoint
DOCKER_CHECKPOINT = Path("/home/player/ControlNet/models") / CHECKPOINT_NAME
DEFAULT_ENGINE_DIR = PROJECT_ROOT / "engines"
OUTPUTS_DIR = PROJECT_ROOT / "outputs"


def default_checkpoint(candidates: tuple[Path, ...] = (DEFAULT_CHECKPOINT, DOCKER_CHECKPOINT)) -> Path:
    """The first candidate that exists; the project's own location when none does (so that the
    "not found" message names where to put it)."""
    return next((p for p in candidates if p.is_file()), candidates[0])
