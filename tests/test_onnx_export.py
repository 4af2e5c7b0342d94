"""ONNX export of the three engine graphs (tiny config, CPU): every graph against PyTorch through
onnxruntime, the union graph against the reference sampler's step, the CLIP graph's constants, the
VAE graph's uint8 HWC output, and the files and records the export leaves."""
from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sdcanny.checkpoint import load_networks
from sdcanny.config import SD15, TINY
from sdcanny.engine_specs import engine_spec, engine_specs, onnx_sha256, parse_precisions
from sdcanny.networks import CAUSAL_MASK_VALUE
from sdcanny import compat, onnx_export
from sdcanny.onnx_export import (PARITY_TOLERANCE, compare, export_all, export_record, graph_module,
                                 infinite_constants, io_mismatches, move_into_place, opset_for, parity,
                                 reexport_reason, run_onnxruntime, sample_inputs, simplify_file)
from sdcanny.reference import ReferenceBackend, to_uint8_hwc

HEIGHT, WIDTH = 128, 192  # smaller than the graded 256x384 to keep the tests fast; same code
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnxruntime (optional; not in the hackathon docker) runs the graphs")
needs_fp16_export = pytest.mark.skipif(not (compat.cpu_runs_fp16_convolutions() or torch.cuda.is_available()),
                                       reason=f"torch {torch.__version__} cannot trace fp16 graphs on the CPU (TensorRT "
                                              "8.6, the docker's, needs none)")


@pytest.fixture(scope="module")
def nets(tiny_checkpoint):
    return load_networks(tiny_checkpoint, TINY)


@pytest.fixture(scope="module")
def specs():
    return engine_specs(TINY, HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, specs, tmp_path_factory):
    """engine_dir with all three graphs exported (and checked) once for the module."""
    engine_dir = tmp_path_factory.mktemp("engines")
    results = export_all(list(specs.values()), TINY, tiny_checkpoint, engine_dir)
    return engine_dir, {r.spec.name: r for r in results}


# -- the spec table ---------------------------------------------------------------------------

def test_sd15_specs_at_the_graded_size():
    specs = engine_specs(SD15)
    shapes = {n: {t.name: (t.shape, t.dtype) for t in s.tensors} for n, s in specs.items()}
    assert shapes["clip"] == {"tokens": ((2, 77), "int32"), "context": ((2, 77, 768), "float32")}
    assert shapes["union"] == {
        "latent": ((2, 4, 32, 48), "float32"), "timestep": ((2,), "int32"), "context": ((2, 77, 768), "float32"),
        "hint": ((2, 3, 256, 384), "float32"), "control_scales": ((2, 13), "float32"),
        "eps": ((2, 4, 32, 48), "float32")}
    assert shapes["vae"] == {"latent": ((1, 4, 32, 48), "float32"), "image": ((1, 256, 384, 3), "uint8")}
    assert [s.precision for s in specs.values()] == ["fp32", "fp16", "fp16"]
    assert specs["union"].fp32_from == ("timestep",)
    assert specs["union"].onnx_path("engines").as_posix() == "engines/union_256x384.onnx"
    assert specs["union"].plan_path("engines").as_posix() == "engines/union_256x384.plan"
    assert specs["clip"].plan_path("engines").as_posix() == "engines/clip.plan"


def test_precision_overrides_and_bad_sizes():
    specs = engine_specs(SD15, precisions=parse_precisions(["union=fp32", "clip=fp16"]))
    assert (specs["union"].precision, specs["union"].fp32_from) == ("fp32", ())
    assert specs["clip"].precision == "fp16"
    with pytest.raises(ValueError, match="precision"):
        engine_spec("vae", SD15, precision="int8")
    with pytest.raises(ValueError, match="unknown engine"):
        engine_specs(SD15, precisions={"unet": "fp16"})
    with pytest.raises(ValueError, match="multiples of 64"):
        engine_spec("union", SD15, 256, 380)


# -- the exported graphs ------------------------------------------------------------------------

def test_export_writes_checked_graphs_with_records(exported, specs):
    engine_dir, results = exported
    for name, spec in specs.items():
        model = onnx.load(str(spec.onnx_path(engine_dir)))
        assert model.opset_import[0].version == 17  # TensorRT 8.6's parser stops at 17: the default target
        assert io_mismatches(model, spec) == []
        record = json.loads(spec.export_record_path(engine_dir).read_text())
        assert record["onnx_sha256"] == onnx_sha256(spec.onnx_path(engine_dir))
        assert results[name].simplifier == ("onnxsim" if importlib.util.find_spec("onnxsim") else "none")
        if HAS_ORT:
            assert results[name].parity and all(p.ok for p in results[name].parity)
        else:  # said in one line, no traceback
            assert results[name].parity == []


