"""The one table of TensorRT engines: what export_onnx.py writes, what build_engines.py builds and
what the trt back-end allocates buffers for.

Each engine has static shapes (TensorRT picks its fastest kernels for exactly one shape) and a
batch of 2, the guidance pair [cond, uncond] of one image. Shapes are functions of the image size
(default the graded 256x384, latent 32x48) and of the model config, so the tiny test model uses
the same table. Engines are fp32 at their inputs and outputs whatever their precision: TensorRT
converts inside the engine, the caller never handles fp16.

Two ways to get an fp16 engine, one per TensorRT generation ("typing"):
  weak    an fp32 ONNX graph, built with BuilderFlag.FP16; the layers that must stay fp32 are
          pinned by the builder (TensorRT 8.6 and 10.x; 11 removed this)
  strong  an fp16 ONNX graph with explicit fp32 islands (networks.to_mixed_precision), built as a
          strongly typed network: the file decides every type (TensorRT 10.x and 11.x)
`TARGETS` says which each TensorRT offers and which ONNX opset its parser takes.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import onnx

from .config import ModelConfig
from .records import file_stats, read_record, write_record

DEFAULT_HEIGHT, DEFAULT_WIDTH = 256, 384
GUIDANCE_BATCH = 2  # [cond, uncond]
PRECISIONS = ("fp16", "fp32")
TYPINGS = ("weak", "strong")
ENGINE_NAMES = ("clip", "union", "vae")


@dataclass(frozen=True)
class Target:
    """What one TensorRT generation takes: the highest ONNX opset its parser reads (8.6 stops at 17),
    and the typings it builds, the first being its default."""
    opset: int
    typings: tuple


TARGETS = {"8.6": Target(opset=17, typings=("weak",)),
           "10": Target(opset=18, typings=("weak", "strong")),
           "11": Target(opset=18, typings=("strong",))}
DOCKER_TARGET = "8.6"  # the hackathon docker's TensorRT, and the default where none is installed


def target_of(tensorrt_version: str) -> str:
    """"8.6.1.6" -> "8.6", "10.13.3.9" -> "10", "11.4.0" -> "11"."""
    major, minor = (int(x) for x in tensorrt_version.split(".")[:2])
    if (major, minor) < (8, 6):
        raise ValueError(f"TensorRT {tensorrt_version} is not supported: 8.6, 10.x or 11.x")
    return "8.6" if major < 10 else str(min(major, 11))


def installed_tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None. Imports tensorrt (a second or so) only when it is there."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        import tensorrt
    except Exception:  # installed without its libraries (e.g. a bare bindings wheel): as good as absent
        return None
    return tensorrt.__version__


@dataclass(frozen=True)
class Dims:
    """Every size an engine's tensors are made of, for one model config and one image size."""
    height: int  # image
    width: int
    latent_height: int
    latent_width: int
    latent_channels: int
    hint_channels: int
    tokens: int  # CLIP sequence length (77)
    context_width: int  # CLIP width = the UNet's cross-attention context width (768)
    controls: int  # control residuals (13)


def dims(cfg: ModelConfig, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH) -> Dims:
    # the latent goes through three 2x downsamplings in the UNet, so it must divide by 8 and the
    # image by 8 * 8; process() rounds to multiples of 64 in the same way
    multiple = cfg.vae.downsample_factor * 2 ** (len(cfg.unet.channel_mult) - 1)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"image size {height}x{width} must be positive multiples of {multiple}")
    f = cfg.vae.downsample_factor
    return Dims(height=height, width=width, latent_height=height // f, latent_width=width // f,
                latent_channels=cfg.unet.in_channels, hint_channels=cfg.unet.hint_channels,
                tokens=cfg.clip.max_length, context_width=cfg.clip.width,
                controls=cfg.unet.num_control_residuals)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy / torch dtype name: float32, int32, uint8


@dataclass(frozen=True)
class EngineSpec:
    name: str  # clip, union, vae
    stem: str  # file name without suffix: clip, union_256x384, vae_256x384
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str  # fp16 or fp32
    fp32_from: tuple[str, ...] = ()  # inputs whose own computations stay fp32 in an fp16 engine
    typing: str = "weak"  # see the module docstring

    @property
    def onnx_precision(self) -> str:
        """fp16 only for a strongly typed fp16 engine; every other engine is built from fp32 ONNX."""
        return "fp16" if self.typing == "strong" and self.precision == "fp16" else "fp32"

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def onnx_path(self, engine_dir: Path) -> Path:
        suffix = ".fp16.onnx" if self.onnx_precision == "fp16" else ".onnx"
        return Path(engine_dir) / f"{self.stem}{suffix}"

    def plan_path(self, engine_dir: Path) -> Path:
        return Path(engine_dir) / f"{self.stem}.plan"

    def build_record_path(self, engine_dir: Path) -> Path:
        """JSON beside the .plan: the ONNX hash and build flags it was built from."""
        return Path(engine_dir) / f"{self.stem}.plan.json"

    def export_record_path(self, engine_dir: Path) -> Path:
        """JSON beside the .onnx: what it was exported from."""
        return self.onnx_path(engine_dir).with_name(self.onnx_path(engine_dir).name + ".json")


