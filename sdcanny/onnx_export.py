"""ONNX graphs of the three engines in `engine_specs`, checked and compared with PyTorch.

For each engine: wrap the network so that its inputs and outputs are exactly the spec's, export
it with torch.onnx's TorchScript exporter at the target TensorRT's opset (17 for 8.6, 18 for 10
and 11), simplify it where onnxsim or onnxslim is installed (onnxsim works from the file, so a
>2 GB graph never has to fit in one protobuf), save it as one file, or over 2 GB as `<stem>.onnx`
plus one `<stem>.onnx.data`, run onnx.checker and shape inference, check that its inputs and
outputs match the spec and that no constant is infinite, and, where onnxruntime is installed, run
it against PyTorch on seeded random inputs.

The graphs are fp32 (TensorRT 8.6 / 10 build fp16 engines from them, weakly typed) except for a
strongly typed fp16 engine, whose graph is exported in fp16 with explicit fp32 islands
(`networks.to_mixed_precision`) and compared with the fp32 PyTorch module at fp16's tolerance.

A JSON record beside each .onnx says what it was exported from, so a re-run of preprocess.sh
skips graphs that are already current.
"""
from __future__ import annotations

import copy
import inspect
import json
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from torch import nn

from . import compat
from .checkpoint import Networks
from .config import ModelConfig
from .engine_specs import DOCKER_TARGET, TARGETS, EngineSpec, file_sha256, onnx_sha256
from .networks import ControlNet, UNet, UnionModel, to_mixed_precision
from .optional import installed, optional

PROTOBUF_LIMIT = 2 ** 31  # a single .onnx protobuf cannot exceed 2 GB; larger models keep weights outside
PARITY_TOLERANCE = 1e-4  # fp32 onnxruntime vs PyTorch: max abs error / max abs output
# fp16 graph (fp32 islands) vs the fp32 PyTorch module: float outputs within 1% relative L2 (fp16
# keeps 11 significant bits; errors add up over ~100 layers); uint8 images off by a few levels
FP16_RELATIVE_L2 = 1e-2
FP16_IMAGE_MEAN_ABS = 1.0


def opset_for(target: str = DOCKER_TARGET) -> int:
    """The target TensorRT's opset, or lower where this torch's exporter stops earlier."""
    return min(TARGETS[target].opset, compat.max_onnx_opset())
_SOURCES = ("networks.py", "onnx_export.py", "engine_specs.py")


# ----------------------------------------------------------------------------------------------
# The graphs: each wrapper's forward has exactly the spec's inputs and outputs
# ----------------------------------------------------------------------------------------------

class ClipGraph(nn.Module):
    """int32 tokens (2, 77) -> context (2, 77, 768)."""

    def __init__(self, nets: Networks):
        super().__init__()
        self.clip = nets.clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip(tokens)


class UnionGraph(nn.Module):
    """One denoising step of ControlNet + UNet for the guidance pair. The hint block runs inside
    (about 0.5% of a step) so that the engine takes the hint image itself; control_scales (2, 13)
    is an input so that strength and guess mode (zeros for the uncond row) need no rebuild."""

    def __init__(self, controlnet: ControlNet, unet: UNet):
        super().__init__()
        self.union = UnionModel(controlnet, unet)

    def forward(self, latent, timestep, context, hint, control_scales) -> torch.Tensor:
        dtype = self.union.unet.out[2].weight.dtype  # fp32 inputs and output whatever the graph computes in
        hint_features = self.union.controlnet.embed_hint(hint.to(dtype))
        return self.union(latent.to(dtype), timestep, context.to(dtype), hint_features, control_scales).float()


class VaeGraph(nn.Module):
    """Scaled latent (1, 4, h, w) -> uint8 image (1, H, W, 3) with the original's post-processing:
    x * 127.5 + 127.5, clamped to [0, 255], floored before the cast. The original truncates (numpy
    astype), which is the floor of a non-negative value; an explicit floor makes the result
    independent of how a runtime rounds float -> uint8."""

    def __init__(self, nets: Networks):
        super().__init__()
        self.vae = nets.vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        image = self.vae(latent.to(self.vae.post_quant_conv.weight.dtype)).float().permute(0, 2, 3, 1) * 127.5 + 127.5
        return torch.floor(image.clamp(0.0, 255.0)).to(torch.uint8)