@needs_ort
@pytest.mark.parametrize("name", ["clip", "union", "vae"])
def test_graph_matches_pytorch_on_fresh_inputs(exported, specs, nets, name):
    engine_dir, _ = exported
    spec = specs[name]
    inputs = sample_inputs(spec, TINY, seed=123)
    (result,) = parity(graph_module(name, nets), spec.onnx_path(engine_dir), spec, inputs)
    assert result.ok, result.describe()
    if name != "vae":  # float outputs: the 1e-4-of-scale bound itself
        assert result.max_abs_error <= PARITY_TOLERANCE * result.output_scale


@needs_ort
@pytest.mark.parametrize("guess_mode", [False, True])
def test_union_graph_is_the_reference_step(exported, specs, nets, guess_mode):
    """eps[0] = the reference's conditional prediction, eps[1] its unconditional one (no control
    at all in guess mode), for one sample and its guidance pair."""
    engine_dir, _ = exported
    spec = specs["union"]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=gen)
    cond, uncond = torch.randn(2, 1, 77, TINY.clip.width, generator=gen)
    hint = (torch.rand(1, 3, HEIGHT, WIDTH, generator=gen) < 0.1).float()
    scales = tuple(0.7 * 0.825 ** (12 - i) for i in range(13)) if guess_mode else (0.7,) * 13
    step = 481
    ref = ReferenceBackend(nets, "cpu")
    with torch.no_grad():
        features = nets.controlnet.embed_hint(hint)
        t = torch.tensor([step])
        e_cond = ref.noise_prediction(x, t, cond, features, scales)
        e_uncond = ref.noise_prediction(x, t, uncond, None if guess_mode else features, scales)
    uncond_scales = torch.zeros(13) if guess_mode else torch.tensor(scales)
    out = run_onnxruntime(spec.onnx_path(engine_dir), {
        "latent": torch.cat([x, x]), "timestep": torch.tensor([step, step], dtype=torch.int32),
        "context": torch.cat([cond, uncond]), "hint": torch.cat([hint, hint]),
        "control_scales": torch.stack([torch.tensor(scales, dtype=torch.float32), uncond_scales])})["eps"]
    expected = torch.cat([e_cond, e_uncond]).numpy()
    assert np.abs(out - expected).max() <= PARITY_TOLERANCE * np.abs(expected).max()


def test_clip_graph_has_only_finite_constants(exported, specs):
    engine_dir, _ = exported
    model = onnx.load(str(specs["clip"].onnx_path(engine_dir)))
    assert infinite_constants(model) == []
    values = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    values += [onnx.numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.HasField("t")]
    assert any(np.any(v == np.float32(CAUSAL_MASK_VALUE)) for v in values), "the causal mask constant is gone"


def test_infinite_constant_check_finds_inf():
    inf = helper.make_tensor("mask", TensorProto.FLOAT, [2], [0.0, -np.inf])
    graph = helper.make_graph([helper.make_node("Constant", [], ["c"], value=inf, name="mask_node")], "g", [],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    assert infinite_constants(helper.make_model(graph)) == ["mask_node"]


@needs_ort
def test_vae_graph_returns_uint8_hwc_as_the_reference_converts(exported, specs, nets):
    engine_dir, _ = exported
    spec = specs["vae"]
    latent = torch.randn(1, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3))
    image = run_onnxruntime(spec.onnx_path(engine_dir), {"latent": latent})["image"]
    assert image.dtype == np.uint8 and image.shape == (1, HEIGHT, WIDTH, 3)
    with torch.no_grad():
        expected = to_uint8_hwc(nets.vae(latent)).numpy()
    assert compare("image", expected, image).ok
    assert (image == expected).mean() > 0.999


def test_integer_parity_allows_rare_off_by_one_only():
    ref = np.zeros((100, 100), np.uint8)
    off = ref.copy()
    off[0, :5] = 1
    assert compare("image", ref, off).ok  # 0.05% of pixels off by one
    off[0, :20] = 1
    assert not compare("image", ref, off).ok  # 0.2%
    assert not compare("image", ref, ref + 2).ok


# -- re-export decisions, external data, simplifier choice ---------------------------------------

