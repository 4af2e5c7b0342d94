"""TensorRT helpers for 8.6, 10.x and 11.x: build an engine from an ONNX file, run one with torch buffers.

This module knows nothing about the networks: it takes file paths, tensor names and shapes. It
needs the `tensorrt` package and a CUDA GPU. `FEATURES` (below) is the one place that decides what
the running TensorRT offers; everything else asks it instead of comparing versions.

NONE OF THIS HAS RUN AGAINST A REAL TENSORRT: no machine it was written on could install it. It is
tested against a recording fake of the TensorRT objects whose names come from each version's
real Python bindings (tests/fake_tensorrt.py, tests/data/tensorrt_api/); docs/tensorrt.md lists
what to check first on a machine with TensorRT.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tensorrt as trt
import torch

LOGGER = trt.Logger(trt.Logger.WARNING)

TYPINGS = ("weak", "strong")
_TORCH_DTYPES = (("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
                 ("INT64", torch.int64), ("INT32", torch.int32), ("INT8", torch.int8),
                 ("UINT8", torch.uint8), ("BOOL", torch.bool))


# ----------------------------------------------------------------------------------------------
# What the running TensorRT offers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Features:
    version: str
    major: int
    minor: int
    # 8.x parses ONNX only into networks created with EXPLICIT_BATCH; 10 ignores the flag, 11 removed it
    explicit_batch_flag: bool
    # BuilderFlag.FP16 with per-layer precision (`ILayer.precision`, `set_output_type`): 8.6 and 10.x;
    # TensorRT 11 removed both and builds only strongly typed networks
    weak_typing: bool
    # NetworkDefinitionCreationFlag.STRONGLY_TYPED: every tensor's type comes from the ONNX file (10+)
    strong_typing: bool
    # OnnxParserFlag.NATIVE_INSTANCENORM: InstanceNormalization (GroupNorm's export) as a TensorRT
    # normalization layer rather than 8.6's default plugin
    native_instancenorm: bool
    torch_dtypes: dict  # trt.DataType -> torch dtype, for the members this version has

    @property
    def supported(self) -> bool:
        return (self.major, self.minor) >= (8, 6)

    def default_typing(self) -> str:
        return "weak" if self.weak_typing else "strong"


def detect_features(module=trt) -> Features:
    major, minor = (int(x) for x in module.__version__.split(".")[:2])
    flags = module.NetworkDefinitionCreationFlag
    return Features(
        version=module.__version__, major=major, minor=minor,
        explicit_batch_flag=major < 10 and hasattr(flags, "EXPLICIT_BATCH"),
        weak_typing=hasattr(module.BuilderFlag, "FP16") and hasattr(module.ILayer, "set_output_type"),
        strong_typing=hasattr(flags, "STRONGLY_TYPED"),
        native_instancenorm=hasattr(module, "OnnxParserFlag") and hasattr(module.OnnxParserFlag, "NATIVE_INSTANCENORM"),
        torch_dtypes={getattr(module.DataType, name): dtype for name, dtype in _TORCH_DTYPES
                      if hasattr(module.DataType, name)})


FEATURES = detect_features()


def require_supported() -> None:
    if not FEATURES.supported:
        raise RuntimeError(f"TensorRT {FEATURES.version} is installed; this project supports 8.6, 10.x and 11.x")


def tensorrt_version() -> str:
    return FEATURES.version


def gpu_name(device: torch.device | str | None = None) -> str:
    """The GPU an engine is built for (TensorRT engines do not move between GPU models)."""
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU and torch sees none")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def log_verbose() -> None:
    """TensorRT's own build log in full (layer precisions, tactics)."""
    LOGGER.min_severity = trt.Logger.VERBOSE


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def network_flags(strongly_typed: bool) -> int:
    flags = 0
    if FEATURES.explicit_batch_flag:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if strongly_typed:
        if not FEATURES.strong_typing:
            raise RuntimeError(f"TensorRT {FEATURES.version} has no strongly typed networks; use --typing weak")
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def parse_onnx(builder, onnx_path: Path, strongly_typed: bool = False):
    """The network and its parser, which owns weights the network refers to: keep both alive
    until the build has finished."""
    network = builder.create_network(network_flags(strongly_typed))
    parser = trt.OnnxParser(network, LOGGER)
    if FEATURES.native_instancenorm:
        parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    # parse_from_file (not parse(bytes)) so the parser finds external data beside the .onnx
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}:\n  {errors}")
    return network, parser