def graph_module(name: str, nets: Networks, precision: str = "fp32") -> nn.Module:
    """The graph of engine `name`; for precision "fp16", an fp16 copy with fp32 islands (the
    networks in `nets` are not changed)."""
    modules = {"clip": lambda: ClipGraph(nets), "union": lambda: UnionGraph(nets.controlnet, nets.unet),
               "vae": lambda: VaeGraph(nets)}
    module = modules[name]().eval()
    return to_mixed_precision(copy.deepcopy(module)) if precision == "fp16" else module


def sample_inputs(spec: EngineSpec, cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs in each tensor's real range: token ids, timesteps 0..999, a sparse 0/1 edge
    map as the hint, control scales up to 2, normal latents and contexts."""
    gen = torch.Generator().manual_seed(seed)
    makers = {
        "tokens": lambda s: torch.randint(0, cfg.clip.vocab_size, s, generator=gen),
        "timestep": lambda s: torch.randint(0, cfg.schedule.timesteps, s, generator=gen),
        "hint": lambda s: (torch.rand(s, generator=gen) < 0.1).float(),
        "control_scales": lambda s: 2.0 * torch.rand(s, generator=gen),
    }
    normal = lambda s: torch.randn(s, generator=gen)  # noqa: E731
    return {t.name: makers.get(t.name, normal)(t.shape).to(getattr(torch, t.dtype)) for t in spec.inputs}


# ----------------------------------------------------------------------------------------------
# Export, simplification, saving
# ----------------------------------------------------------------------------------------------

def torch_export(module: nn.Module, spec: EngineSpec, inputs: dict[str, torch.Tensor], path: Path,
                 opset: int) -> None:
    """TorchScript-based torch.onnx export: seconds where the dynamo exporter takes a minute on
    these graphs, and it writes >2 GB models with external data by itself (SD1.5 union: 48 s, 6 GB
    peak). It is deprecated in favour of the dynamo exporter, hence the silenced deprecation
    warnings; its tracer warnings are about shapes becoming constants, which is the intent here."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(module, tuple(inputs[n] for n in spec.input_names), str(path),
                          input_names=spec.input_names, output_names=spec.output_names, opset_version=opset,
                          do_constant_folding=True, **compat.onnx_export_kwargs())


def export_fp16(module: nn.Module, spec: EngineSpec, inputs: dict[str, torch.Tensor], path: Path, opset: int) -> None:
    """The fp16 graph is traced on a CUDA GPU where there is one, else on the CPU where this torch
    has fp16 convolutions there (torch 2.0 has not)."""
    if torch.cuda.is_available():
        device = "cuda"
    elif compat.cpu_runs_fp16_convolutions():
        device = "cpu"
    else:
        raise RuntimeError(f"torch {torch.__version__} has no fp16 convolutions on the CPU, which tracing the strongly "
                           "typed fp16 graph needs: export it on a machine with a CUDA GPU or a newer torch")
    try:
        torch_export(module.to(device), spec, {k: v.to(device) for k, v in inputs.items()}, path, opset)
    finally:
        module.to("cpu")


def simplify_file(source: Path, target: Path) -> str:
    """Simplify `source` into `target` (both .onnx paths, weights wherever the tool puts them);
    returns the tool used, or "none" (the exporter's constant-folded graph, copied) where no
    simplifier is installed or able. onnxsim is preferred: it works from the file, so a >2 GB
    graph never has to fit in one protobuf (SD1.5 union graph: 31 s, 6.3 GB peak); onnxslim
    needed over 15 GB there and then hit protobuf's 2 GB limit."""
    large = external_bytes(source) >= PROTOBUF_LIMIT
    onnxsim = optional("onnxsim", "the exported graphs are not simplified (TensorRT folds them itself)")
    if onnxsim is not None:
        try:
            if "output_path" in inspect.signature(onnxsim.simplify).parameters:
                _, ok = onnxsim.simplify(str(source), check_n=0, output_path=str(target))  # parity is checked below
            elif not large:  # 2023 releases take and return an in-memory model only
                model, ok = onnxsim.simplify(onnx.load(str(source)), check_n=0)
                if ok:
                    onnx.save_model(model, str(target))
            else:
                ok = False
                print("  this onnxsim cannot simplify a >2 GB graph from its file")
            if ok and target.is_file():
                return "onnxsim"
            print("  onnxsim did not produce a model")
        except Exception as exc:  # onnxsim raises bare RuntimeErrors from C++; the graph is usable unsimplified
            print(f"  onnxsim failed ({type(exc).__name__}: {str(exc)[:200]})")
    if installed("onnxslim") and not large:
        import onnxslim
        onnxslim.slim(str(source), str(target))
        return "onnxslim"
    move_into_place(source, target)
    return "none"


