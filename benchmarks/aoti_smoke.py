"""Does AOTInductor work on this machine, and if not, why? Compiles a two-layer model into one
package per build variant (in parallel child processes), then loads and runs each in a child
process, so that a crash is reported rather than suffered. Prints the toolchain facts that bear on
the generated wrapper (compiler, the compiler that built libtorch, the C++ runtime in use), and for
a variant that crashes, a debugger backtrace where gdb is installed.

    python3 benchmarks/aoti_smoke.py [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (precompiled headers for the wrapper, extra arguments for every compiler call)
VARIANTS = {
    "plain": (False, ""),
    "precompiled headers": (True, ""),
    "linked -Bsymbolic": (False, "-Wl,-Bsymbolic"),
}
LOAD_TIMEOUT_S = 60  # a load takes seconds; on the H100 machine (2026-11-25) loads hung past 40 s
RUN = ("import sys, torch; m = torch._inductor.aoti_load_package(sys.argv[1], run_single_threaded=True); "
       "x = torch.randn(4, 8, 16, 16, device=sys.argv[2]); print('ok', tuple(m(x).shape))")


def build(device: str, headers: bool, path: str) -> None:
    import torch
    start = time.perf_counter()
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).to(device)
    with torch.no_grad():
        exported = torch.export.export(model, (torch.randn(4, 8, 16, 16, device=device),))
        torch._inductor.aoti_compile_and_package(exported, package_path=path,
                                                 inductor_configs={"aot_inductor.precompile_headers": headers})
    print(f"compiled in {time.perf_counter() - start:.0f} s")


def compiler_with(flags: str, folder: Path) -> str:
    """A `g++` that appends `flags` to every call (Inductor takes its compiler from $CXX)."""
    real = shutil.which("g++")
    wrapper = folder / "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@" {flags}\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def toolchain_facts() -> list[str]:
    import torch
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    facts = [f"python {sys.version.split()[0]} at {sys.executable}, torch {torch.__version__}"]
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()
    facts.append(f"g++: {version[0] if version else 'not found'}")
    comment = subprocess.run(["readelf", "-p", ".comment", str(lib)], capture_output=True, text=True).stdout
    facts.append("libtorch_cpu built by: " + "; ".join(sorted({l.split("]", 1)[1].strip() for l in comment.splitlines()
                                                             if "GCC" in l and "]" in l})))
    maps = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
    facts.append("C++ runtime in use: " + ", ".join(sorted({l.split()[-1] for l in maps if "libstdc++" in l})))
    return facts


def backtrace(path: str, device: str) -> list[str]:
    # Plain gdb only: under cuda-gdb the crashed process hung on the H100 machine and kept the GPU.
    if shutil.which("gdb") is None:
        return ["(no gdb here for a backtrace)"]
    try:
        proc = subprocess.run(["gdb", "-batch", "-ex", "run", "-ex", "bt 12", "--args", sys.executable, "-c", RUN, path,
                               device], capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"(gdb gave no backtrace within {LOAD_TIMEOUT_S} s)"]
    return [line for line in proc.stdout.splitlines() if line.startswith("#")][:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--build", nargs=2, metavar=("HEADERS", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build(args.device, args.build[0] == "1", args.build[1])
    for fact in toolchain_facts():
        print(f"aoti fact: {fact}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {}
        for i, (name, (headers, flags)) in enumerate(VARIANTS.items()):
            env = dict(os.environ)
            if flags:
                folder = Path(tmp) / f"cxx{i}"
                folder.mkdir()
                env["CXX"] = compiler_with(flags, folder)
            path = str(Path(tmp) / f"variant{i}.pt2")
            command = [sys.executable, __file__, "--device", args.device, "--build", str(int(headers)), path]
            jobs[name] = (path, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                                      stderr=subprocess.STDOUT, text=True))
        traced = False
        for name, (path, job) in jobs.items():
            log = job.communicate()[0]
            built = log.strip().splitlines()[-1] if log.strip() else ""
            if job.returncode != 0:
                print(f"aoti {args.device}, {name}: compile failed ({log.strip().splitlines()[-1:]})")
                continue
            try:
                proc = subprocess.run([sys.executable, "-c", RUN, path, args.device], capture_output=True, text=True,
                                      timeout=LOAD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"aoti {args.device}, {name}: {built}; load and run: no answer within {LOAD_TIMEOUT_S} s", flush=True)
                continue
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            print(f"aoti {args.device}, {name}: {built}; load and run: exit {proc.returncode} {tail[0]}", flush=True)
            if proc.returncode < 0 and not traced:
                traced = True
                for line in backtrace(path, args.device):
                    print(f"aoti backtrace: {line[:200]}")


if __name__ == "__main__":
    main()