def test_reexport_only_when_something_changed(exported, specs, tiny_checkpoint, tmp_path):
    engine_dir, _ = exported
    spec = specs["clip"]
    for path in (spec.onnx_path(engine_dir), spec.export_record_path(engine_dir)):
        shutil.copy(path, tmp_path / path.name)
    record = export_record(spec, TINY, tiny_checkpoint, opset=opset_for())
    assert reexport_reason(spec, tmp_path, record) is None
    assert "opset" in reexport_reason(spec, tmp_path, {**record, "opset": 19})
    assert "checkpoint_mtime_ns" in reexport_reason(spec, tmp_path, {**record, "checkpoint_mtime_ns": 1})
    model = onnx.load(str(spec.onnx_path(tmp_path)))
    model.doc_string = "edited by hand"
    onnx.save(model, str(spec.onnx_path(tmp_path)))
    assert "modified" in reexport_reason(spec, tmp_path, record)
    spec.onnx_path(tmp_path).write_bytes(b"\xff" * 10)
    assert "cannot be read" in reexport_reason(spec, tmp_path, record)
    spec.export_record_path(tmp_path).unlink()
    assert "missing" in reexport_reason(spec, tmp_path, record)


def test_export_all_skips_current_graphs(exported, specs, tiny_checkpoint, capsys):
    engine_dir, _ = exported
    assert export_all(list(specs.values()), TINY, tiny_checkpoint, engine_dir) == []
    assert capsys.readouterr().out.count("is up to date") == 3


def _small_model() -> onnx.ModelProto:
    weight = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    # IR 8: what torch 2.0's exporter writes; newer onnx defaults to versions older runtimes refuse
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@needs_ort
@pytest.mark.parametrize("layout", ["one file", "one data file", "a file per tensor"])
def test_models_over_2gb_end_with_one_external_data_file(tmp_path, layout):
    """The >2 GB branch, forced on a small model (limit=0): whatever layout the exporter or the
    simplifier left, the weights end in <name>.onnx.data, and the hash that decides engine
    rebuilds covers that file."""
    source = tmp_path / "scratch" / "model.onnx"
    source.parent.mkdir()
    onnx.save_model(_small_model(), str(source), save_as_external_data=layout != "one file",
                    all_tensors_to_one_file=layout == "one data file", location="weights.bin", size_threshold=0)
    path = tmp_path / "big.onnx"
    files = move_into_place(source, path, limit=0)
    assert files == [path, tmp_path / "big.onnx.data"]
    x = torch.ones(1, 64)
    assert np.allclose(run_onnxruntime(path, {"x": x})["y"], x.numpy() @ np.arange(4096.0).reshape(64, 64))
    before = onnx_sha256(path)
    data = bytearray(files[1].read_bytes())
    data[0] ^= 1
    files[1].write_bytes(bytes(data))
    assert onnx_sha256(path) != before


def test_models_under_2gb_end_as_one_file(tmp_path):
    source = tmp_path / "scratch.onnx"
    onnx.save_model(_small_model(), str(source), save_as_external_data=True, location="w.bin", size_threshold=0)
    assert move_into_place(source, tmp_path / "small.onnx") == [tmp_path / "small.onnx"]
    assert onnx.load(str(tmp_path / "small.onnx"), load_external_data=False).graph.initializer[0].raw_data


@pytest.mark.skipif(importlib.util.find_spec("onnxsim") is None, reason="onnxsim (optional) is not installed")
def test_simplify_file_uses_onnxsim(tmp_path):
    onnx.save_model(_small_model(), str(tmp_path / "in.onnx"))
    assert simplify_file(tmp_path / "in.onnx", tmp_path / "out.onnx") == "onnxsim"
    assert (tmp_path / "out.onnx").is_file()


def test_without_a_simplifier_the_exported_graph_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_export, "optional", lambda module, missing_means: None)
    monkeypatch.setattr(onnx_export, "installed", lambda module: False)
    onnx.save_model(_small_model(), str(tmp_path / "in.onnx"))
    assert simplify_file(tmp_path / "in.onnx", tmp_path / "out.onnx") == "none"
    assert onnx.load(str(tmp_path / "out.onnx")).graph == _small_model().graph


def test_export_script_explains_a_missing_checkpoint(tmp_path, capsys):
    import export_onnx
    assert export_onnx.main(["--checkpoint", str(tmp_path / "none.pth")]) == 1
    assert "python3 -m sdcanny.synthetic --config sd15" in capsys.readouterr().err


# -- the trt back-end's sampling loop, run with the ONNX graphs ------------------------------------

