#!/usr/bin/env python3
"""Dump the Python API of TensorRT versions to JSON manifests.

TensorRT cannot be installed or run on this machine (its library wheels only
fetch from an unreachable index), but the pybind11 bindings wheels download
from PyPI.  This script imports the real compiled ``tensorrt`` module of a
bindings wheel, with generated empty stand-ins for libnvinfer & co., and
records every top-level name and every class/enum member.  The manifests in
tests/data/tensorrt_api/ let tests check every TensorRT name the code uses
against each TensorRT version.

    python3 tools/tensorrt_api.py 8.6.1 10.0.1 10.13.3.9 11.4.0.106 --out tests/data/tensorrt_api
    python3 tools/tensorrt_api.py --check          # regenerate all, diff against committed
    python3 tools/tensorrt_api.py /path/to/tensorrt_cu12_bindings-*.whl

Needs: network access to PyPI (unless given wheel paths), gcc, nm (binutils),
ldd, and a CPython matching the wheel's cpXY tag (found on PATH or
under ~/.pyenv/versions).  Linux x86_64 only.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, List, Optional, Sequence, Set, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "data", "tensorrt_api")

# Python versions tried for the download, most preferred first (all TensorRT
# bindings wheels from 8.6 to 11.x ship cp310).
PYTHON_PREFERENCE = ("3.10", "3.11", "3.9", "3.12", "3.8", "3.13")
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux_2_28_x86_64")

# Class members that every Python class has (union over CPython 3.8-3.13),
# the buffer-protocol slots that only CPython >= 3.12 lists, and pybind11's
# internals (__pybind11_module_local_*, _pybind11_conduit_v1_) are left out
# of "classes", so the manifests do not depend on the interpreter used.
OBJECT_MEMBERS = frozenset(
    [
        "__class__", "__delattr__", "__dict__", "__dir__", "__doc__", "__eq__",
        "__format__", "__ge__", "__getattribute__", "__getstate__", "__gt__",
        "__hash__", "__init__", "__init_subclass__", "__le__", "__lt__",
        "__module__", "__ne__", "__new__", "__reduce__", "__reduce_ex__",
        "__repr__", "__setattr__", "__sizeof__", "__str__", "__subclasshook__",
        "__weakref__",
        "__buffer__", "__release_buffer__",
    ]
)

# Runs inside the target interpreter (any CPython 3.x): imports the package
# and prints the API listing as JSON.
INNER_SCRIPT = r"""
import inspect, json, sys, types
site_dir, expected_prefix = sys.argv[1], sys.argv[2]
object_members = set(json.loads(sys.argv[3]))
sys.path.insert(0, site_dir)
import tensorrt
if not tensorrt.__file__.startswith(expected_prefix):
    raise SystemExit("imported tensorrt from unexpected place: " + tensorrt.__file__)

def kind(value):
    if inspect.isclass(value):
        return "class"
    if inspect.isroutine(value):
        return "function"
    return "other"

def is_trt_class(value):
    return inspect.isclass(value) and str(getattr(value, "__module__", "")).split(".")[0] == "tensorrt"

module = {}
submodules = []
classes = {}
for name in sorted(dir(tensorrt)):
    value = getattr(tensorrt, name)
    if isinstance(value, types.ModuleType):
        # Imported helper modules (os, sys, ctypes, ...) and the extension
        # submodule itself are not API; package submodules are listed apart.
        continue
    if name.startswith("__") and name != "__version__":
        continue
    module[name] = kind(value)

def walk(prefix, cls, depth):
    members = sorted(
        n for n in dir(cls)
        if n not in object_members and not n.startswith(("__pybind11_", "_pybind11_"))
    )
    classes[prefix] = members
    if depth >= 3:
        return
    for n in members:
        if n.startswith("__"):
            continue
        try:
            value = getattr(cls, n)
        except Exception:
            continue
        if is_trt_class(value) and value is not cls:
            walk(prefix + "." + n, value, depth + 1)

for name, k in module.items():
    if k == "class":
        walk(name, getattr(tensorrt, name), 0)

