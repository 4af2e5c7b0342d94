"""Engine staleness (no TensorRT needed), preprocess.sh, and the TensorRT tests proper, which skip
with a one-line reason where TensorRT or a GPU is missing."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from sdcanny.config import TINY
from sdcanny.engine_specs import (TARGETS, build_flags, built_spec, engine_spec, engine_specs, engine_stale_reason,
                                  needs_rebuild, onnx_sha256, target_of, write_build_record)

ROOT = Path(__file__).resolve().parents[1]
TRT_VERSION, GPU = "10.13.0.35", "NVIDIA H100 80GB HBM3 (sm_90)"


def _write_onnx(path: Path, scale: float, external: bool = False) -> None:
    """A stand-in ONNX file (y = x * scale): staleness only looks at the file's bytes."""
    weight = onnx.numpy_helper.from_array(np.full((256,), scale, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], [weight])
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=0)


@pytest.fixture
def built(tmp_path):
    """An engine dir as build_engines.py leaves it: .onnx, .plan and the .plan.json record. The
    .plan holds placeholder bytes: staleness never opens it."""
    spec = engine_spec("union", TINY, 128, 192)
    _write_onnx(spec.onnx_path(tmp_path), 1.0, external=True)
    spec.plan_path(tmp_path).write_bytes(b"engine bytes")
    flags = build_flags(spec, TRT_VERSION, GPU)
    write_build_record(spec, tmp_path, onnx_sha256(spec.onnx_path(tmp_path)), flags, seconds=1.0)
    return spec, tmp_path, flags


def test_a_current_engine_needs_no_rebuild(built):
    spec, engine_dir, flags = built
    assert needs_rebuild(spec, engine_dir, flags) is None


def test_a_changed_onnx_file_triggers_a_rebuild(built):
    spec, engine_dir, flags = built
    _write_onnx(spec.onnx_path(engine_dir), 2.0, external=True)
    assert "changed since the engine was built" in needs_rebuild(spec, engine_dir, flags)


def test_changed_external_data_triggers_a_rebuild(built):
    spec, engine_dir, flags = built
    data = engine_dir / (spec.onnx_path(engine_dir).name + ".data")
    data.write_bytes(data.read_bytes()[:-4] + np.float32(3.0).tobytes())
    assert "changed since the engine was built" in needs_rebuild(spec, engine_dir, flags)


@pytest.mark.parametrize("key, value", [("precision", "fp32"), ("optimization_level", 3), ("typing", "strong"),
                                        ("tensorrt_version", "10.14.1"), ("gpu", "NVIDIA L4 (sm_89)"),
                                        ("fp32_from", []),
                                        ("input_shapes", {"latent": [2, 4, 32, 48]})])
def test_a_changed_build_flag_triggers_a_rebuild(built, key, value):
    spec, engine_dir, flags = built
    reason = needs_rebuild(spec, engine_dir, {**flags, key: value})
    assert reason.startswith("build flags changed") and key in reason


def test_precision_override_changes_the_flags():
    union16 = engine_spec("union", TINY)
    union32 = engine_spec("union", TINY, precision="fp32")
    f16, f32 = build_flags(union16, TRT_VERSION, GPU), build_flags(union32, TRT_VERSION, GPU)
    assert (f16["precision"], f16["fp32_from"], f16["optimization_level"], f16["typing"]) == ("fp16", ["timestep"], 5, "weak")
    assert (f32["precision"], f32["fp32_from"]) == ("fp32", [])
    assert f16["input_shapes"]["hint"] == [2, 3, 256, 384]


def test_missing_plan_or_record_triggers_a_build(built):
    spec, engine_dir, flags = built
    spec.build_record_path(engine_dir).write_text("{not json")
    assert "missing or unreadable" in needs_rebuild(spec, engine_dir, flags)
    spec.build_record_path(engine_dir).unlink()
    assert "missing or unreadable" in needs_rebuild(spec, engine_dir, flags)
    spec.plan_path(engine_dir).unlink()
    assert "does not exist" in needs_rebuild(spec, engine_dir, flags)


def test_a_missing_onnx_file_is_an_error(built):
    spec, engine_dir, flags = built
    spec.onnx_path(engine_dir).unlink()
    with pytest.raises(FileNotFoundError, match="export_onnx.py"):
        needs_rebuild(spec, engine_dir, flags)


def test_strong_typing_reads_the_fp16_graph_and_pins_nothing():
    weak, strong = engine_spec("union", TINY), engine_spec("union", TINY, typing="strong")
    assert (weak.onnx_path(Path("e")).name, strong.onnx_path(Path("e")).name) == (
        "union_256x384.onnx", "union_256x384.fp16.onnx")
    assert weak.plan_path(Path("e")) == strong.plan_path(Path("e"))  # one engine per size, rebuilt on a switch
    assert (weak.fp32_from, strong.fp32_from) == (("timestep",), ())  # strong: the islands are in the file
    clip = engine_spec("clip", TINY, typing="strong")
    assert clip.onnx_precision == "fp32" and clip.onnx_path(Path("e")).name == "clip.onnx"