def external_data_path(onnx_path: Path) -> Path:
    return onnx_path.with_name(onnx_path.name + ".data")


def _external_locations(model: onnx.ModelProto) -> dict[str, list[onnx.TensorProto]]:
    """{data file name: tensors stored in it} over initializers and Constant nodes."""
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    out: dict[str, list[onnx.TensorProto]] = {}
    for tensor in tensors:
        for entry in tensor.external_data:
            if entry.key == "location":
                out.setdefault(entry.value, []).append(tensor)
    return out


def external_bytes(onnx_path: Path) -> int:
    """Bytes of weights that `onnx_path` keeps in external data files."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return sum((onnx_path.parent / loc).stat().st_size for loc in _external_locations(model))


def move_into_place(source: Path, target: Path, limit: int = PROTOBUF_LIMIT) -> list[Path]:
    """Saves the model at `source` as `target`: one self-contained file below `limit` (2 GB), else
    `target` plus all weights in `<target>.data`. Returns the files written. A single external
    file is renamed, not rewritten, so a 5 GB model is never loaded here."""
    for old in (target, external_data_path(target)):
        old.unlink(missing_ok=True)
    model = onnx.load(str(source), load_external_data=False)
    locations = _external_locations(model)
    if external_bytes(source) < limit:
        onnx.save_model(onnx.load(str(source)), str(target))
        return [target]
    if len(locations) == 1:
        (location, tensors), = locations.items()
        (source.parent / location).rename(external_data_path(target))
        for tensor in tensors:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = external_data_path(target).name
        onnx.save_model(model, str(target))
    else:
        onnx.save_model(onnx.load(str(source)), str(target), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=external_data_path(target).name, size_threshold=1024)
    return [target, external_data_path(target)]


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def flat_values(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """A tensor's values, flattened; external data is memory-mapped rather than read, so checking
    a 5 GB graph costs no memory."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor).ravel()
    info = {entry.key: entry.value for entry in tensor.external_data}
    return np.memmap(base_dir / info["location"], dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type),
                     mode="r", offset=int(info.get("offset", 0)), shape=(int(np.prod(tensor.dims)),))


_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def infinite_constants(model: onnx.ModelProto, base_dir: Path = Path(".")) -> list[str]:
    """Names of the float initializers and Constant nodes holding +-inf or NaN; `base_dir` is
    where the model's external data files are."""
    def bad(tensor: onnx.TensorProto) -> bool:
        return tensor.data_type in _FLOAT_TYPES and not np.isfinite(flat_values(tensor, base_dir)).all()

    names = [t.name for t in model.graph.initializer if bad(t)]
    for node in model.graph.node:
        if node.op_type == "Constant":
            names += [f"{node.name or node.output[0]}" for a in node.attribute if a.HasField("t") and bad(a.t)]
            names += [f"{node.name or node.output[0]}" for a in node.attribute
                      if a.name == "value_float" and not np.isfinite(a.f)]
    return names


def io_mismatches(model: onnx.ModelProto, spec: EngineSpec) -> list[str]:
    """Differences between the graph's inputs/outputs and the spec (names, order, dtypes, shapes)."""
    problems = []
    for kind, values, tensors in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        got = [v.name for v in values]
        if got != [t.name for t in tensors]:
            problems.append(f"{kind} names {got} != {[t.name for t in tensors]}")
            continue
        for value, tensor in zip(values, tensors):
            ttype = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type).name
            shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in ttype.shape.dim)
            if dtype != tensor.dtype or shape != tensor.shape:
                problems.append(f"{kind} {tensor.name}: {dtype}{list(shape)} != {tensor.dtype}{list(tensor.shape)}")
    return problems


def check_graph(path: Path, spec: EngineSpec) -> None:
    """onnx.checker and strict shape inference (by path: works for >2 GB models), then the spec's
    inputs/outputs and finite constants. Raises ValueError naming what is wrong."""
    onnx.checker.check_model(str(path), full_check=False)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        inferred_path = Path(tmp) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred_path), strict_mode=True)
    model = onnx.load(str(path), load_external_data=False)
    problems = io_mismatches(model, spec)
    infinite = infinite_constants(model, path.parent)
    if infinite:
        problems.append(f"non-finite constants (fp16 engines could produce NaN): {infinite[:8]}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))


def run_onnxruntime(path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The graph's outputs from onnxruntime's CPU provider (which runs an fp16 graph's ops that
    lack fp16 kernels in fp32, inserting casts)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # follows OMP_NUM_THREADS
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v.numpy() for k, v in inputs.items()})))