def static_profile(builder, network, input_shapes: dict[str, tuple[int, ...]]):
    """Checks every network input against the spec's shape (a mismatch is an error, not a silently
    different engine). The exported graphs are static, so this normally returns None; an input
    left dynamic gets min = opt = max = the spec's shape."""
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(input_shapes):
        raise ValueError(f"network inputs {names} != spec inputs {sorted(input_shapes)}")
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape, wanted = tuple(tensor.shape), tuple(input_shapes[tensor.name])
        if len(shape) != len(wanted) or any(s not in (-1, w) for s, w in zip(shape, wanted)):
            raise ValueError(f"input {tensor.name}: ONNX shape {shape} does not fit the spec's {wanted}")
        if -1 in shape:
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(tensor.name, wanted, wanted, wanted)
    return profile


def _layers(network):
    return [network.get_layer(i) for i in range(network.num_layers)]


def _inputs(layer) -> list:
    return [t for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None]


def _outputs(layer) -> list:
    return [layer.get_output(k) for k in range(layer.num_outputs)]


def fp32_layers(network, input_names: tuple[str, ...], layer_types: tuple[str, ...] = ()) -> list:
    """The float layers of a weakly typed fp16 network that must compute in fp32:
    * every layer computed from `input_names` and constants alone (the timestep's sinusoidal
      embedding and time MLPs). "Constant" is propagated: the parser puts a Shuffle (reshape)
      between a Gemm's bias constant and its Add, and that Shuffle's output is as constant as its
      input. Layers are in topological order, so one pass suffices;
    * every layer whose type is named in `layer_types` (e.g. "NORMALIZATION")."""
    derived = {network.get_input(i).name for i in range(network.num_inputs)} & set(input_names)
    constants: set = set()
    wanted_types = {getattr(trt.LayerType, name) for name in layer_types}
    float_types = (trt.DataType.FLOAT, trt.DataType.HALF)
    pinned = []
    for layer in _layers(network):
        inputs, outputs = _inputs(layer), _outputs(layer)
        names = {t.name for t in inputs}
        # a Constant layer (no inputs), one computed from constants alone, or a Shape layer (the
        # shapes are static: its result is fixed when the engine is built)
        if names <= constants or layer.type == trt.LayerType.SHAPE:
            constants.update(t.name for t in outputs)
            continue
        from_inputs = bool(names & derived) and names <= derived | constants
        if from_inputs:
            derived.update(t.name for t in outputs)
        # float results only (a Cast from the int timestep included); integer layers have no precision to pin
        if (from_inputs or layer.type in wanted_types) and outputs and all(t.dtype in float_types for t in outputs):
            pinned.append(layer)
    return pinned


def keep_fp32(network, input_names: tuple[str, ...], layer_types: tuple[str, ...] = ()) -> int:
    """Pins `fp32_layers` to fp32 (precision and output types). Returns how many were pinned."""
    layers = fp32_layers(network, input_names, layer_types)
    for layer in layers:
        layer.precision = trt.DataType.FLOAT
        for k in range(layer.num_outputs):
            layer.set_output_type(k, trt.DataType.FLOAT)
    return len(layers)


def load_timing_cache(config, path: Path | None):
    """The shared timing cache: kernel timings measured by earlier builds are not measured again."""
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"[build] timing cache {path} is from another GPU or TensorRT version; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


@dataclass(frozen=True)
class BuildOptions:
    precision: str  # fp16 | fp32: what the engine computes in (strong typing: what the ONNX file holds)
    typing: str  # weak | strong
    optimization_level: int
    input_shapes: dict
    fp32_from: tuple = ()  # weak fp16: inputs whose own computations stay fp32
    fp32_layer_types: tuple = ()  # weak fp16: layer types kept fp32 (e.g. NORMALIZATION)


def configure(builder, network, options: BuildOptions):
    """The builder config for `options` on this TensorRT; prints what it pinned."""
    if options.precision not in ("fp16", "fp32") or options.typing not in TYPINGS:
        raise ValueError(f"precision must be fp16 or fp32 and typing weak or strong, got {options}")
    if options.typing == "weak" and not FEATURES.weak_typing:
        raise RuntimeError(f"TensorRT {FEATURES.version} builds only strongly typed networks: export with "
                           "`python3 export_onnx.py --typing strong` and build with --typing strong")
    config = builder.create_builder_config()
    config.builder_optimization_level = options.optimization_level
    profile = static_profile(builder, network, options.input_shapes)
    if profile is not None:
        config.add_optimization_profile(profile)
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 rounds to 10 mantissa bits like fp16
    elif options.typing == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = keep_fp32(network, options.fp32_from, options.fp32_layer_types)
        if pinned:
            kept = ", ".join([f"computed from {'/'.join(options.fp32_from)} alone"] * bool(options.fp32_from)
                             + list(options.fp32_layer_types))
            print(f"[build] {pinned} layers pinned to fp32 ({kept})")
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    # strong fp16: the types, fp32 islands included, are the ONNX file's; nothing to set
    return config


