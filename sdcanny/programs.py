"""Ahead-of-time compiled programs for the fast back-end.

Each stage of sdcanny/stages.py is compiled by TorchInductor once, ahead of time, with
torch.compile's `aot_compile`: dynamo's trace and guards and Inductor's generated code (Python
wrappers and Triton or C++ kernels) are saved to a file per stage and kind of size, in
engines/torch_programs/. `preprocess.sh` makes them (`python3 -m sdcanny.fast --prepare`);
the back-end loads the graded kind at its start and every other kind when a size first needs it,
and every size in their range runs compiled code from its first call: never a compilation in a
request. The weights are not in
them: each program takes its stage module as an argument, so they serve any checkpoint of the
config they were built for.

Three kinds of size (VARIANTS): the graded size exactly, as the in-process form compiles it; one
sample at any size of the range; 2..max_samples samples at any size of the range. The last two
are compiled with symbolic batch, height and width, and their guards say at call time whether a
size fits them (a size that does not runs eager, with a note).

A record beside the programs says what they were built from (config, torch build, GPU, dtype,
numerics, the source of the networks); anything different makes them stale, and the back-end says
why and compiles in-process instead.

AOTInductor packages were this module's first form (commits 4310cc3..c9bd972): on the H100
machine's image they crashed or hung when loaded, even a two-layer model's (docs/benchmarks.md).
The form here runs the same generated code as the in-process compilation, which works there.
"""
from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import compat, fused_attention, fused_conv, fused_geglu, fused_norm, fused_scores
from .config import ModelConfig
from .networks import without_patch_products
from .optional import progress, write
from .paths import DEFAULT_ENGINE_DIR, PROJECT_ROOT
from .records import read_record, write_record
from .stages import STAGE_NAMES, STEP_ROW, Stages, step_inputs

PROGRAM_DIR_NAME = "torch_programs"
DEFAULT_PROGRAM_DIR = DEFAULT_ENGINE_DIR / PROGRAM_DIR_NAME
RECORD_NAME = "record.json"
LATENT_MULTIPLE = 8  # work images are multiples of 64 px, latents of 8 (the UNet halves them 3 times)
MIN_LATENT_SIDE = 16  # at 8 the UNet's bottom is 1 wide, a size the compiler specialises
# The files whose code the programs compile: a change to any of them makes the programs stale.
SOURCE_FILES = ("networks.py", "stages.py", "ddim.py", "reference.py", "fused_norm.py", "group_norm_kernel.py",
                "fused_attention.py", "attention_kernel.py", "fp8.py", "fused_geglu.py", "geglu_kernel.py",
                "fused_scores.py", "scores_kernel.py", "tma.py", "fused_conv.py", "conv3x3.py", "conv3x3_sm90.cu",
                "cuda_kernels.py")
# The kinds of size, each compiled once per stage: (samples in the example, which axes are symbolic)
VARIANTS = {"graded": (1, ()), "one sample": (1, ("size",)), "samples": (2, ("batch", "size"))}


@dataclass(frozen=True)
class ShapeRange:
    """The sizes one set of programs serves: 1..max_samples samples, latent sides that are
    multiples of 8 from MIN_LATENT_SIDE to max_latent_side (8x that in pixels), prompts of `tokens` tokens. The
    default covers every work image the default WorkSizeLimits admit (longest side 2873 px)."""
    max_samples: int = 16
    max_latent_side: int = 360
    tokens: int = 77

    def problem(self, num_samples: int, latent_h: int, latent_w: int, tokens: int) -> str | None:
        """None if this range serves the size, else why not (for the back-end's notes)."""
        if not 1 <= num_samples <= self.max_samples:
            return f"num_samples {num_samples} is outside the prepared 1..{self.max_samples}"
        for side in (latent_h, latent_w):
            if side % LATENT_MULTIPLE or not MIN_LATENT_SIDE <= side <= self.max_latent_side:
                return (f"a {8 * latent_h}x{8 * latent_w} work image is outside the prepared sizes "
                        f"(multiples of 64 px from {8 * MIN_LATENT_SIDE} to {8 * self.max_latent_side})")
        if tokens != self.tokens:
            return f"prompts of {tokens} tokens (prepared: {self.tokens})"
        return None

    def variant_for(self, num_samples: int, latent_h: int, latent_w: int, tokens: int,
                    prepared: tuple[str, ...]) -> tuple[str | None, str | None]:
        """The prepared variant that serves this size, or None and why none does."""
        problem = self.problem(num_samples, latent_h, latent_w, tokens)
        if problem is not None:
            return None, problem
        if num_samples == 1 and (latent_h, latent_w) == GRADED_LATENT and "graded" in prepared:
            return "graded", None
        wanted = "one sample" if num_samples == 1 else "samples"
        if wanted not in prepared:
            return None, f"no programs for {'one sample' if num_samples == 1 else 'several samples'} were prepared"
        return wanted, None

    def example_latent(self) -> tuple[int, int]:
        """Compiled at the graded latent size (kernel choices are tuned for it), or the largest
        the range holds."""
        return tuple(max(MIN_LATENT_SIDE, min(side, self.max_latent_side)) for side in GRADED_LATENT)


