"""A recording fake of the `tensorrt` module for one TensorRT version, for testing trt_utils where
TensorRT cannot be installed.

Names come from tests/data/tensorrt_api/<version>.json, listed from that version's real Python
bindings (tools/tensorrt_api.py). Only names that version has can be reached: any other raises
AttributeError naming the version, so code that touches a name unguarded fails its test under
each version that lacks it. Every name reached is recorded in `api.used`.

The behaviour is just enough for trt_utils: the ONNX parser turns an .onnx file into layers the
way TensorRT's parser lays them out (notably a Gemm's bias as Constant -> Shuffle -> ElementWise
add), the builder config records its flags, and an engine exposes named I/O tensors.
"""
from __future__ import annotations

import importlib.machinery
import json
import types
from dataclasses import dataclass
from pathlib import Path

import onnx

API_DIR = Path(__file__).parent / "data" / "tensorrt_api"
VERSIONS = tuple(sorted((p.stem for p in API_DIR.glob("*.json")),
                        key=lambda v: tuple(int(x) for x in v.split("."))))


class Api:
    def __init__(self, version: str):
        manifest = json.loads((API_DIR / f"{version}.json").read_text())
        self.version = manifest["tensorrt_version"]
        self.module = set(manifest["module"])
        self.classes = {k: set(v) for k, v in manifest["classes"].items()}
        self.used: set = set()

    def check(self, owner: str, name: str) -> None:
        known = self.module if owner == "tensorrt" else self.classes.get(owner, set())
        if name not in known:
            raise AttributeError(f"TensorRT {self.version}: {owner} has no attribute {name!r}")
        self.used.add(name if owner == "tensorrt" else f"{owner}.{name}")


class Gated:
    """Public attributes are reachable only where the version's class has them."""
    _kind = ""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_api").check(object.__getattribute__(self, "_kind"), name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            self._api.check(self._kind, name)
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class EnumValue:
    kind: str
    name: str
    value: int

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"{self.kind}.{self.name}"


class EnumType(Gated):
    def __init__(self, api: Api, kind: str):
        self._api, self._kind = api, kind
        members = sorted(m for m in api.classes[kind] if m.isupper())
        for i, name in enumerate(members):
            object.__setattr__(self, name, EnumValue(kind, name, i))


class ClassRef(Gated):
    """A TensorRT class as the module exposes it: callable where trt_utils constructs it, and with
    its members for hasattr() (their values do not matter to the code under test)."""

    def __init__(self, api: Api, kind: str, factory=None, attributes: dict | None = None):
        self._api, self._kind, self._factory = api, kind, factory
        for name in api.classes[kind]:
            object.__setattr__(self, name, (attributes or {}).get(name, f"<{kind}.{name}>"))

    def __call__(self, *args):
        return self._factory(*args)


# -- networks, as the ONNX parser builds them -------------------------------------------------------

class Tensor(Gated):
    _kind = "ITensor"

    def __init__(self, api, name, dtype, shape=()):
        self._api = api
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", tuple(shape))


class Layer(Gated):
    _kind = "ILayer"

    def __init__(self, api, layer_type, inputs, outputs, source, node):
        # _source: this layer's label; _node: the ONNX node it comes from (a Gemm makes several)
        self._api, self._inputs, self._outputs, self._source, self._node = api, inputs, outputs, source, node
        object.__setattr__(self, "type", layer_type)
        object.__setattr__(self, "num_inputs", len(inputs))
        object.__setattr__(self, "num_outputs", len(outputs))
        object.__setattr__(self, "precision", None)
        self._output_types: dict = {}

    def get_input(self, j):
        return self._inputs[j]

    def get_output(self, k):
        return self._outputs[k]

    def set_output_type(self, k, dtype):
        self._output_types[k] = dtype

    @property
    def _pinned(self) -> bool:
        """Precision and every output type set to fp32, as a weakly typed fp16 build needs."""
        fp32 = lambda t: t is not None and t.name == "FLOAT"  # noqa: E731
        return fp32(object.__getattribute__(self, "precision")) and all(
            fp32(self._output_types.get(k)) for k in range(len(self._outputs)))