@pytest.mark.parametrize("version, target", [("8.6.1.6", "8.6"), ("8.6.1", "8.6"), ("10.0.1", "10"),
                                             ("10.16.1.11", "10"), ("11.4.0.106", "11"), ("12.0.0", "11")])
def test_tensorrt_versions_map_to_targets(version, target):
    assert target_of(version) == target
    assert TARGETS[target].opset == (17 if target == "8.6" else 18)


def test_tensorrt_before_8_6_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        target_of("8.5.3")


# -- freshness at load time: the build record, no hashing ------------------------------------------

def test_a_current_engine_is_not_stale_and_needs_no_hashing(built, monkeypatch):
    spec, engine_dir, flags = built
    import sdcanny.engine_specs as es
    monkeypatch.setattr(es, "file_sha256", lambda paths: pytest.fail("load-time freshness must not hash"))
    assert engine_stale_reason(spec, engine_dir, TRT_VERSION, GPU) is None
    assert built_spec("union", TINY, engine_dir, 128, 192) == spec


def test_stale_at_load_time_for_another_tensorrt_gpu_or_onnx(built):
    spec, engine_dir, _ = built
    assert "tensorrt version" in engine_stale_reason(spec, engine_dir, "8.6.1", GPU)
    assert "gpu" in engine_stale_reason(spec, engine_dir, TRT_VERSION, "NVIDIA A10 (sm_86)")
    data = engine_dir / (spec.onnx_path(engine_dir).name + ".data")
    data.write_bytes(data.read_bytes() + b"\0")  # re-exported: other size and time
    assert "changed since the engine was built" in engine_stale_reason(spec, engine_dir, TRT_VERSION, GPU)
    for path in (spec.onnx_path(engine_dir), data):  # ONNX deleted after the build: the engine still serves
        path.unlink()
    assert engine_stale_reason(spec, engine_dir, TRT_VERSION, GPU) is None
    spec.build_record_path(engine_dir).unlink()
    assert "missing" in engine_stale_reason(spec, engine_dir, TRT_VERSION, GPU)
    assert built_spec("union", TINY, engine_dir, 128, 192) is None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_script_says_tensorrt_is_missing(capsys):
    import build_engines
    assert build_engines.main([]) == 1
    assert "needs TensorRT 8.6, 10.x or 11.x" in capsys.readouterr().err


# -- preprocess.sh -------------------------------------------------------------------------------