GRADED_LATENT = (32, 48)  # 256x384 pixels

# Which inputs of each stage carry the batch: "2N" ([cond, uncond]), "N" (samples), "N, then 2N"
# (a list whose first tensor comes from the layers both branches share, networks.both_branches) or
# None (per-call values; the time rows are one row for every sample). Every 4-D input's height and
# width are multiples of the latent's / 8.
BATCH_AXES = {
    "text": ("2N",),
    "hint": ("N",),
    "control": ("N", None, "2N", "N"),  # the latents both branches share (step_inputs)
    "unet_encode": ("N", None, "2N"),
    "unet_decode": ("2N", "N, then 2N", None, "2N", "N, then 2N", "2N", "N", None, None, "N"),
    "decode": ("N",),
}


def example_inputs(stages: Stages, cfg: ModelConfig, device, dtype: torch.dtype, num_samples: int,
                   latent: tuple[int, int], token_count: int = 77, share_first_layers: bool = True) -> dict[str, tuple]:
    """Inputs for every stage at one size, each made by running the stages before it; the step's
    as step_inputs makes them (`share_first_layers`, the fast back-end's option)."""
    n, (h, w) = num_samples, latent
    g = torch.Generator(device).manual_seed(0)
    tokens = torch.randint(0, cfg.clip.vocab_size, (2 * n, token_count), device=device, generator=g)
    edges = 255 * torch.randint(0, 2, (n, 1, 8 * h, 8 * w), device=device, generator=g, dtype=torch.uint8)
    x = torch.randn(n, 4, h, w, device=device, generator=g)
    step = torch.tensor([500, 0.3, 0.4, 0.1, 0.8] + [0] * (STEP_ROW - 5), dtype=torch.float32, device=device)
    scales = torch.ones(2 * n, cfg.unet.num_control_residuals, device=device)
    guidance = torch.tensor(9.0, device=device)
    with torch.no_grad():
        control_context, unet_context = stages.text(tokens)
        features = stages.hint(edges)
        latents = step_inputs(x, dtype, share_first_layers)
        time_row = stages.time_rows(step[:1])
        control_time, unet_time = stages.split_time_row(time_row)
        controls = stages.control(latents, control_time, control_context, features)
        hidden, skips = stages.unet_encode(latents, unet_time, unet_context)
    return {"text": (tokens,), "hint": (edges,), "control": (latents, control_time, control_context, features),
            "unet_encode": (latents, unet_time, unet_context),
            "unet_decode": (hidden, skips, unet_time, unet_context, controls, scales, x, step, guidance,
                            torch.randn_like(x)),
            "decode": (x,)}


def mark_symbolic(stage: str, args: tuple, axes: tuple[str, ...]) -> None:
    """Marks the example inputs' axes that the compiled code must take at any value: "batch" (the
    N or 2N axis of every input that has one) and "size" (height and width of every 4-D input)."""
    def mark(tensor: torch.Tensor, batch: str | None) -> None:
        if "batch" in axes and batch is not None:
            torch._dynamo.mark_dynamic(tensor, 0)
        if "size" in axes and tensor.dim() == 4:
            torch._dynamo.mark_dynamic(tensor, [2, 3])

    for arg, batch in zip(args, BATCH_AXES[stage]):
        for tensor in arg if isinstance(arg, (list, tuple)) else [arg]:
            mark(tensor, batch)


def call_stage(module: torch.nn.Module, *args):
    """What is compiled: the module is an argument, so its weights are inputs of the program."""
    return module(*args)


def source_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in SOURCE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_identity(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, numerics: dict) -> dict:
    """Everything the programs depend on besides their range; compared field by field at load.
    Not the checkpoint: the weights are inputs."""
    return {"config": cfg.name, "torch": torch.__version__, "device": device_name(device),
            "dtype": str(dtype).replace("torch.", ""), **numerics, "source": source_digest()}


def program_path(program_dir: Path, stage: str, variant: str) -> Path:
    return Path(program_dir) / f"{stage}.{variant.replace(' ', '_')}.bin"


def read_program_record(program_dir: Path) -> dict | None:
    return read_record(Path(program_dir) / RECORD_NAME)