# ONNX op -> the TensorRT layers the parser makes of it (a Gemm with bias is special-cased below)
ONNX_LAYERS = {
    "Add": "ELEMENTWISE", "Sub": "ELEMENTWISE", "Mul": "ELEMENTWISE", "Div": "ELEMENTWISE", "Pow": "ELEMENTWISE",
    "Cos": "UNARY", "Sin": "UNARY", "Exp": "UNARY", "Sqrt": "UNARY", "Erf": "UNARY", "Floor": "UNARY", "Neg": "UNARY",
    "Sigmoid": "ACTIVATION", "Relu": "ACTIVATION", "Clip": "ACTIVATION", "Tanh": "ACTIVATION",
    "MatMul": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION", "Softmax": "SOFTMAX", "Concat": "CONCATENATION",
    "Cast": "CAST", "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Unsqueeze": "SHUFFLE", "Squeeze": "SHUFFLE",
    "Flatten": "SHUFFLE", "InstanceNormalization": "NORMALIZATION", "LayerNormalization": "NORMALIZATION",
    "Resize": "RESIZE", "Slice": "SLICE", "Gather": "GATHER", "Split": "SLICE", "ReduceMean": "REDUCE",
    "Expand": "SLICE", "Identity": "IDENTITY", "Where": "SELECT", "Trilu": "SELECT", "Shape": "SHAPE",
}
# ops whose inputs after the first are parameters (shapes, axes, scales, bounds): the parser reads
# constant ones into the layer's settings; a computed one (a shape from a Shape layer, as torch 2.0
# exports GroupNorm) stays a layer input
PARAMETER_INPUTS = {"Reshape", "Unsqueeze", "Squeeze", "Slice", "Expand", "Resize", "Split", "Clip", "ReduceMean"}
_ONNX_TO_TRT_TYPE = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF",
                     onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT32",  # parser narrows int64
                     onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL"}


class Network(Gated):
    _kind = "INetworkDefinition"

    def __init__(self, api, flags):
        self._api, self._flags, self._inputs, self._layers, self._parser_flags = api, flags, [], [], set()

    @property
    def num_inputs(self):
        return len(self._inputs)

    @property
    def num_layers(self):
        return len(self._layers)

    def get_input(self, i):
        return self._inputs[i]

    def get_layer(self, i):
        return self._layers[i]

    def _dtype(self, onnx_type):
        return getattr(self._module.DataType, _ONNX_TO_TRT_TYPE[onnx_type])

    def _add(self, layer_type, inputs, outputs, source, node=None):
        layer_type = getattr(self._module.LayerType, layer_type)
        self._layers.append(Layer(self._api, layer_type, inputs, outputs, source, node if node is not None else source))

    def _parse(self, path: Path) -> None:
        """The layers TensorRT's ONNX parser makes of `path`, in node order (topological)."""
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        g = model.graph
        types_ = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
        types_.update({t.name: t.data_type for t in g.initializer})
        tensors, constant_outputs = {}, {t.name for t in g.initializer}

        def tensor(name):
            if name not in tensors:  # an initializer: a Constant layer of its own
                tensors[name] = Tensor(self._api, name, self._dtype(types_[name]))
                self._add("CONSTANT", [], [tensors[name]], name)
            return tensors[name]

        for v in g.input:
            tensors[v.name] = Tensor(self._api, v.name, self._dtype(v.type.tensor_type.elem_type),
                                     [d.dim_value for d in v.type.tensor_type.shape.dim])
            self._inputs.append(tensors[v.name])
        for node in g.node:
            outputs = [Tensor(self._api, o, self._dtype(types_.get(o, onnx.TensorProto.FLOAT))) for o in node.output]
            if node.op_type == "Constant":
                self._add("CONSTANT", [], outputs, node.name)
            elif node.op_type == "Gemm":  # MatMul, then the bias reshaped for broadcasting, then the add
                product = Tensor(self._api, node.name + "/product", outputs[0].dtype)
                self._add("MATRIX_MULTIPLY", [tensor(node.input[0]), tensor(node.input[1])], [product], node.name + "/matmul",
                          node.name)
                if len(node.input) > 2:
                    bias = Tensor(self._api, node.name + "/bias", outputs[0].dtype)
                    self._add("SHUFFLE", [tensor(node.input[2])], [bias], node.name + "/bias_reshape", node.name)
                    self._add("ELEMENTWISE", [product, bias], outputs, node.name + "/bias_add", node.name)
                else:
                    outputs = [product]
            else:
                if node.op_type not in ONNX_LAYERS:
                    raise NotImplementedError(f"fake parser: no layer mapping for ONNX op {node.op_type}")
                inputs = [i for i in node.input if i]
                if node.op_type in PARAMETER_INPUTS:
                    inputs = inputs[:1] + [i for i in inputs[1:] if i in tensors and i not in constant_outputs]
                self._add(ONNX_LAYERS[node.op_type], [tensor(i) for i in inputs], outputs, node.name)
            if node.op_type == "Constant":
                constant_outputs.update(node.output)
            tensors.update((t.name, t) for t in outputs)


# -- builder, config, parser, runtime -----------------------------------------------------------