@dataclass(frozen=True)
class Parity:
    output: str
    max_abs_error: float
    output_scale: float  # max |PyTorch output|
    mismatched_fraction: float  # elements that differ at all
    relative_l2: float  # ||got - expected|| / ||expected||
    mean_abs_error: float
    ok: bool

    def describe(self) -> str:
        rel = self.max_abs_error / self.output_scale if self.output_scale else 0.0
        return (f"{self.output}: max abs error {self.max_abs_error:.3g} (relative {rel:.2g}), relative L2 "
                f"{self.relative_l2:.2g}, {100 * self.mismatched_fraction:.3g}% elements differ "
                f"-> {'OK' if self.ok else 'FAILED'}")


def compare(name: str, reference: np.ndarray, got: np.ndarray, fp16: bool = False) -> Parity:
    """fp32 graphs: float outputs within 1e-4 x max |reference|; integer (uint8 image) outputs off
    by 1 in at most 0.1% of the elements (the floor before the cast turns a ~1e-6 float difference
    into 1 where a value sits on an integer). fp16 graphs against the fp32 module: float outputs
    within FP16_RELATIVE_L2, images within FP16_IMAGE_MEAN_ABS levels on average."""
    if reference.shape != got.shape or reference.dtype != got.dtype:
        return Parity(name, float("inf"), 0.0, 1.0, float("inf"), float("inf"), False)
    diff = np.abs(reference.astype(np.float64) - got.astype(np.float64))
    err, scale, frac, mean = float(diff.max()), float(np.abs(reference).max()), float((diff > 0).mean()), float(diff.mean())
    norm = float(np.linalg.norm(reference.astype(np.float64)))
    rel_l2 = float(np.linalg.norm(diff)) / norm if norm else float(err > 0)
    integer = np.issubdtype(reference.dtype, np.integer)
    finite = integer or bool(np.isfinite(got).all())
    if fp16:
        ok = finite and (mean <= FP16_IMAGE_MEAN_ABS if integer else rel_l2 <= FP16_RELATIVE_L2)
    else:
        ok = finite and (err <= 1 and frac <= 1e-3 if integer else err <= PARITY_TOLERANCE * max(scale, 1e-6))
    return Parity(name, err, scale, frac, rel_l2, mean, ok)


def parity(module: nn.Module, path: Path, spec: EngineSpec, inputs: dict[str, torch.Tensor]) -> list[Parity]:
    """onnxruntime on the graph at `path` against `module` (fp32 PyTorch) on the same inputs; [] with
    a line saying so where onnxruntime is not installed."""
    if optional("onnxruntime", "the ONNX graphs are not compared with PyTorch (run polygraphy or "
                               "install onnxruntime for that check)") is None:
        return []
    with torch.no_grad():
        expected = module(*(inputs[n] for n in spec.input_names))
    expected = dict(zip(spec.output_names, [expected] if torch.is_tensor(expected) else expected))
    got = run_onnxruntime(path, inputs)
    return [compare(n, expected[n].numpy(), got[n], fp16=spec.onnx_precision == "fp16") for n in spec.output_names]


# ----------------------------------------------------------------------------------------------
# One engine's graph, end to end, and the record that lets a re-run skip it
# ----------------------------------------------------------------------------------------------

def code_sha256() -> str:
    """Hash of the sources that define the exported graphs: a change there means re-export."""
    here = Path(__file__).parent
    return file_sha256([here / name for name in _SOURCES])


# taken when the code was imported: a source edited during a long export does not count as exported
CODE_SHA256 = code_sha256()


def export_record(spec: EngineSpec, cfg: ModelConfig, checkpoint: Path, opset: int) -> dict:
    stat = Path(checkpoint).stat()
    record = {
        "config": cfg.name, "inputs": [asdict(t) for t in spec.inputs], "outputs": [asdict(t) for t in spec.outputs],
        "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns, "opset": opset, "onnx_precision": spec.onnx_precision,
        "torch": torch.__version__,
        "code_sha256": CODE_SHA256,
    }
    return json.loads(json.dumps(record))  # as it reads back from the file (tuples become lists)