class OnnxRuntimeEngine:
    """Test double of trt_utils.Engine's run-time interface (`tensors`, `execute`) that runs the
    exported graph in onnxruntime on the CPU. It exercises the trt back-end's loop (buffers, step
    order, guidance, DDIM, noise), not TensorRT."""

    def __init__(self, spec, engine_dir):
        import onnxruntime as ort
        self.spec = spec
        self.session = ort.InferenceSession(str(spec.onnx_path(engine_dir)), providers=["CPUExecutionProvider"])
        self.tensors = {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype)) for t in spec.tensors}

    def execute(self, stream: int) -> None:
        feed = {n: self.tensors[n].numpy() for n in self.spec.input_names}
        for name, value in zip(self.spec.output_names, self.session.run(self.spec.output_names, feed)):
            self.tensors[name].copy_(torch.from_numpy(value))


@pytest.fixture(scope="module")
def exported_fp16(exported, tiny_checkpoint):
    """The strongly typed fp16 union and vae graphs, beside the fp32 ones (clip is fp32 in both)."""
    engine_dir, _ = exported
    specs = engine_specs(TINY, HEIGHT, WIDTH, typing="strong")
    results = export_all(list(specs.values()), TINY, tiny_checkpoint, engine_dir)
    return engine_dir, specs, {r.spec.name: r for r in results}


@needs_fp16_export
def test_fp16_graphs_are_checked_against_the_fp32_module(exported_fp16):
    engine_dir, specs, results = exported_fp16
    assert set(results) == {"union", "vae"}  # clip.onnx is shared and was current
    for name in ("union", "vae"):
        path = specs[name].onnx_path(engine_dir)
        assert path.name.endswith(".fp16.onnx") and onnx.load(str(path)).opset_import[0].version == 17
        assert io_mismatches(onnx.load(str(path)), specs[name]) == []  # fp32 at the engine's edges
        if HAS_ORT:
            (p,) = results[name].parity
            assert p.ok, p.describe()
            assert p.relative_l2 > 0  # it is fp16: not bit-equal to the fp32 module


def ort_engines(engine_dir, typing):
    """A TrtBackend loader that returns onnxruntime stand-ins over the exported graphs."""
    def load(name, cfg, _engine_dir, device, height=HEIGHT, width=WIDTH):
        return OnnxRuntimeEngine(engine_spec(name, cfg, height, width, typing=typing), engine_dir)
    return load


@needs_ort
@pytest.mark.parametrize("typing", ["weak", pytest.param("strong", marks=needs_fp16_export)])
@pytest.mark.parametrize("num_samples, eta, guess_mode", [(1, 0.0, False), (2, 0.5, True)])
def test_trt_backend_end_to_end_on_the_graphs_matches_the_reference(exported, exported_fp16, nets, tiny_checkpoint,
                                                                     typing, num_samples, eta, guess_mode):
    """TrtBackend.generate through the whole front end, onnxruntime running each exported graph
    where TensorRT would run its engine: the fp32 graphs (what TensorRT 8.6/10 build from) give
    the reference's images; the fp16 graphs (TensorRT 10/11, strongly typed) stay within fp16's
    reach of them. The loop, buffers, guidance, DDIM, noise and decode are the trt back-end's."""
    from sdcanny.pipeline import Canny2Image
    from sdcanny.trt_backend import TrtBackend
    engine_dir, _ = exported
    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    args = (image, "a bird", "best quality", "lowres", num_samples, HEIGHT, 4, guess_mode, 0.8, 7.5, 42, eta, 50, 100)
    reference = ReferenceBackend(nets, "cpu")
    expected = Canny2Image(reference, TINY).process(*args)
    trt = TrtBackend(TINY, engine_dir, "cpu", load=ort_engines(engine_dir, typing))
    images = Canny2Image(trt, TINY).process(*args)
    latents, ref_latents = trt.last_latents.numpy(), reference.last_latents.numpy()
    rel_l2 = np.linalg.norm(latents - ref_latents) / np.linalg.norm(ref_latents)
    diffs = [np.abs(got.astype(int) - want.astype(int)) for got, want in zip(images, expected)]
    assert len(images) == num_samples and all(i.dtype == np.uint8 and i.shape == (HEIGHT, WIDTH, 3) for i in images)
    if typing == "weak":
        assert np.abs(latents - ref_latents).max() <= 1e-4 * np.abs(ref_latents).max()
        assert max(d.max() for d in diffs) <= 1
    else:
        assert 0 < rel_l2 <= 2e-2, rel_l2
        assert max(d.mean() for d in diffs) <= 2.0, [d.mean() for d in diffs]