json.dump({"version": tensorrt.__version__, "module": module, "classes": classes}, sys.stdout)
"""


def log(msg: str) -> None:
    print("[tensorrt_api] " + msg, file=sys.stderr)


def run(cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, universal_newlines=True, **kwargs)


# ----------------------------------------------------------------------------
# Finding the wheel and a matching interpreter


def package_candidates(version: str) -> List[str]:
    major = int(version.split(".")[0])
    if major >= 10:
        return ["tensorrt-cu12-bindings", "tensorrt-bindings"]
    return ["tensorrt-bindings"]


def find_python(pyver: str) -> Optional[str]:
    """Path of a real CPython X.Y interpreter (pyenv shims resolved), or None."""
    candidates = [sys.executable, shutil.which("python" + pyver)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/%s.*/bin/python%s" % (pyver, pyver))))
    for cand in candidates:
        if not cand:
            continue
        try:
            out = subprocess.run(
                [cand, "-c", "import sys, platform; print('%d.%d' % sys.version_info[:2], "
                             "platform.python_implementation(), sys.executable)"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True, timeout=60,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if len(out) == 3 and out[0] == pyver and out[1] == "CPython":
            return out[2]
    return None


def wheel_pyver(wheel_name: str) -> str:
    """'tensorrt_bindings-8.6.1-cp310-none-...whl' -> '3.10'."""
    m = re.search(r"-cp(\d)(\d+)-", wheel_name)
    if not m:
        raise SystemExit("cannot tell the CPython version of wheel %s" % wheel_name)
    return "%s.%s" % (m.group(1), m.group(2))


def download_wheel(version: str, dest: str, pyvers: Sequence[str]) -> str:
    errors = []
    for pyver in pyvers:
        if find_python(pyver) is None:
            continue
        for package in package_candidates(version):
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", pyver, "--implementation", "cp", "--dest", dest]
            for plat in PLATFORMS:
                cmd += ["--platform", plat]
            cmd.append("%s==%s" % (package, version))
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
            wheels = glob.glob(os.path.join(dest, "*.whl"))
            if proc.returncode == 0 and wheels:
                log("downloaded %s (python %s)" % (os.path.basename(wheels[0]), pyver))
                return wheels[0]
            errors.append("%s==%s python %s: %s" % (package, version, pyver, proc.stdout.strip().splitlines()[-1:]))
    raise SystemExit("could not download TensorRT %s bindings:\n  %s" % (version, "\n  ".join(errors)))


# ----------------------------------------------------------------------------
# Stub libraries


def dynamic_symbols(path: str, defined: bool) -> Set[str]:
    flag = "--defined-only" if defined else "--undefined-only"
    out = run(["nm", "-D", flag, path], stdout=subprocess.PIPE).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        if not defined and parts[0] != "U":  # skip weak references ('w', 'v')
            continue
        names.add(parts[-1].split("@")[0])
    return names


def ldd(path: str, env: Optional[Dict[str, str]] = None) -> Tuple[List[str], List[str]]:
    """(resolved library paths, sonames not found)."""
    out = run(["ldd", path], stdout=subprocess.PIPE, env=env).stdout
    found, missing = [], []
    for line in out.splitlines():
        m = re.match(r"\s*(\S+)\s+=>\s+(not found|\S+)", line)
        if m and m.group(2) == "not found":
            missing.append(m.group(1))
        elif m:
            found.append(m.group(2))
        else:
            m = re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                found.append(m.group(1))
    return found, missing


def is_data_symbol(name: str) -> bool:
    # vtables, typeinfo, typeinfo names, VTTs, guard variables; a nested
    # mangled name with no parameter list (ends right after 'E') is a variable.
    return name.startswith(("_ZTV", "_ZTI", "_ZTS", "_ZTT", "_ZGV")) or (
        name.startswith("_ZN") and name.endswith("E")
    )


def build_stubs(ext_path: str, python: str, stub_dir: str) -> Tuple[List[str], List[str]]:
    """Build one stub .so per missing NEEDED soname of the extension.

    Each stub defines every symbol the extension needs that neither the
    interpreter nor a present system library provides: functions return 0
    (and note their name in $TRT_API_STUB_LOG when called), data symbols are
    zero-filled blocks.  Returns (missing sonames, stubbed symbols).
    """
    found, missing = ldd(ext_path)
    if not missing:
        return [], []
    provided: Set[str] = set()
    py_libs, _ = ldd(python)
    for lib in set(found) | set(py_libs) | {os.path.realpath(python)}:
        if os.path.exists(lib):
            provided |= dynamic_symbols(lib, defined=True)
    undefined = dynamic_symbols(ext_path, defined=False) - provided
    needed = sorted(s for s in undefined if not s.startswith(("Py", "_Py")))
    lines = [
        "#include <stdint.h>",
        "#include <stdio.h>",
        "#include <stdlib.h>",
        "static void trt_api_stub_called(const char *name) {",
        '    const char *path = getenv("TRT_API_STUB_LOG");',
        "    if (path) { FILE *f = fopen(path, \"a\"); if (f) { fprintf(f, \"%s\\n\", name); fclose(f); } }",
        "}",
    ]
    for sym in needed:
        if is_data_symbol(sym):
            lines.append("__attribute__((aligned(64))) char %s[4096];" % sym)
        else:
            lines.append('intptr_t %s(void) { trt_api_stub_called("%s"); return 0; }' % (sym, sym))
    src = os.path.join(stub_dir, "trt_api_stub.c")
    with open(src, "w") as f:
        f.write("\n".join(lines) + "\n")
    for soname in missing:
        run(["gcc", "-shared", "-fPIC", "-O0", "-w", "-Wl,-soname," + soname, "-o", os.path.join(stub_dir, soname), src])
    env = dict(os.environ, LD_LIBRARY_PATH=stub_dir)
    _, still_missing = ldd(ext_path, env=env)
    if still_missing:
        raise SystemExit("stubs did not satisfy: %s" % still_missing)
    return sorted(missing), needed


# ----------------------------------------------------------------------------
# Extraction


def extract_wheel(wheel: str, site_dir: str) -> str:
    """Extract the wheel and expose its package as ``tensorrt``; returns package dir."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site_dir)
    exts = glob.glob(os.path.join(site_dir, "*", "tensorrt*.so"))
    if len(exts) != 1:
        raise SystemExit("expected one tensorrt*.so in %s, found %s" % (wheel, exts))
    pkg_dir = os.path.dirname(exts[0])
    target = os.path.join(site_dir, "tensorrt")
    if pkg_dir != target:
        # The bindings wheel ships the package as ``tensorrt_bindings``; the
        # ``tensorrt`` meta-package installs it as ``tensorrt`` (its
        # ``plugin`` submodule does ``import tensorrt``).
        os.rename(pkg_dir, target)
    return target


