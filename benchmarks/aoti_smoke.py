"""Does AOTInductor work on this machine? Compiles a two-layer model into a package per device,
with and without precompiled headers for the generated wrapper, and loads and runs each in a
child process (a crash there is reported, not suffered).

    python3 benchmarks/aoti_smoke.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RUN = ("import sys, torch; m = torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True); "
       "x = torch.randn(4, 8, 16, 16, device=sys.argv[2]); print('ok', tuple(m(x).shape))")


def main() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            for headers in (True, False):
                m = model.to(device)
                start = time.perf_counter()
                with torch.no_grad():
                    ep = torch.export.export(m, (torch.randn(4, 8, 16, 16, device=device),))
                    path = torch._inductor.aoti_compile_and_package(
                        ep, package_path=str(Path(tmp) / f"{device}_{headers}.pt2"),
                        inductor_configs={"aot_inductor.precompile_headers": headers})
                seconds = time.perf_counter() - start
                proc = subprocess.run([sys.executable, "-c", RUN, path, device], capture_output=True, text=True)
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
                print(f"aoti {device}, precompiled headers {headers}: compiled in {seconds:.0f} s, "
                      f"load and run: exit {proc.returncode} {tail[0]}")


if __name__ == "__main__":
    main()
