"""benchmarks/startup_benchmark.py on the CPU: each start is a fresh process whose report reaches
the table, and the table's median is the starts' median."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import startup_benchmark  # noqa: E402


def start(seconds: float, stages: dict) -> dict:
    return {"imports_s": 1.0, "initialize_s": seconds, "startup": stages, "notes": []}


def test_the_table_has_a_column_per_stage_any_start_reported_and_the_median():
    meta = {"device": "d", "torch": "t", "date": "x", "commit": "c", "command": "cmd"}
    starts = [start(12.0, {"set-up": 1.0}), start(9.0, {"set-up": 1.5, "programs loaded (graded)": 5.0}),
              start(10.0, {"set-up": 1.2})]
    lines = startup_benchmark.table(meta, starts).splitlines()
    assert lines[3] == "| start | imports s | initialize s | set-up s | programs loaded (graded) s |"
    assert lines[6] == "| 2 | 1.0 | 9.0 | 1.5 | 5.0 |" and lines[7] == "| 3 | 1.0 | 10.0 | 1.2 |  |"
    assert "median 10.0 s, range 9.0-12.0 s over 3 fresh processes" in lines[-1]


def test_each_start_runs_in_a_process_of_its_own(tiny_checkpoint, hf_hub_cache, tmp_path):
    out = tmp_path / "startup"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "startup_benchmark.py"), "--checkpoint",
                    str(tiny_checkpoint), "--config", "tiny", "--backend", "reference", "--processes", "2",
                    "--profile", "--out", str(out)], check=True, capture_output=True, cwd=ROOT,
                   env={**os.environ, "HF_HUB_CACHE": str(hf_hub_cache)})  # the tokenizer's files
    starts = json.loads((out / "startup.json").read_text())["starts"]
    assert len(starts) == 2 and all(s["initialize_s"] > 0 and s["imports_s"] > 0 for s in starts)
    assert "over 2 fresh processes" in (out / "startup.md").read_text()
    assert "initialize() by cumulative" in (out / "profile_initialize.txt").read_text()
    assert (out / "profile_initialize.prof").stat().st_size > 0