def dump_wheel(wheel: str, work: str, expected_version: Optional[str]) -> dict:
    wheel_name = os.path.basename(wheel)
    pyver = wheel_pyver(wheel_name)
    python = find_python(pyver)
    if python is None:
        raise SystemExit("no Python %s found for %s (PATH or ~/.pyenv/versions)" % (pyver, wheel_name))
    site_dir = os.path.join(work, "site")
    stub_dir = os.path.join(work, "stubs")
    os.makedirs(site_dir)
    os.makedirs(stub_dir)
    pkg_dir = extract_wheel(wheel, site_dir)
    ext = glob.glob(os.path.join(pkg_dir, "tensorrt*.so"))[0]
    stubbed_libs, stubbed_syms = build_stubs(ext, python, stub_dir)
    log("%s: stubbed %s (%d symbols), importing with %s" % (wheel_name, stubbed_libs, len(stubbed_syms), python))
    stub_log = os.path.join(work, "stub_calls.txt")
    env = dict(os.environ, LD_LIBRARY_PATH=stub_dir, TRT_API_STUB_LOG=stub_log)
    env.pop("PYTHONPATH", None)
    # -I -S: no site-packages, so nothing but the extracted wheel can be imported as tensorrt.
    proc = subprocess.run(
        [python, "-I", "-S", "-c", INNER_SCRIPT, site_dir, pkg_dir, json.dumps(sorted(OBJECT_MEMBERS))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env, cwd=work,
    )
    if proc.returncode != 0:
        raise SystemExit("importing %s failed:\n%s" % (wheel_name, proc.stderr))
    api = json.loads(proc.stdout)
    calls: List[str] = []
    if os.path.exists(stub_log):
        with open(stub_log) as f:
            calls = sorted(set(f.read().split()))
    version = api["version"]
    if expected_version is not None and version != expected_version:
        raise SystemExit("asked for TensorRT %s but %s reports %s" % (expected_version, wheel_name, version))
    submodules = sorted(
        name for name in os.listdir(pkg_dir)
        if os.path.isfile(os.path.join(pkg_dir, name, "__init__.py"))
    )
    return {
        "tensorrt_version": version,
        "source": wheel_name,
        "method": "import",
        "python": "cp" + pyver.replace(".", ""),
        "stubbed_libraries": stubbed_libs,
        "stub_calls_during_import": calls,
        "excluded_class_members": (
            "members every Python class has (object's, __module__, __dict__, __weakref__), "
            "__buffer__/__release_buffer__ (CPython >= 3.12 only) and pybind11 internals "
            "(__pybind11_*, _pybind11_*)"
        ),
        "submodules": submodules,
        "module": api["module"],
        "classes": api["classes"],
    }


def generate(spec: str, out_dir: str, pyvers: Sequence[str]) -> str:
    """Write <version>.json for a version string or wheel path; returns its path."""
    work = tempfile.mkdtemp(prefix="tensorrt_api_")
    try:
        if spec.endswith(".whl") and os.path.isfile(spec):
            wheel, expected = os.path.abspath(spec), None
        else:
            dl = os.path.join(work, "download")
            os.makedirs(dl)
            wheel, expected = download_wheel(spec, dl, pyvers), spec
        data = dump_wheel(wheel, os.path.join(work, "dump"), expected)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, data["tensorrt_version"] + ".json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    log("wrote %s (%d top-level names, %d classes)" % (path, len(data["module"]), len(data["classes"])))
    return path


def check(specs: Sequence[str], out_dir: str, pyvers: Optional[Sequence[str]]) -> int:
    if not specs:
        specs = sorted(os.path.basename(p)[: -len(".json")] for p in glob.glob(os.path.join(out_dir, "*.json")))
        if not specs:
            raise SystemExit("no manifests in %s to check" % out_dir)
    failed = 0
    tmp = tempfile.mkdtemp(prefix="tensorrt_api_check_")
    try:
        for spec in specs:
            committed_path = os.path.join(out_dir, spec + ".json")
            committed = None
            use_pyvers = pyvers
            if os.path.exists(committed_path):
                with open(committed_path) as f:
                    committed = json.load(f)
                if use_pyvers is None:
                    # Re-download the same wheel build (same cpXY tag) as the committed manifest.
                    use_pyvers = [wheel_pyver(committed["source"])] + list(PYTHON_PREFERENCE)
            fresh_path = generate(spec, tmp, use_pyvers or PYTHON_PREFERENCE)
            with open(fresh_path) as f:
                fresh = json.load(f)
            if fresh != committed:
                failed += 1
                old = json.dumps(committed, indent=1, sort_keys=True).splitlines() if committed else []
                new = json.dumps(fresh, indent=1, sort_keys=True).splitlines()
                print("MISMATCH %s:" % committed_path)
                for line in difflib.unified_diff(old, new, "committed", "regenerated", lineterm="", n=1):
                    print(line)
            else:
                print("ok %s" % committed_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="*", help="TensorRT versions (e.g. 8.6.1, 10.13.3.9) or paths to bindings wheels")
    parser.add_argument("--out", default=DEFAULT_OUT, help="manifest directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temp dir and fail if the manifests in --out differ "
                             "(no specs: every manifest in --out)")
    parser.add_argument("--python-version", action="append", dest="pyvers",
                        help="CPython X.Y whose wheel to download (repeatable; default: first available of %s)"
                             % ", ".join(PYTHON_PREFERENCE))
    args = parser.parse_args(argv)
    if args.check:
        return check(args.specs, args.out, args.pyvers)
    if not args.specs:
        parser.error("give at least one version or wheel (or --check)")
    for spec in args.specs:
        generate(spec, args.out, args.pyvers or PYTHON_PREFERENCE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
