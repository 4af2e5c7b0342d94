"""trt_utils against every supported TensorRT's API, without TensorRT.

Each test imports trt_utils over a recording fake of one version's `tensorrt` module
(tests/fake_tensorrt.py), whose names come from that version's real bindings: a name the version
lacks raises AttributeError, so unguarded use fails here. The builder's network is what the ONNX
parser makes of our exported tiny graphs. What this cannot show is what TensorRT itself does
with them (kernel choice, real precision, speed): see docs/tensorrt.md.
"""
from __future__ import annotations

import ast
import importlib
import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest
import torch

from fake_tensorrt import VERSIONS, FakeTensorRT
from sdcanny import compat
from sdcanny.checkpoint import load_networks
from sdcanny.config import TINY
from sdcanny.engine_specs import engine_spec
from sdcanny.onnx_export import export_graph

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 64)


def export_graphs(tiny_checkpoint, engine_dir: Path, typing: str) -> dict:
    nets = load_networks(tiny_checkpoint, TINY)
    specs = {name: engine_spec(name, TINY, *SIZE, typing=typing) for name in ("clip", "union", "vae")}
    for spec in specs.values():
        if not spec.onnx_path(engine_dir).is_file():
            export_graph(spec, nets, TINY, engine_dir, tiny_checkpoint, check_parity=False)
    return specs


@pytest.fixture(scope="module")
def graphs(tiny_checkpoint, tmp_path_factory):
    """The tiny graphs as export_onnx.py writes them for weak typing (fp32), and the fp32 ones
    strong typing shares (an fp32 engine is built from the fp32 graph under either typing)."""
    engine_dir = tmp_path_factory.mktemp("graphs")
    specs = export_graphs(tiny_checkpoint, engine_dir, "weak")
    return engine_dir, {**{("weak", n): s for n, s in specs.items()},
                        **{("strong", n): s for n, s in specs.items() if s.precision == "fp32"}}


@pytest.fixture(scope="module")
def strong_graphs(graphs, tiny_checkpoint):
    """Adds the strongly typed fp16 union and vae graphs (tracing them needs fp16 convolutions)."""
    if not (compat.cpu_runs_fp16_convolutions() or torch.cuda.is_available()):
        pytest.skip(f"torch {torch.__version__} cannot trace fp16 graphs on the CPU (TensorRT 8.6, the docker's, "
                    "needs none)")
    engine_dir, specs = graphs
    strong = export_graphs(tiny_checkpoint, engine_dir, "strong")
    return engine_dir, {**specs, **{("strong", n): s for n, s in strong.items()}}


