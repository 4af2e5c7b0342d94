"""Ahead-of-time compiled programs for the fast back-end.

Each stage of sdcanny/stages.py is exported with dynamic batch and latent sizes and compiled by
AOTInductor into a package in engines/torch_programs/, weights included. `preprocess.sh` makes
them (`python3 -m sdcanny.fast --prepare`); `initialize()` then loads them in seconds without
reading the checkpoint, and every size in their range runs compiled code from its first call:
a new size costs a CUDA-graph capture, never a compilation.

A record beside the packages says what they were built from (checkpoint size and mtime, config,
torch build, GPU, dtype, numerics, the source of the networks); anything different makes them
stale, and the back-end says why and compiles in-process instead.
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import compat
from .config import ModelConfig
from .optional import progress
from .paths import DEFAULT_ENGINE_DIR, PROJECT_ROOT
from .records import file_stats, read_record, write_record
from .stages import STAGE_NAMES, STEP_ROW, Stages, step_inputs

PROGRAM_DIR_NAME = "torch_programs"
DEFAULT_PROGRAM_DIR = DEFAULT_ENGINE_DIR / PROGRAM_DIR_NAME
RECORD_NAME = "record.json"
LATENT_MULTIPLE = 8  # work images are multiples of 64 px, latents of 8 (the UNet halves them 3 times)
# The files whose code the packages compile: a change to any of them makes the packages stale.
SOURCE_FILES = ("networks.py", "stages.py", "ddim.py", "reference.py")


@dataclass(frozen=True)
class ShapeRange:
    """The sizes one set of packages serves: 1..max_samples samples, latent sides that are
    multiples of 8 up to max_latent_side (8x that in pixels), prompts of `tokens` tokens. The
    default covers every work image the default WorkSizeLimits admit (longest side 2873 px)."""
    max_samples: int = 16
    max_latent_side: int = 360
    tokens: int = 77

    def problem(self, num_samples: int, latent_h: int, latent_w: int, tokens: int) -> str | None:
        """None if this range serves the size, else why not (for the back-end's notes)."""
        if not 1 <= num_samples <= self.max_samples:
            return f"num_samples {num_samples} is outside the prepared 1..{self.max_samples}"
        for side in (latent_h, latent_w):
            if side % LATENT_MULTIPLE or not LATENT_MULTIPLE <= side <= self.max_latent_side:
                return (f"a {8 * latent_h}x{8 * latent_w} work image is outside the prepared sizes "
                        f"(multiples of 64 px up to {8 * self.max_latent_side})")
        if tokens != self.tokens:
            return f"prompts of {tokens} tokens (prepared: {self.tokens})"
        return None

    def example_latent(self) -> tuple[int, int]:
        """Export traces at the graded latent size (kernel choices are tuned for it), or the
        largest the range holds; never at 8, where the eighths would be 1 and specialised."""
        return tuple(max(2 * LATENT_MULTIPLE, min(side, self.max_latent_side)) for side in GRADED_LATENT)


GRADED_LATENT = (32, 48)  # 256x384 pixels
EXAMPLE_SAMPLES = 2  # a dimension of size 1 would be specialised by export

# Which inputs of each stage carry the batch: "2N" ([cond, uncond]), "N" (samples) or None
# (per-call values). Every 4-D input's height and width are multiples of the latent's / 8.
BATCH_AXES = {
    "encode": ("2N", "N"),
    "control": ("2N", "2N", "2N", "2N", "2N"),
    "unet_encode": ("2N", "2N", "2N"),
    "unet_decode": ("2N", "2N", "2N", "2N", "2N", "N", None, None, "N"),
    "decode": ("N",),
}


def example_inputs(stages: Stages, cfg: ModelConfig, device, dtype: torch.dtype,
                   shape_range: ShapeRange = ShapeRange()) -> dict[str, tuple]:
    """Inputs for every stage at the example size, each made by running the stages before it."""
    n, (h, w) = EXAMPLE_SAMPLES, shape_range.example_latent()
    g = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(0, cfg.clip.vocab_size, (2 * n, shape_range.tokens), device=device, generator=g)
    hint = torch.rand(n, 3, 8 * h, 8 * w, device=device, generator=g)
    x = torch.randn(n, 4, h, w, device=device, generator=g)
    step = torch.tensor([500, 0.3, 0.4, 0.1, 0.8] + [0] * (STEP_ROW - 5), dtype=torch.float32, device=device)
    scales = torch.ones(2 * n, cfg.unet.num_control_residuals, device=device)
    guidance = torch.tensor(9.0, device=device)
    with torch.no_grad():
        context, features = stages.encode(tokens, hint)
        x2, t = step_inputs(x, step, dtype)
        controls = stages.control(x2, t, context, features, scales)
        hidden, skips, emb = stages.unet_encode(x2, t, context)
    return {"encode": (tokens, hint), "control": (x2, t, context, features, scales),
            "unet_encode": (x2, t, context),
            "unet_decode": (hidden, skips, emb, context, controls, x, step, guidance, torch.randn_like(x)),
            "decode": (x,)}


def dynamic_shapes(stage: str, args: tuple, shape_range: ShapeRange) -> tuple:
    """torch.export's dynamic_shapes for a stage's example inputs: the batch axis as N or 2N, and
    height and width of 4-D inputs as multiples of latent / 8."""
    from torch.export import Dim
    samples = Dim("samples", min=1, max=shape_range.max_samples)
    eighths = [Dim(f"latent_{axis}_8", min=1, max=shape_range.max_latent_side // LATENT_MULTIPLE) for axis in "hw"]
    example_eighths = [side // LATENT_MULTIPLE for side in shape_range.example_latent()]

    def spec(tensor: torch.Tensor, batch: str | None):
        if batch is None:
            return None
        axes = {0: samples if batch == "N" else 2 * samples}
        if tensor.dim() == 4:
            for axis, root, example in zip((2, 3), eighths, example_eighths):
                factor, rest = divmod(tensor.shape[axis], example)
                assert rest == 0, (stage, tensor.shape)
                axes[axis] = root if factor == 1 else factor * root
        return axes

    return tuple([spec(t, batch) for t in arg] if isinstance(arg, (list, tuple)) else spec(arg, batch)
                 for arg, batch in zip(args, BATCH_AXES[stage]))


def source_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in SOURCE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_identity(checkpoint: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                   numerics: dict) -> dict:
    """Everything the packages depend on besides their range; compared field by field at load."""
    return {"checkpoint": file_stats([Path(checkpoint)]), "config": cfg.name,
            "torch": torch.__version__, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            **numerics, "source": source_digest()}


def package_path(program_dir: Path, stage: str) -> Path:
    return Path(program_dir) / f"{stage}.pt2"


def read_program_record(program_dir: Path) -> dict | None:
    return read_record(Path(program_dir) / RECORD_NAME)


def stale_reason(program_dir: Path, identity: dict) -> str | None:
    """None if program_dir holds packages for exactly `identity`, else what is missing or differs."""
    unavailable = compat.aot_unavailable_reason()
    if unavailable is not None:
        return unavailable
    record = read_program_record(program_dir)
    if record is None:
        return f"no prepared programs in {program_dir}"
    built = record.get("identity", {})
    for key, now in identity.items():
        if built.get(key) != now:
            return f"the programs in {program_dir} were built for {key} {built.get(key)!r}, this is {now!r}"
    missing = [s for s in STAGE_NAMES if not package_path(program_dir, s).is_file()]
    if missing:
        return f"{program_dir} lacks {', '.join(package_path(program_dir, s).name for s in missing)}"
    return None


def record_range(program_dir: Path) -> ShapeRange:
    return ShapeRange(**read_program_record(program_dir)["range"])


# AOTInductor options: the generated wrapper is compiled without precompiled headers. On the H100
# machine's image every package, even a two-layer model's, crashed when loaded (inside std::regex in
# the wrapper) or did not load within 40 s, with or without them (benchmarks/aoti_smoke.py); without
# them the compile is faster.
AOT_OPTIONS = {"aot_inductor.precompile_headers": False}


class UnusablePrograms(RuntimeError):
    """The programs compiled but cannot be loaded here."""


def prepare(stages: Stages, cfg: ModelConfig, program_dir: Path, identity: dict, device, dtype: torch.dtype,
            inductor_options: dict, shape_range: ShapeRange = ShapeRange()) -> dict[str, float]:
    """Export and compile every stage into program_dir; returns seconds per stage. The record is
    written last, once the packages load in a child process: an interrupted run, or packages
    that cannot load here, leave no record, so nothing ever tries to use them."""
    program_dir = Path(program_dir)
    program_dir.mkdir(parents=True, exist_ok=True)
    (program_dir / RECORD_NAME).unlink(missing_ok=True)
    examples = example_inputs(stages, cfg, device, dtype, shape_range)
    seconds = {}
    for name, module in progress(list(stages.items()), desc="compiling stages", unit="stage"):
        start = time.perf_counter()
        args = examples[name]
        with torch.no_grad():
            exported = torch.export.export(module, args, dynamic_shapes=dynamic_shapes(name, args, shape_range))
            torch._inductor.aoti_compile_and_package(exported, package_path=str(package_path(program_dir, name)),
                                                     inductor_configs={**inductor_options, **AOT_OPTIONS})
        seconds[name] = round(time.perf_counter() - start, 1)
    problem = load_problem(program_dir, device)
    if problem is not None:
        raise UnusablePrograms(problem)
    record = {"identity": identity, "range": asdict(shape_range), "inductor_options": inductor_options,
              "compile_seconds": seconds}
    write_record(program_dir / RECORD_NAME, record)
    return seconds


# A load takes seconds; on the H100 machine's image (2026-11-25) loads also hung, even a two-layer
# model's, so the check gives up after this long.
LOAD_TIMEOUT_S = 300


def load_problem(program_dir: Path, device, timeout_s: float = LOAD_TIMEOUT_S) -> str | None:
    """Loads every package in a child process: None if that works, else what went wrong. A loader
    that crashes or hangs (both seen on the H100 machine's image, docs/benchmarks.md) then cannot
    take the caller's process with it."""
    code = ("import sys, torch; from pathlib import Path; from sdcanny import programs; "
            "programs.load(Path(sys.argv[1]), torch.device(sys.argv[2]))")
    problem = child_problem([sys.executable, "-c", code, str(Path(program_dir).resolve()), str(device)], timeout_s)
    return None if problem is None else f"loading them {problem}"


def child_problem(command: list[str], timeout_s: float) -> str | None:
    """Runs `command` in the project root: None if it exits 0, else what went wrong, as a phrase."""
    try:
        proc = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"did not finish within {timeout_s:g} s"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return (f"kills the process with {signal.Signals(-proc.returncode).name} (torch "
                f"{torch.__version__}'s AOTInductor runtime with this machine's compiler)")
    lines = proc.stderr.strip().splitlines()
    return f"fails: {lines[-1] if lines else f'exit status {proc.returncode}'}"


def load(program_dir: Path, device: torch.device) -> dict:
    """The compiled stages as callables taking and returning what the stage modules do. They run
    on the current CUDA stream without host synchronisation, so CUDA graphs can capture them."""
    index = device.index if device.index is not None else -1
    return {name: torch._inductor.aoti_load_package(str(package_path(program_dir, name)), run_single_threaded=True,
                                                    device_index=index if device.type == "cuda" else -1)
            for name in STAGE_NAMES}