def stale_reason(program_dir: Path, identity: dict) -> str | None:
    """None if program_dir holds programs for exactly `identity`, else what is missing or differs."""
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
    missing = [program_path(program_dir, s, v).name for v in record.get("variants", ()) for s in STAGE_NAMES
               if not program_path(program_dir, s, v).is_file()]
    if missing:
        return f"{program_dir} lacks {', '.join(missing)}"
    return None


def rebuild_reason(program_dir: Path, identity: dict, kinds: tuple[str, ...]) -> str | None:
    """Why `prepare` must compile for these kinds of size, or None where the programs in
    program_dir are current and hold every one of them."""
    reason = stale_reason(program_dir, identity)
    if reason is not None:
        return reason
    missing = [kind for kind in kinds if kind not in read_program_record(program_dir).get("variants", ())]
    return f"the programs in {program_dir} lack the kinds {', '.join(missing)}" if missing else None


def record_range(program_dir: Path) -> tuple[ShapeRange, tuple[str, ...]]:
    """The range the programs serve and the variants prepared."""
    record = read_program_record(program_dir)
    return ShapeRange(**record["range"]), tuple(record["variants"])


class UnusablePrograms(RuntimeError):
    """The programs compiled but cannot be loaded here."""


def start_programs(program_dir: Path) -> None:
    """The first step of preparing programs (then compile_variant per kind, in any order or at
    once, then finish): the directory made and its record removed, so that until finish() writes
    a new one nothing uses what is in it."""
    Path(program_dir).mkdir(parents=True, exist_ok=True)
    (Path(program_dir) / RECORD_NAME).unlink(missing_ok=True)


def compile_variant(stages: Stages, cfg: ModelConfig, program_dir: Path, device, dtype: torch.dtype,
                    inductor_options: dict, shape_range: ShapeRange, variant: str,
                    share_first_layers: bool = True) -> float:
    """Every stage compiled for one kind of size and saved (the step's inputs as example_inputs
    makes them for `share_first_layers`); returns the seconds it took."""
    start = time.perf_counter()
    samples, axes = VARIANTS[variant]
    latent = GRADED_LATENT if variant == "graded" else shape_range.example_latent()
    examples = example_inputs(stages, cfg, device, dtype, samples, latent, shape_range.tokens, share_first_layers)
    for name, module in stages.items():
        mark_symbolic(name, examples[name], axes)
        with traced_form(module, variant):
            compiled = compile_stage(module, examples[name], inductor_options)
        compiled.save_compiled_function(str(program_path(program_dir, name, variant)))
    return round(time.perf_counter() - start, 1)


def traced_form(module: torch.nn.Module, variant: str):
    """The form a variant's programs are traced in and called in (their guards hold the module to
    it): kinds with symbolic axes without patch products, whose row bound the compiler would guard
    on (networks.use_patch_products)."""
    return without_patch_products(module) if VARIANTS[variant][1] else contextlib.nullcontext()


def compile_stage(module: torch.nn.Module, args: tuple, inductor_options: dict):
    """call_stage(module, *args) compiled ahead, symbolic only on the axes marked in `args`.

    Dynamo remembers the sizes each code object was compiled for, and every stage is the same
    code object (call_stage): without the reset, a stage compiled after another would take every
    axis whose size differs from the previous stage's inputs as symbolic ("automatic dynamic
    shapes"). The graded programs were compiled so until this was found, and their step ran 5 ms
    slower than the same code compiled in-process (looped instead of persistent reductions,
    docs/benchmarks.md)."""
    torch._dynamo.reset()
    # Duck sizing would give every symbolic axis that happens to share a value in the example (a
    # batch of 4 and a 4-wide feature map) one symbol, and the program would then demand that they
    # stay equal. no_grad, as the pipeline runs: the guards check it. torch 2.11 offers
    # aot_compile only with enable_aot_compile set (2.13 sets it already).
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False), \
            torch._dynamo.config.patch(enable_aot_compile=True):
        return torch.compile(call_stage, fullgraph=True, options=inductor_options).aot_compile(((module, *args), {}))


def finish(program_dir: Path, identity: dict, inductor_options: dict, shape_range: ShapeRange,
           seconds: dict[str, float]) -> None:
    """The record written, once the programs of every variant in `seconds` load in a child
    process: an interrupted run, or programs that cannot load here, leave no record, so nothing
    ever tries to use them. Raises UnusablePrograms where they do not load."""
    variants = tuple(seconds)
    problem = load_problem(program_dir, variants)
    if problem is not None:
        raise UnusablePrograms(problem)
    record = {"identity": identity, "range": asdict(shape_range), "variants": list(variants),
              "inductor_options": inductor_options, "compile_seconds": seconds}
    write_record(Path(program_dir) / RECORD_NAME, record)