class Config(Gated):
    _kind = "IBuilderConfig"

    def __init__(self, api):
        self._api, self._flags, self._cache = api, set(), None
        object.__setattr__(self, "builder_optimization_level", 3)

    def set_flag(self, flag):
        self._flags.add(flag.name)

    def clear_flag(self, flag):
        self._flags.discard(flag.name)

    def add_optimization_profile(self, profile):
        self._profile = profile

    def create_timing_cache(self, data):
        return TimingCache(self._api, data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self._cache = cache
        return True

    def get_timing_cache(self):
        return self._cache


class TimingCache(Gated):
    _kind = "ITimingCache"

    def __init__(self, api, data):
        self._api, self._data = api, bytes(data)

    def serialize(self):
        return self._data + b"+timings"


class Builder(Gated):
    _kind = "Builder"

    def __init__(self, api, module, logger):
        self._api, self._module = api, module
        module.builders.append(self)

    def create_network(self, flags):
        self._network = Network(self._api, flags)
        self._network._module = self._module
        return self._network

    def create_builder_config(self):
        self._config = Config(self._api)
        return self._config

    def create_optimization_profile(self):
        raise AssertionError("the exported graphs are static: no profile expected")

    def build_serialized_network(self, network, config):
        return b"plan:" + network._file.encode()


class Parser(Gated):
    _kind = "OnnxParser"

    def __init__(self, api, network, logger):
        self._api, self._network, self._flags = api, network, set()

    def set_flag(self, flag):
        self._flags.add(flag.name)
        self._network._parser_flags = self._flags

    def parse_from_file(self, path):
        self._network._file = Path(path).name
        self._network._parse(Path(path))
        return True


class CudaEngine(Gated):
    """Named I/O tensors: {name: (shape, DataType member name, is_input)}."""
    _kind = "ICudaEngine"

    def __init__(self, api, module, io: dict):
        self._api, self._module, self._io = api, module, io
        object.__setattr__(self, "num_io_tensors", len(io))

    def get_tensor_name(self, i):
        return list(self._io)[i]

    def get_tensor_mode(self, name):
        return self._module.TensorIOMode.INPUT if self._io[name][2] else self._module.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name):
        return getattr(self._module.DataType, self._io[name][1])

    def get_tensor_shape(self, name):
        return self._io[name][0]

    def create_execution_context(self):
        return Context(self._api)


class Context(Gated):
    _kind = "IExecutionContext"

    def __init__(self, api):
        self._api, self._addresses, self._shapes, self._launches, self._succeed = api, {}, {}, [], True

    def set_tensor_address(self, name, address):
        self._addresses[name] = address

    def set_input_shape(self, name, shape):
        self._shapes[name] = tuple(shape)
        return True

    def execute_async_v3(self, stream):
        self._launches.append(stream)
        return self._succeed


class Runtime(Gated):
    _kind = "Runtime"

    def __init__(self, api, module, logger):
        self._api, self._module = api, module

    def deserialize_cuda_engine(self, data):
        io = self._module.engine_io.get(bytes(data))
        return None if io is None else CudaEngine(self._api, self._module, io)


class Logger(Gated):
    _kind = "Logger"

    def __init__(self, api, severity):
        self._api = api
        object.__setattr__(self, "min_severity", severity)


# -- the module ---------------------------------------------------------------------------------

ENUMS = ("BuilderFlag", "DataType", "LayerType", "NetworkDefinitionCreationFlag", "OnnxParserFlag", "TensorIOMode")


class FakeTensorRT(types.ModuleType):
    def __init__(self, version: str):
        super().__init__("tensorrt")
        object.__setattr__(self, "__spec__", importlib.machinery.ModuleSpec("tensorrt", None))  # for find_spec
        api = Api(version)
        object.__setattr__(self, "_api", api)
        object.__setattr__(self, "builders", [])
        object.__setattr__(self, "engine_io", {})  # plan bytes -> the I/O table its engine has
        objects = {"__version__": api.version}
        for kind in ENUMS:
            if kind in api.module:
                objects[kind] = EnumType(api, kind)
        severity = EnumType(api, "Logger.Severity")
        objects["Logger"] = ClassRef(api, "Logger", lambda s: Logger(api, s),
                                     {n: getattr(severity, n) for n in ("WARNING", "VERBOSE", "ERROR", "INFO")})
        objects["Builder"] = ClassRef(api, "Builder", lambda logger: Builder(api, self, logger))
        objects["OnnxParser"] = ClassRef(api, "OnnxParser", lambda network, logger: Parser(api, network, logger))
        objects["Runtime"] = ClassRef(api, "Runtime", lambda logger: Runtime(api, self, logger))
        objects["ILayer"] = ClassRef(api, "ILayer")
        object.__setattr__(self, "_objects", objects)

    def __getattr__(self, name):
        objects = object.__getattribute__(self, "_objects")
        if name != "__version__":
            object.__getattribute__(self, "_api").check("tensorrt", name)
        if name not in objects:
            raise AttributeError(f"fake tensorrt: {name} exists in TensorRT but is not faked")
        return objects[name]

    @property
    def api(self) -> Api:
        return object.__getattribute__(self, "_api")