ShapeOf = Callable[[Dims], Tuple[int, ...]]


@dataclass(frozen=True)
class Row:
    """One engine of the table, its shapes still functions of `Dims`."""
    name: str
    precision: str
    per_image_size: bool  # False: one engine serves every image size (CLIP)
    inputs: tuple[tuple[str, str, ShapeOf], ...]  # (tensor name, dtype, shape)
    outputs: tuple[tuple[str, str, ShapeOf], ...]
    fp32_from: tuple[str, ...] = ()


B = GUIDANCE_BATCH
TABLE = (
    # once per image, ~1 ms even in fp32: it costs nothing to keep the text embedding exact
    Row("clip", "fp32", per_image_size=False,
        inputs=(("tokens", "int32", lambda d: (B, d.tokens)),),
        outputs=(("context", "float32", lambda d: (B, d.tokens, d.context_width)),)),
    # ControlNet + UNet, one evaluation per step: all but ~1% of the work
    Row("union", "fp16", per_image_size=True,
        inputs=(("latent", "float32", lambda d: (B, d.latent_channels, d.latent_height, d.latent_width)),
                ("timestep", "int32", lambda d: (B,)),
                ("context", "float32", lambda d: (B, d.tokens, d.context_width)),
                ("hint", "float32", lambda d: (B, d.hint_channels, d.height, d.width)),
                ("control_scales", "float32", lambda d: (B, d.controls))),
        outputs=(("eps", "float32", lambda d: (B, d.latent_channels, d.latent_height, d.latent_width)),),
        # the sinusoidal embedding takes cos/sin of t * freq for t up to 999: in fp16 that product
        # is off by up to 0.25 rad. Everything computed from the timestep alone (the embedding and
        # the time MLPs, a few vectors of batch 2) is kept fp32, as ldm does in PyTorch
        fp32_from=("timestep",)),
    # once per image, its post-processing to HWC uint8 fused in
    Row("vae", "fp16", per_image_size=True,
        inputs=(("latent", "float32", lambda d: (1, d.latent_channels, d.latent_height, d.latent_width)),),
        outputs=(("image", "uint8", lambda d: (1, d.height, d.width, 3)),)),
)
ROWS = {row.name: row for row in TABLE}


def engine_spec(name: str, cfg: ModelConfig, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                precision: str | None = None, typing: str = "weak") -> EngineSpec:
    """The concrete spec of engine `name` for `cfg` at image size height x width."""
    if typing not in TYPINGS:
        raise ValueError(f"typing must be one of {TYPINGS}, got {typing!r}")
    if name not in ROWS:
        raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINE_NAMES)}")
    row = ROWS[name]
    precision = precision or row.precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    d = dims(cfg, height, width)
    resolve = lambda items: tuple(TensorSpec(n, tuple(shape(d)), dtype) for n, dtype, shape in items)  # noqa: E731
    stem = f"{name}_{height}x{width}" if row.per_image_size else name
    fp32_from = row.fp32_from if precision == "fp16" and typing == "weak" else ()  # strong: in the file
    return EngineSpec(name=name, stem=stem, inputs=resolve(row.inputs), outputs=resolve(row.outputs),
                      precision=precision, fp32_from=fp32_from, typing=typing)


def engine_specs(cfg: ModelConfig, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
                 precisions: dict[str, str] | None = None, typing: str = "weak") -> dict[str, EngineSpec]:
    """All three engines; `precisions` overrides the table's default per engine name."""
    precisions = precisions or {}
    unknown = set(precisions) - set(ENGINE_NAMES)
    if unknown:
        raise ValueError(f"unknown engine(s) {sorted(unknown)}; choose from {', '.join(ENGINE_NAMES)}")
    return {name: engine_spec(name, cfg, height, width, precisions.get(name), typing) for name in ENGINE_NAMES}


def parse_precisions(items: list[str]) -> dict[str, str]:
    """Command-line overrides 'union=fp32' -> {'union': 'fp32'}."""
    out = {}
    for item in items:
        name, sep, precision = item.partition("=")
        if not sep:
            raise ValueError(f"expected ENGINE=PRECISION (e.g. vae=fp32), got {item!r}")
        out[name] = precision
    return out