def _preprocess(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "preprocess.sh")], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_preprocess_stops_without_a_checkpoint(tmp_path):
    run = _preprocess({"CHECKPOINT": str(tmp_path / "missing.pth")}, tmp_path)
    assert run.returncode != 0
    assert "python3 -m sdcanny.synthetic --config sd15 --out" in run.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_preprocess_exports_and_is_rerunnable(tiny_checkpoint, tmp_path):
    env = {"CHECKPOINT": str(tiny_checkpoint), "CONFIG": "tiny", "ENGINE_DIR": str(tmp_path / "engines")}
    first = _preprocess(env, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert sorted(p.name for p in (tmp_path / "engines").glob("*.onnx")) == [
        "clip.onnx", "union_256x384.onnx", "vae_256x384.onnx"]
    if "TensorRT is not installed" not in first.stdout:
        pytest.skip("TensorRT is installed here: the second run would build engines (covered below)")
    second = _preprocess(env, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("is up to date") == 3


# -- TensorRT itself: never skipped where TensorRT and a GPU exist -------------------------------

needs_trt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                               reason="TensorRT (8.6, 10.x or 11.x) is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_engines(tiny_checkpoint, tmp_path_factory):
    """Tiny fp32 engines built by build_engines.py from freshly exported graphs."""
    pytest.importorskip("tensorrt", reason="TensorRT (8.6, 10.x or 11.x) is not installed")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    engine_dir = tmp_path_factory.mktemp("trt_engines")
    for script, extra in (("export_onnx.py", ["--checkpoint", str(tiny_checkpoint)]),
                          ("build_engines.py", ["--precision", "clip=fp32", "union=fp32", "vae=fp32"])):
        subprocess.run([sys.executable, str(ROOT / script), "--config", "tiny", "--engine-dir", str(engine_dir),
                        *extra], check=True, cwd=ROOT)
    return engine_dir


@needs_gpu
@needs_trt
def test_engines_match_onnxruntime(tiny_engines):
    import trt_utils
    from sdcanny.onnx_export import run_onnxruntime, sample_inputs
    stream = torch.cuda.Stream()
    for spec in engine_specs(TINY).values():
        engine = trt_utils.Engine(spec.plan_path(tiny_engines))
        engine.allocate()
        inputs = sample_inputs(spec, TINY, seed=5)
        got = engine.infer({k: v.cuda() for k, v in inputs.items()}, stream)
        stream.synchronize()
        expected = run_onnxruntime(spec.onnx_path(tiny_engines), inputs)
        for name, value in expected.items():
            diff = np.abs(got[name].cpu().numpy().astype(np.float64) - value.astype(np.float64))
            assert diff.max() <= 1e-3 * max(np.abs(value).max(), 1.0), f"{spec.name}.{name}: {diff.max()}"
        engine.capture_graph(stream)  # replaying the graph gives the same outputs
        before = {n: t.clone() for n, t in engine.tensors.items()}
        engine.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(before[n], engine.tensors[n]) for n in before)


@needs_gpu
@needs_trt
def test_a_stale_engine_is_refused_at_load(tiny_engines, tmp_path):
    from sdcanny.trt_backend import load_engine
    spec = engine_spec("clip", TINY)
    for path in tiny_engines.glob("clip.*"):
        shutil.copy2(path, tmp_path / path.name)
    load_engine("clip", TINY, tmp_path, torch.device("cuda"))
    _write_onnx(spec.onnx_path(tmp_path), 1.0)
    with pytest.raises(RuntimeError, match="stale"):
        load_engine("clip", TINY, tmp_path, torch.device("cuda"))


@needs_gpu
@needs_trt
@pytest.mark.parametrize("num_samples, eta, guess_mode", [(1, 0.0, False), (2, 0.5, True)])
def test_trt_backend_reproduces_the_reference(tiny_engines, tiny_checkpoint, num_samples, eta, guess_mode):
    """fp32 engines: the trt back-end's images are the reference's (same seed, same GPU noise),
    on the first (eager) call and on the second (CUDA graph replay)."""
    from sdcanny.checkpoint import load_networks
    from sdcanny.pipeline import Canny2Image
    from sdcanny.reference import ReferenceBackend
    from sdcanny.trt_backend import TrtBackend
    image = np.random.default_rng(0).integers(0, 256, (256, 384, 3), dtype=np.uint8)
    args = (image, "a bird", "best quality", "lowres", num_samples, 256, 4, guess_mode, 1.0, 9.0, 42, eta, 100, 200)
    reference = Canny2Image(ReferenceBackend(load_networks(tiny_checkpoint, TINY), "cuda"), TINY).process(*args)
    trt = Canny2Image(TrtBackend(TINY, tiny_engines), TINY)
    for _ in range(2):
        images = trt.process(*args)
        for got, expected in zip(images, reference):
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


# -- the trt back-end's CUDA-graph loop, with the PyTorch union graph in place of the engine --------

class TorchUnionEngine:
    """Stand-in for the union engine (the same buffers and `execute`) that runs the PyTorch union
    graph on the GPU: it exercises LoopRunner's capture and replay, not TensorRT."""

    def __init__(self, module, spec, device):
        self.module, self.spec = module, spec
        self.tensors = {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device=device)
                        for t in spec.tensors}

    def execute(self, stream: int) -> None:
        with torch.no_grad():  # on torch's current stream, which LoopRunner makes `stream`
            self.tensors["eps"].copy_(self.module(*(self.tensors[n] for n in self.spec.input_names)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU")
def test_captured_loop_replays_like_the_eager_loop(tiny_checkpoint):
    """The first request of a loop shape runs eagerly and captures; later requests (other seeds,
    scales, guess mode) replay the graph and must equal an eager run on their inputs."""
    from sdcanny.checkpoint import load_networks
    from sdcanny.onnx_export import graph_module
    from sdcanny.pipeline import Canny2Image
    from sdcanny.reference import ReferenceBackend
    from sdcanny.pipeline import draw_noise
    from sdcanny.trt_backend import LoopRunner, LoopState, denoise
    nets = load_networks(tiny_checkpoint, TINY).to("cuda")
    union = TorchUnionEngine(graph_module("union", nets), engine_spec("union", TINY, 128, 192), "cuda")
    pipeline = Canny2Image(ReferenceBackend(nets, "cuda"), TINY)  # for its request(): seeds, schedule, scales
    image = np.random.default_rng(0).integers(0, 256, (128, 192, 3), dtype=np.uint8)
    stream = torch.cuda.Stream()
    runner = LoopRunner(stream)
    for seed, guess_mode, strength in ((1, False, 1.0), (2, True, 0.7), (3, False, 0.3)):
        request = pipeline.request(image, "a", "b", "c", 2, 128, 4, guess_mode, strength, 7.5, seed, 0.5, 50, 100)
        with torch.cuda.stream(stream):
            x, step_noise = draw_noise(request, torch.device("cuda"))
            contexts = torch.randn(2, 2, 77, TINY.clip.width, device="cuda")
            got = runner(request, x, step_noise, contexts, union)
            eager = LoopState.allocate(request, (2, 77, TINY.clip.width), x.device)
            eager.load(request, x, step_noise, contexts)
            denoise(eager, request, union, stream.cuda_stream)
        torch.cuda.synchronize()
        assert len(runner.loops) == 1 and next(iter(runner.loops.values())).graph is not None
        torch.testing.assert_close(got, eager.x, rtol=1e-5, atol=1e-5 * eager.x.abs().max().item())