def reexport_reason(spec: EngineSpec, engine_dir: Path, record: dict) -> str | None:
    """None if the .onnx in engine_dir was exported from exactly `record`, else why not."""
    onnx_path, record_path = spec.onnx_path(engine_dir), spec.export_record_path(engine_dir)
    if not onnx_path.is_file():
        return f"{onnx_path} does not exist"
    try:
        previous = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return f"{record_path} is missing or unreadable"
    changed = sorted(k for k in record if record[k] != previous.get(k))
    if changed:
        return f"changed since the last export: {', '.join(changed)}"
    try:
        current = onnx_sha256(onnx_path)
    except (OSError, DecodeError) as exc:
        return f"{onnx_path} cannot be read ({type(exc).__name__})"
    if previous.get("onnx_sha256") != current:
        return f"{onnx_path} was modified after its export"
    return None


@dataclass
class ExportResult:
    spec: EngineSpec
    files: list[Path]
    simplifier: str
    seconds: float
    parity: list[Parity]

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def export_graph(spec: EngineSpec, nets: Networks, cfg: ModelConfig, engine_dir: Path, checkpoint: Path,
                 check_parity: bool = True, seed: int = 0, opset: int | None = None) -> ExportResult:
    """Export, simplify, save, check and compare one engine's graph; writes its record last, so an
    interrupted export is redone on the next run."""
    start = time.perf_counter()
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = spec.onnx_path(engine_dir)
    spec.export_record_path(engine_dir).unlink(missing_ok=True)
    opset = opset or opset_for()
    module = graph_module(spec.name, nets)
    inputs = sample_inputs(spec, cfg, seed)
    # the raw export of a >2 GB model is one file per tensor: keep that in a scratch folder
    with tempfile.TemporaryDirectory(dir=engine_dir, prefix=f".export_{spec.stem}_") as tmp:
        raw_path, simplified_path = Path(tmp) / "raw.onnx", Path(tmp) / "simplified.onnx"
        if spec.onnx_precision == "fp16":
            export_fp16(graph_module(spec.name, nets, "fp16"), spec, inputs, raw_path, opset)
        else:
            torch_export(module, spec, inputs, raw_path, opset)
        simplifier = simplify_file(raw_path, simplified_path)
        files = move_into_place(simplified_path, onnx_path)
    check_graph(onnx_path, spec)
    results = parity(module, onnx_path, spec, inputs) if check_parity else []
    failed = [r.describe() for r in results if not r.ok]
    if failed:
        raise ValueError(f"{onnx_path} differs from PyTorch: " + "; ".join(failed))
    record = {**export_record(spec, cfg, checkpoint, opset), "onnx_sha256": onnx_sha256(onnx_path),
              "simplifier": simplifier}
    spec.export_record_path(engine_dir).write_text(json.dumps(record, indent=1))
    return ExportResult(spec, files, simplifier, time.perf_counter() - start, results)


def remove_scratch(engine_dir: Path) -> None:
    """Scratch folders an interrupted export left behind."""
    for leftover in Path(engine_dir).glob(".export_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def export_all(specs: list[EngineSpec], cfg: ModelConfig, checkpoint: Path, engine_dir: Path, force: bool = False,
               skip_parity: tuple[str, ...] = (), seed: int = 0, opset: int | None = None) -> list[ExportResult]:
    """Export every spec whose .onnx is missing or out of date (all of them with `force`)."""
    from .checkpoint import load_networks
    remove_scratch(engine_dir)
    opset = opset or opset_for()
    todo = []
    for spec in specs:
        reason = "--force" if force else reexport_reason(spec, engine_dir, export_record(spec, cfg, checkpoint, opset))
        if reason is None:
            print(f"[export] {spec.name}: {spec.onnx_path(engine_dir)} is up to date")
        else:
            print(f"[export] {spec.name}: exporting ({reason})")
            todo.append(spec)
    if not todo:
        return []
    nets = load_networks(checkpoint, cfg)
    results = []
    for spec in todo:
        result = export_graph(spec, nets, cfg, engine_dir, checkpoint, spec.name not in skip_parity, seed, opset)
        files = ", ".join(f"{p} ({p.stat().st_size / 1e6:.1f} MB)" for p in result.files)
        print(f"[export] {spec.name}: wrote {files} in {result.seconds:.0f} s, simplified with {result.simplifier}")
        for p in result.parity:
            print(f"[export] {spec.name}: onnxruntime vs PyTorch {p.describe()}")
        if not result.parity:
            why = "--skip-parity" if spec.name in skip_parity else "onnxruntime is not installed"
            print(f"[export] {spec.name}: parity check skipped ({why})")
        results.append(result)
    return results
