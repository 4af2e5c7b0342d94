"""Build records: small JSON files beside a built artifact (a TensorRT engine, the torch
back-end's programs) that say what it was built from, so that a stale one is noticed at load
without reading gigabytes."""
from __future__ import annotations

import json
from pathlib import Path


def file_stats(paths: list[Path]) -> dict[str, list[int]]:
    """{file name: [size, mtime_ns]}: enough to see, without reading gigabytes, that a file changed."""
    return {Path(p).name: [Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths}


def read_record(path: Path) -> dict | None:
    """The JSON object in `path`, or None where it is missing, unreadable or not an object."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: Path, record: dict) -> None:
    Path(path).write_text(json.dumps(record, indent=1))
