"""Does AOTInductor work on this machine? Compiles a two-layer model into a package per device
and loads and runs each in a child process (a crash there is reported, not suffered).

    python3 benchmarks/aoti_smoke.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RUN = ("import sys, torch; m = torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True); "
       "x = torch.randn(4, 8, 16, 16, device=sys.argv[2]); print('ok', tuple(m(x).shape))")


def main() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            m = model.to(device)
            with torch.no_grad():
                ep = torch.export.export(m, (torch.randn(4, 8, 16, 16, device=device),))
                path = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / f"{device}.pt2"))
            proc = subprocess.run([sys.executable, "-c", RUN, path, device], capture_output=True, text=True)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            print(f"aoti {device}: exit {proc.returncode} {tail[0]}")


if __name__ == "__main__":
    main()