def build_engine(onnx_path: Path, plan_path: Path, options: BuildOptions, timing_cache: Path | None = None) -> float:
    """Builds `plan_path` from `onnx_path`; returns the build's seconds."""
    require_supported()
    start = time.perf_counter()
    builder = trt.Builder(LOGGER)
    network, parser = parse_onnx(builder, onnx_path, strongly_typed=options.typing == "strong")
    config = configure(builder, network, options)
    load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    del parser  # held until here on purpose (see parse_onnx)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path} from {onnx_path} (see the log above)")
    partial = plan_path.with_name(plan_path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(serialized)
    partial.replace(plan_path)  # never leave a truncated engine under the real name
    if timing_cache:
        with open(timing_cache, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

class Engine:
    """A deserialized engine with one execution context and one torch buffer per I/O tensor.

    Inputs are written into `tensors[name]` (in place), `execute(stream)` runs the engine on a CUDA
    stream, outputs are read from `tensors[name]`. The buffer addresses are fixed once allocated,
    which is what lets a CUDA graph replay the engine.
    """

    def __init__(self, plan_path: Path):
        self.plan_path = Path(plan_path)
        self.runtime = trt.Runtime(LOGGER)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"cannot deserialize {plan_path}: built by another TensorRT version or for "
                               "another GPU? Rebuild it with build_engines.py")
        self.context = self.engine.create_execution_context()
        self.tensors: dict[str, torch.Tensor] = {}
        self.graph = None

    @property
    def names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def is_input(self, name: str) -> bool:
        return self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT

    def torch_dtype(self, name: str) -> torch.dtype:
        dtype = self.engine.get_tensor_dtype(name)
        if dtype not in FEATURES.torch_dtypes:
            raise TypeError(f"{self.plan_path.name}: tensor {name} has TensorRT type {dtype}, which has no torch buffer here")
        return FEATURES.torch_dtypes[dtype]

    def signature(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
        """{name: (shape, torch dtype, is_input)} as the engine declares them."""
        return {n: (tuple(self.engine.get_tensor_shape(n)), self.torch_dtype(n), self.is_input(n)) for n in self.names}

    def allocate(self, shapes: dict[str, tuple[int, ...]] | None = None, device: str = "cuda") -> None:
        """One buffer per I/O tensor, its address handed to the context. `shapes` fills in dynamic
        dimensions (static engines need none)."""
        for name in self.names:
            shape = tuple(self.engine.get_tensor_shape(name))
            if -1 in shape:
                if not shapes or name not in shapes:
                    raise ValueError(f"{self.plan_path.name}: tensor {name} has a dynamic shape {shape}; pass it")
                shape = tuple(shapes[name])
                if self.is_input(name) and not self.context.set_input_shape(name, shape):
                    raise ValueError(f"{self.plan_path.name}: shape {shape} is outside {name}'s profile")
            self.tensors[name] = torch.empty(shape, dtype=self.torch_dtype(name), device=device)
            self.context.set_tensor_address(name, self.tensors[name].data_ptr())
        self.graph = None

    def execute(self, stream: int) -> None:
        """Enqueue one inference on `stream` (a cudaStream_t handle, e.g. torch_stream.cuda_stream)."""
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.plan_path.name}")

    def infer(self, feed: dict[str, torch.Tensor], stream) -> dict[str, torch.Tensor]:
        """Copy `feed` into the input buffers, run, return the output buffers (valid until the next run)."""
        with torch.cuda.stream(stream):
            for name, value in feed.items():
                self.tensors[name].copy_(value)
            self.execute(stream.cuda_stream)
        return {n: t for n, t in self.tensors.items() if not self.is_input(n)}

    def capture_graph(self, stream) -> None:
        """Record one inference as a CUDA graph, replayed by `replay()`. Runs the engine once first:
        TensorRT does deferred setup on its first enqueue, which must not land in the graph."""
        with torch.cuda.stream(stream):
            self.execute(stream.cuda_stream)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.execute(stream.cuda_stream)
        self.graph = graph

    def replay(self) -> None:
        if self.graph is None:
            raise RuntimeError("capture_graph() first")
        self.graph.replay()