@pytest.fixture(params=VERSIONS)
def trt(request, monkeypatch):
    """(fake tensorrt module, trt_utils imported over it) for one TensorRT version."""
    fake = FakeTensorRT(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.delitem(sys.modules, "trt_utils", raising=False)
    yield fake, importlib.import_module("trt_utils")
    sys.modules.pop("trt_utils", None)


def major(fake) -> int:
    return int(fake.__version__.split(".")[0])


# -- what each version offers ----------------------------------------------------------------------

def test_features_follow_each_versions_api(trt):
    fake, trt_utils = trt
    f = trt_utils.FEATURES
    m = major(fake)
    # known from the release notes: 8.6 needs explicit batch and has no strong typing, bf16 or int64;
    # 10 has both typings; 11 dropped weak typing (BuilderFlag.FP16, per-layer precision)
    assert f.supported
    assert f.explicit_batch_flag == (m == 8)
    assert f.weak_typing == (m < 11) and f.strong_typing == (m >= 10)
    assert f.default_typing() == ("strong" if m >= 11 else "weak")
    assert f.native_instancenorm
    dtype_names = {d.name for d in f.torch_dtypes}
    assert {"FLOAT", "HALF", "INT32", "INT8", "UINT8", "BOOL"} <= dtype_names
    assert ("BF16" in dtype_names) == ("INT64" in dtype_names) == (m >= 10)


# -- keep_fp32 on the network the parser builds --------------------------------------------------

def timestep_only_nodes(model: onnx.ModelProto, float_results: bool = False) -> set:
    """ONNX nodes computed from the `timestep` input and constants alone (with `float_results`,
    only those whose outputs are float): the expectation, derived from the graph itself rather
    than from TensorRT layers."""
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    constants = {t.name for t in model.graph.initializer}
    derived, nodes = {"timestep"}, set()
    for node in model.graph.node:
        inputs = {i for i in node.input if i}
        if node.op_type == "Constant" or inputs <= constants:
            constants.update(node.output)
        elif inputs & derived and inputs <= derived | constants:
            derived.update(node.output)
            if not float_results or all(types.get(o) == onnx.TensorProto.FLOAT for o in node.output):
                nodes.add(node.name)
    return nodes


def parsed_network(fake, trt_utils, path: Path, strongly_typed=False):
    builder = fake.Builder(trt_utils.LOGGER)
    network, _ = trt_utils.parse_onnx(builder, path, strongly_typed)
    return network


@pytest.fixture
def weak_union(trt, graphs):
    """(fake, trt_utils, the fp32 union graph) where the version has per-layer precision."""
    fake, trt_utils = trt
    if not trt_utils.FEATURES.weak_typing:
        pytest.skip(f"TensorRT {fake.__version__} has no per-layer precision (strong typing only)")
    engine_dir, specs = graphs
    return fake, trt_utils, specs["weak", "union"].onnx_path(engine_dir)


def test_keep_fp32_pins_the_whole_timestep_path_including_gemm_biases(weak_union):
    fake, trt_utils, path = weak_union
    network = parsed_network(fake, trt_utils, path)
    expected = timestep_only_nodes(onnx.load(str(path)), float_results=True)
    gemms = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Gemm" and n.name in expected]
    assert len(gemms) >= 4  # both time MLPs (2 Gemms each) at the least; the ResBlocks' projections too
    pinned = trt_utils.keep_fp32(network, ("timestep",))
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    got = {layer._node for layer in layers if layer._pinned}
    assert got == expected
    # the parser's bias path: Constant -> Shuffle -> ElementWise; the add must be pinned (it was not,
    # when only Constant layers counted as constants), the constant and its reshape are folded
    for gemm in gemms:
        by_source = {layer._source: layer for layer in layers}
        assert by_source[gemm + "/bias_add"]._pinned and not by_source[gemm + "/bias_reshape"]._pinned
    assert pinned == sum(layer._pinned for layer in layers)
    reads_latent = [layer for layer in layers if any(layer.get_input(j).name == "latent" for j in range(layer.num_inputs))]
    assert reads_latent and not any(layer._pinned for layer in reads_latent)


def test_normalisation_layers_are_pinned_when_asked(weak_union):
    fake, trt_utils, path = weak_union
    norms = sum(n.op_type in ("InstanceNormalization", "LayerNormalization") for n in onnx.load(str(path)).graph.node)
    assert norms > 20
    network = parsed_network(fake, trt_utils, path)
    with_norms = trt_utils.keep_fp32(network, ("timestep",), ("NORMALIZATION",))
    without = trt_utils.fp32_layers(parsed_network(fake, trt_utils, path), ("timestep",))
    assert with_norms == len(without) + norms


# -- the build per version and typing ----------------------------------------------------------------

def build(trt_utils, path, tmp_path, precision, typing):
    options = trt_utils.BuildOptions(precision=precision, typing=typing, optimization_level=5,
                                     input_shapes={i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
                                                   for i in onnx.load(str(path), load_external_data=False).graph.input},
                                     fp32_from=("timestep",) if typing == "weak" and precision == "fp16" else (),
                                     fp32_layer_types=("NORMALIZATION",) if typing == "weak" else ())
    return trt_utils.build_engine(path, tmp_path / "out.plan", options, tmp_path / "timing.bin")


@pytest.mark.parametrize("precision, typing", [("fp16", "weak"), ("fp32", "weak"), ("fp16", "strong"),
                                               ("fp32", "strong")])
def test_build_configuration_per_version(trt, request, tmp_path, precision, typing):
    fake, trt_utils = trt
    needs_fp16_graph = (precision, typing) == ("fp16", "strong")
    engine_dir, specs = request.getfixturevalue("strong_graphs" if needs_fp16_graph else "graphs")
    spec = engine_spec("union", TINY, *SIZE, precision, typing)
    path = spec.onnx_path(engine_dir)
    m = major(fake)
    if (typing == "weak" and m >= 11) or (typing == "strong" and m < 10):
        with pytest.raises(RuntimeError, match="strongly typed"):
            build(trt_utils, path, tmp_path, precision, typing)
        return
    build(trt_utils, path, tmp_path, precision, typing)
    builder = fake.builders[-1]
    network, config = builder._network, builder._config
    flags = fake.NetworkDefinitionCreationFlag
    expected_network_flags = (1 << int(flags.EXPLICIT_BATCH) if m == 8 else 0) | (
        1 << int(flags.STRONGLY_TYPED) if typing == "strong" else 0)
    assert network._flags == expected_network_flags
    assert network._parser_flags == {"NATIVE_INSTANCENORM"}
    assert config.builder_optimization_level == 5
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    if precision == "fp32":
        assert "FP16" not in config._flags and "TF32" not in config._flags
    elif typing == "weak":
        assert {"FP16", "PREFER_PRECISION_CONSTRAINTS"} <= config._flags
        assert sum(layer._pinned for layer in layers) > 20
    else:  # strong: nothing set on the config or the layers; the fp16 graph holds the types
        assert "FP16" not in config._flags and not any(layer._pinned for layer in layers)
        assert path.name.endswith(".fp16.onnx")
    assert (tmp_path / "out.plan").read_bytes() == b"plan:" + path.name.encode()
    assert (tmp_path / "timing.bin").read_bytes() == b"+timings"


def test_the_strong_graph_computes_in_fp16_around_fp32_islands(strong_graphs):
    """The typed graph TensorRT 10/11 build as is: convolutions and matrix products in fp16, every
    normalisation and the timestep's MLP in fp32, fp32 at the engine's inputs and outputs."""
    engine_dir, specs = strong_graphs
    model = onnx.shape_inference.infer_shapes(onnx.load(str(specs["strong", "union"].onnx_path(engine_dir))))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    convs = [n for n in g.node if n.op_type == "Conv"]
    norms = [n for n in g.node if n.op_type in ("InstanceNormalization", "LayerNormalization")]
    assert convs and all(types[n.input[1]] == f16 for n in convs)
    assert norms and all(types[n.input[0]] == f32 for n in norms)
    time_gemms = [n for n in g.node if n.op_type == "Gemm" and n.name in timestep_only_nodes(model)]
    assert time_gemms and all(types[n.input[1]] == f32 for n in time_gemms)
    assert all(types[i.name] in (f32, onnx.TensorProto.INT32) for i in g.input) and types["eps"] == f32


# -- the Engine class's buffers ----------------------------------------------------------------------

def test_engine_buffers_follow_the_engines_tensors(trt, tmp_path):
    fake, trt_utils = trt
    io = {"latent": ((2, 4, 8, 8), "FLOAT", True), "timestep": ((2,), "INT32", True),
          "eps": ((2, 4, 8, 8), "FLOAT", False), "image": ((-1, 8, 8, 3), "UINT8", False)}
    plan = tmp_path / "e.plan"
    plan.write_bytes(b"some plan")
    fake.engine_io[b"some plan"] = io
    engine = trt_utils.Engine(plan)
    assert engine.names == list(io)
    assert engine.signature()["timestep"] == ((2,), torch.int32, True)
    with pytest.raises(ValueError, match="dynamic shape"):
        engine.allocate(device="cpu")
    engine.allocate({"image": (1, 8, 8, 3)}, device="cpu")
    assert {n: (tuple(t.shape), t.dtype) for n, t in engine.tensors.items()} == {
        "latent": ((2, 4, 8, 8), torch.float32), "timestep": ((2,), torch.int32),
        "eps": ((2, 4, 8, 8), torch.float32), "image": ((1, 8, 8, 3), torch.uint8)}
    assert engine.context._addresses == {n: t.data_ptr() for n, t in engine.tensors.items()}
    engine.execute(7)
    assert engine.context._launches == [7]
    engine.context._succeed = False
    with pytest.raises(RuntimeError, match="failed to enqueue"):
        engine.execute(7)
    (tmp_path / "other.plan").write_bytes(b"unknown")
    with pytest.raises(RuntimeError, match="cannot deserialize"):
        trt_utils.Engine(tmp_path / "other.plan")


# -- every TensorRT name in the code is checked against every version ---------------------------

def tensorrt_names_in(path: Path) -> set:
    """`trt.X` and `trt.X.Y` as written in the source."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            names.add(node.attr)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "trt"):
            names.add(f"{node.value.attr}.{node.attr}")
    return names


def test_every_tensorrt_name_in_the_code_was_exercised_under_some_version(graphs, tmp_path, monkeypatch):
    """The fakes raise on names a version lacks; this makes sure no trt.X.Y in the source escapes
    them by never running: each one is reached under at least one supported version."""
    engine_dir, specs = graphs
    used = set()
    for version in VERSIONS:
        fake = FakeTensorRT(version)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.delitem(sys.modules, "trt_utils", raising=False)
        trt_utils = importlib.import_module("trt_utils")
        trt_utils.log_verbose()
        for precision, typing in (("fp16", "weak"), ("fp32", "weak"), ("fp32", "strong")):
            if trt_utils.FEATURES.weak_typing if typing == "weak" else trt_utils.FEATURES.strong_typing:
                out = tmp_path / version
                out.mkdir(exist_ok=True)
                build(trt_utils, engine_spec("union", TINY, *SIZE, precision, typing).onnx_path(engine_dir), out,
                      precision, typing)
        fake.engine_io[b"p"] = {"x": ((1,), "FLOAT", True)}
        (tmp_path / "p.plan").write_bytes(b"p")
        engine = trt_utils.Engine(tmp_path / "p.plan")
        engine.signature()
        engine.allocate(device="cpu")
        used |= fake.api.used
        sys.modules.pop("trt_utils", None)
    in_source = tensorrt_names_in(ROOT / "trt_utils.py")
    assert in_source and in_source <= used | {n.split(".")[0] for n in used}, sorted(in_source - used)


# -- build_engines.py end to end over the fake ------------------------------------------------------

def test_build_script_builds_records_and_skips_current_engines(trt, graphs, monkeypatch, capsys, tmp_path):
    """The script's loop over the three engines: the installed TensorRT picks the typing, each engine
    gets its .plan and build record, a second run finds them current; TensorRT 11 without the fp16
    graphs says which export to run."""
    fake, trt_utils = trt
    monkeypatch.setattr(trt_utils, "gpu_name", lambda device=None: "NVIDIA A10 (sm_86)")
    import build_engines
    engine_dir, _ = graphs
    argv = ["--config", "tiny", "--height", str(SIZE[0]), "--width", str(SIZE[1]), "--engine-dir", str(engine_dir)]
    if major(fake) >= 11:  # only the fp32 graphs: TensorRT 11 needs the fp16 ones
        bare = tmp_path / "fp32_graphs"
        bare.mkdir()
        for path in engine_dir.iterdir():
            if ".fp16." not in path.name and path.suffix in (".onnx", ".data", ".json"):
                shutil.copy2(path, bare / path.name)
        assert build_engines.main(argv[:-1] + [str(bare)]) == 1
        assert "export_onnx.py --typing strong" in capsys.readouterr().err
        return
    for path in engine_dir.glob("*.plan*"):
        path.unlink()  # other versions' engines from earlier parameters
    assert build_engines.main(argv) == 0
    for name in ("clip", "union", "vae"):
        spec = engine_spec(name, TINY, *SIZE)
        record = json.loads(spec.build_record_path(engine_dir).read_text())
        assert record["flags"]["tensorrt_version"] == fake.__version__ and record["flags"]["typing"] == "weak"
        assert record["flags"]["gpu"] == "NVIDIA A10 (sm_86)" and spec.plan_path(engine_dir).is_file()
    assert json.loads(engine_spec("union", TINY, *SIZE).build_record_path(engine_dir).read_text())["flags"][
        "fp32_layer_types"] == []  # norms stay fp16 unless --fp32-norms
    capsys.readouterr()
    assert build_engines.main(argv) == 0
    assert capsys.readouterr().out.count("is up to date") == 3
    assert build_engines.main(argv + ["--fp32-norms", "--engines", "union"]) == 0
    assert "build flags changed: fp32_layer_types" in capsys.readouterr().out


def test_trt_is_chosen_only_when_every_engine_is_current(trt, monkeypatch, tmp_path):
    """A partial build (only clip) or engines from another TensorRT: `trt` is skipped with the reason
    and the next back-end is used; with all three current, `trt` is the fastest available."""
    fake, trt_utils = trt
    from sdcanny import backends
    from sdcanny.engine_specs import build_flags, write_build_record
    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(trt_utils, "gpu_name", lambda device=None: "NVIDIA A10 (sm_86)")
    def fake_build(name, version):
        spec = engine_spec(name, TINY)  # the graded size: what initialize() needs
        onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], name, [], [])), str(spec.onnx_path(tmp_path)))
        spec.plan_path(tmp_path).write_bytes(b"plan")
        write_build_record(spec, tmp_path, "hash", build_flags(spec, version, "NVIDIA A10 (sm_86)"), 1.0)

    fake_build("clip", fake.__version__)
    name, skipped = backends.fastest_available(tmp_path, TINY)
    assert name == "torch" and "no engine" in skipped["trt"] and "union_256x384.plan" in skipped["trt"]
    assert "(and 1 more)" in skipped["trt"]  # vae is missing too
    for name in ("union", "vae"):
        fake_build(name, "7.2.3")
    assert "stale" in backends.unavailable_reason("trt", tmp_path, TINY) and "7.2.3" in backends.unavailable_reason(
        "trt", tmp_path, TINY)
    for name in ("union", "vae"):
        fake_build(name, fake.__version__)
    assert backends.fastest_available(tmp_path, TINY) == ("trt", {})


def test_load_engine_checks_freshness_and_the_engines_tensors(trt, monkeypatch, tmp_path):
    """trt_backend.load_engine over the fake: a current engine whose tensors are the spec's is
    loaded with its buffers; one whose tensors differ, or a stale one, is refused."""
    fake, trt_utils = trt
    from sdcanny.engine_specs import build_flags, write_build_record
    from sdcanny.trt_backend import load_engine
    monkeypatch.setattr(trt_utils, "gpu_name", lambda device=None: "NVIDIA A10 (sm_86)")
    spec = engine_spec("vae", TINY, *SIZE)
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "vae", [], [])), str(spec.onnx_path(tmp_path)))
    spec.plan_path(tmp_path).write_bytes(b"vae plan")
    write_build_record(spec, tmp_path, "hash", build_flags(spec, fake.__version__, "NVIDIA A10 (sm_86)"), 1.0)
    fake.engine_io[b"vae plan"] = {"latent": ((1, 4, 8, 8), "FLOAT", True), "image": ((1, 64, 64, 3), "UINT8", False)}
    engine = load_engine("vae", TINY, tmp_path, "cpu", *SIZE)
    assert {n: (tuple(t.shape), t.dtype) for n, t in engine.tensors.items()} == {
        "latent": ((1, 4, 8, 8), torch.float32), "image": ((1, 64, 64, 3), torch.uint8)}
    fake.engine_io[b"vae plan"] = {"latent": ((1, 4, 8, 8), "HALF", True), "image": ((1, 64, 64, 3), "UINT8", False)}
    with pytest.raises(RuntimeError, match="has tensors"):
        load_engine("vae", TINY, tmp_path, "cpu", *SIZE)
    write_build_record(spec, tmp_path, "hash", build_flags(spec, "7.0.0", "NVIDIA A10 (sm_86)"), 1.0)
    with pytest.raises(RuntimeError, match=r"stale .*7\.0\.0.*rebuild it with `python3 export_onnx.py --height 64"):
        load_engine("vae", TINY, tmp_path, "cpu", *SIZE)