# ----------------------------------------------------------------------------------------------
# Engine staleness: the JSON record beside each .plan (no TensorRT needed to read or compare it)
# ----------------------------------------------------------------------------------------------

DEFAULT_OPTIMIZATION_LEVEL = 5  # TensorRT's highest: longest build, fastest kernels


def external_data_files(onnx_path: Path) -> list[Path]:
    """The .onnx file and every external data file it references."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = {entry.value for t in model.graph.initializer for entry in t.external_data
                 if entry.key == "location"}
    return [Path(onnx_path)] + [Path(onnx_path).parent / loc for loc in sorted(locations)]


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def onnx_sha256(onnx_path: Path) -> str:
    """Hash of the .onnx file and its external data: everything an engine built from it depends on."""
    return file_sha256(external_data_files(onnx_path))


def build_flags(spec: EngineSpec, tensorrt_version: str, gpu: str,
                optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL) -> dict:
    """Everything besides the ONNX file that decides what engine the builder makes."""
    return {
        "precision": spec.precision,
        "typing": spec.typing,
        "fp32_from": list(spec.fp32_from),
        "optimization_level": optimization_level,
        "input_shapes": {t.name: list(t.shape) for t in spec.inputs},  # static profile: min = opt = max
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,  # an engine only runs on the GPU model (and TensorRT version) it was built for
    }


def write_build_record(spec: EngineSpec, engine_dir: Path, onnx_hash: str, flags: dict, seconds: float) -> None:
    record = {"onnx": spec.onnx_path(engine_dir).name, "onnx_sha256": onnx_hash,
              "onnx_files": file_stats(external_data_files(spec.onnx_path(engine_dir))),
              "flags": flags, "build_seconds": round(seconds, 1)}
    write_record(spec.build_record_path(engine_dir), record)


def read_build_record(spec: EngineSpec, engine_dir: Path) -> dict | None:
    return read_record(spec.build_record_path(engine_dir))


def needs_rebuild(spec: EngineSpec, engine_dir: Path, flags: dict, onnx_hash: str | None = None) -> str | None:
    """None if engine_dir holds a .plan built from the current .onnx with exactly `flags`, else the
    reason to (re)build it. `onnx_hash` saves hashing the ONNX again where the caller has it."""
    onnx_path, plan_path = spec.onnx_path(engine_dir), spec.plan_path(engine_dir)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist: run `python3 export_onnx.py` first")
    if not plan_path.is_file():
        return f"{plan_path.name} does not exist"
    record = read_build_record(spec, engine_dir)
    if record is None:
        return f"{spec.build_record_path(engine_dir).name} is missing or unreadable"
    if record.get("onnx_sha256") != (onnx_hash or onnx_sha256(onnx_path)):
        return f"{onnx_path.name} changed since the engine was built"
    built = record.get("flags", {})
    changed = [f"{key} {built.get(key)!r} -> {value!r}" for key, value in flags.items() if built.get(key) != value]
    if changed:
        return "build flags changed: " + "; ".join(changed)
    return None


def built_spec(name: str, cfg: ModelConfig, engine_dir: Path, height: int = DEFAULT_HEIGHT,
               width: int = DEFAULT_WIDTH) -> EngineSpec | None:
    """The spec engine `name` was built with (its precision and typing are the build's choice, read
    from its record), or None where there is no readable record."""
    record = read_build_record(engine_spec(name, cfg, height, width), engine_dir)
    flags = record.get("flags", {}) if record else {}
    if flags.get("precision") not in PRECISIONS or flags.get("typing", "weak") not in TYPINGS:
        return None
    return engine_spec(name, cfg, height, width, flags["precision"], flags.get("typing", "weak"))


def engine_stale_reason(spec: EngineSpec, engine_dir: Path, tensorrt_version: str, gpu: str) -> str | None:
    """At load time, without hashing: None if the .plan and its record are there, were built by this
    TensorRT for this GPU, and the ONNX files they were built from (where still present) have the
    size and modification time the build recorded; else what is wrong."""
    plan_path = spec.plan_path(engine_dir)
    if not plan_path.is_file():
        return f"{plan_path.name} does not exist"
    record = read_build_record(spec, engine_dir)
    if record is None:
        return f"{spec.build_record_path(engine_dir).name} is missing or unreadable"
    built = record.get("flags", {})
    for key, now in (("tensorrt_version", tensorrt_version), ("gpu", gpu)):
        if built.get(key) != now:
            return f"built for {key.replace('_', ' ')} {built.get(key)!r}, this is {now!r}"
    for name, stat in record.get("onnx_files", {}).items():
        path = Path(engine_dir) / name
        if path.is_file() and list(file_stats([path])[name]) != list(stat):
            return f"{name} changed since the engine was built"
    return None
