"""TensorRT 10 helpers: build an engine from an ONNX file, and run one with torch buffers.

This module knows nothing about the networks: it takes file paths, tensor names and shapes. It
needs the `tensorrt` package (TensorRT 10.x; 11.x removed the FP16 builder flag it uses) and a
CUDA GPU. NONE OF IT HAS EVER RUN AGAINST A REAL TENSORRT: the environment it was written in
had no GPU and no TensorRT. docs/tensorrt.md lists each function and what to check first.
"""
import time
from pathlib import Path

import tensorrt as trt
import torch

LOGGER = trt.Logger(trt.Logger.WARNING)

TORCH_DTYPES = {
    trt.DataType.FLOAT: torch.float32,
    trt.DataType.HALF: torch.float16,
    trt.DataType.BF16: torch.bfloat16,
    trt.DataType.INT64: torch.int64,
    trt.DataType.INT32: torch.int32,
    trt.DataType.INT8: torch.int8,
    trt.DataType.UINT8: torch.uint8,
    trt.DataType.BOOL: torch.bool,
}
_FLOAT_TYPES = (trt.DataType.FLOAT, trt.DataType.HALF)


def tensorrt_version() -> str:
    return trt.__version__


def gpu_name(device: torch.device | str | None = None) -> str:
    """The GPU an engine is built for (TensorRT engines do not move between GPU models)."""
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU and torch sees none")
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


def log_verbose() -> None:
    """TensorRT's own build log in full (layer precisions, tactics)."""
    LOGGER.min_severity = trt.Logger.VERBOSE


def require_tensorrt_10() -> None:
    if not trt.__version__.startswith("10."):
        raise RuntimeError(f"TensorRT {trt.__version__} is installed; these engines are built with the TensorRT 10 "
                           "builder API (weakly typed FP16, removed in 11.x): pip install 'tensorrt>=10,<11'")


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------

def parse_onnx(builder: trt.Builder, onnx_path: Path) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The network and its parser, which owns weights the network refers to: keep both alive
    until the build has finished."""
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, LOGGER)
    # parse_from_file (not parse(bytes)) so the parser finds external data beside the .onnx
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}:\n  {errors}")
    return network, parser


def static_profile(builder: trt.Builder, network: trt.INetworkDefinition,
                   input_shapes: dict[str, tuple[int, ...]]) -> trt.IOptimizationProfile | None:
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


def keep_fp32(network: trt.INetworkDefinition, input_names: tuple[str, ...]) -> int:
    """Pins to fp32 every float layer computed from `input_names` and constants alone (layers are
    in topological order). Returns how many layers were pinned."""
    derived = {network.get_input(i).name for i in range(network.num_inputs)} & set(input_names)
    constants: set[str] = set()
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(k) for k in range(layer.num_outputs)]
        if layer.type == trt.LayerType.CONSTANT:
            constants.update(t.name for t in outputs)
            continue
        inputs = [t for t in (layer.get_input(j) for j in range(layer.num_inputs)) if t is not None]
        names = {t.name for t in inputs}
        if not names & derived or not names <= derived | constants:
            continue
        derived.update(t.name for t in outputs)
        if all(t.dtype in _FLOAT_TYPES for t in inputs + outputs):
            layer.precision = trt.DataType.FLOAT
            for k in range(layer.num_outputs):
                layer.set_output_type(k, trt.DataType.FLOAT)
            pinned += 1
    return pinned


def load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    """The shared timing cache: kernel timings measured by earlier builds are not measured again."""
    data = Path(path).read_bytes() if path and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        print(f"[build] timing cache {path} is from another GPU or TensorRT version; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(onnx_path: Path, plan_path: Path, precision: str, optimization_level: int,
                 input_shapes: dict[str, tuple[int, ...]], fp32_from: tuple[str, ...] = (),
                 timing_cache: Path | None = None) -> float:
    """Builds `plan_path` from `onnx_path` with a static profile; returns the build's seconds."""
    require_tensorrt_10()
    start = time.perf_counter()
    builder = trt.Builder(LOGGER)
    network, parser = parse_onnx(builder, onnx_path)
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    profile = static_profile(builder, network, input_shapes)
    if profile is not None:
        config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = keep_fp32(network, fp32_from) if fp32_from else 0
        if pinned:
            print(f"[build] {pinned} layers computed from {', '.join(fp32_from)} alone pinned to fp32")
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    elif precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls round to 10 bits like fp16
    else:
        raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
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
        self.graph: torch.cuda.CUDAGraph | None = None

    @property
    def names(self) -> list[str]:
        return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def is_input(self, name: str) -> bool:
        return self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT

    def signature(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, bool]]:
        """{name: (shape, torch dtype, is_input)} as the engine declares them."""
        return {n: (tuple(self.engine.get_tensor_shape(n)), TORCH_DTYPES[self.engine.get_tensor_dtype(n)],
                    self.is_input(n)) for n in self.names}

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
            dtype = TORCH_DTYPES[self.engine.get_tensor_dtype(name)]
            self.tensors[name] = torch.empty(shape, dtype=dtype, device=device)
            self.context.set_tensor_address(name, self.tensors[name].data_ptr())
        self.graph = None

    def execute(self, stream: int) -> None:
        """Enqueue one inference on `stream` (a cudaStream_t handle, e.g. torch_stream.cuda_stream)."""
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.plan_path.name}")

    def infer(self, feed: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Copy `feed` into the input buffers, run, return the output buffers (valid until the next run)."""
        with torch.cuda.stream(stream):
            for name, value in feed.items():
                self.tensors[name].copy_(value)
            self.execute(stream.cuda_stream)
        return {n: t for n, t in self.tensors.items() if not self.is_input(n)}

    def capture_graph(self, stream: torch.cuda.Stream) -> None:
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