# A load takes seconds; on the H100 machine's image (2026-11-25) loads also hung, even a two-layer
# model's, so the check gives up after this long.
LOAD_TIMEOUT_S = 300


def load_problem(program_dir: Path, variants: tuple[str, ...], timeout_s: float = LOAD_TIMEOUT_S) -> str | None:
    """Loads every program in a child process: None if that works, else what went wrong. A loader
    that crashes or hangs (as AOTInductor's did on the H100 machine's image, docs/benchmarks.md)
    then cannot take the caller's process with it."""
    code = ("import sys; from pathlib import Path; from sdcanny import programs; "
            "programs.load(Path(sys.argv[1]), tuple(sys.argv[2:]))")
    problem = child_problem([sys.executable, "-c", code, str(Path(program_dir).resolve()), *variants], timeout_s)
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
        return f"kills the process with {signal.Signals(-proc.returncode).name}"
    lines = proc.stderr.strip().splitlines()
    return f"fails: {lines[-1] if lines else f'exit status {proc.returncode}'}"


def run_in_parallel(commands: dict[str, list[str]], log_dir: Path, poll_s: float = 1.0,
                    desc: str = "running") -> dict[str, float]:
    """Runs every command at once in the project root, each writing its output to
    log_dir/<name>.log, under a progress bar; returns each one's wall seconds. Where one fails,
    the others are stopped and RuntimeError names it, its log and the log's last line."""
    procs, logs = {}, {}
    start = time.perf_counter()
    for name, command in commands.items():
        logs[name] = Path(log_dir) / f"{name.replace(' ', '_')}.log"
        with open(logs[name], "w") as log:  # the child keeps its own handle
            procs[name] = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = {}
    bar = progress(total=len(procs), desc=desc)
    try:
        while len(seconds) < len(procs):
            for name, proc in procs.items():
                if name in seconds or proc.poll() is None:
                    continue
                if proc.returncode != 0:
                    lines = logs[name].read_text(errors="replace").strip().splitlines()
                    raise RuntimeError(f"{name} failed (exit status {proc.returncode}; {logs[name]}): "
                                       f"{lines[-1] if lines else 'no output'}")
                seconds[name] = round(time.perf_counter() - start, 1)
                write(f"{name}: done in {seconds[name]:.0f} s")
                bar.update(1)
            if len(seconds) < len(procs):
                time.sleep(poll_s)
                bar.update(0)  # the elapsed time moves on while nothing finishes
    finally:
        bar.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return seconds


def load(program_dir: Path, variants: tuple[str, ...]) -> dict[str, dict]:
    """variant -> stage name -> the compiled function, taking the stage module then its inputs.
    Their own guard check is off: PreparedStage checks the guards before each call (to name the
    one that fails), and a second check per call would repeat the work."""
    if compat.CUSTOM_OPS:  # programs made with our kernels' ops call them by name
        fused_norm.register_op()
        fused_attention.register_op()
        fused_geglu.register_op()
        fused_scores.register_op()
        fused_conv.register_op()
    programs = {}
    for variant in variants:
        programs[variant] = {}
        for name in STAGE_NAMES:
            with open(program_path(program_dir, name, variant), "rb") as file:
                programs[variant][name] = torch.compiler.load_compiled_function(file)
            programs[variant][name].disable_guard_check()
    return programs


class OutsidePreparedShapes(RuntimeError):
    """A program's guards refuse these inputs (a size its symbolic shapes do not cover)."""


class PreparedStage:
    """A stage served by its program: called like the stage module. Inputs that the program's
    guards refuse raise OutsidePreparedShapes (the back-end then runs that size eager). Called in
    the `variant`'s traced_form."""

    def __init__(self, name: str, compiled, module: torch.nn.Module, variant: str):
        self.name, self.compiled, self.module, self.variant = name, compiled, module, variant

    def __call__(self, *args):
        with traced_form(self.module, self.variant):
            if not self.compiled.guard_check(self.module, *args):
                raise OutsidePreparedShapes(f"the {self.name} program's guards refuse these inputs "
                                            f"({guard_failure(self.compiled, self.module, *args)})")
            return self.compiled(self.module, *args)


def guard_failure(compiled, *args) -> str:
    """The first guard a compiled program's inputs fail, in dynamo's words (its internals, so
    only where this torch has them)."""
    try:
        manager = compiled._artifacts.guard_manager
        parts = manager.check_verbose(compiled.prepare_f_locals(*args)).verbose_code_parts
    except AttributeError:
        return "this torch does not say which guard"
    return parts[0] if parts else "no guard named"
