"""Ahead-of-time programs (sdcanny/programs.py) and the per-size choice of the fast back-end.

The programs are compiled once per session on the CPU (fp32, the tiny config; only the kind of
size with symbolic batch, height and width: about four minutes on two cores) with a deliberately
small range, so that sizes inside and outside it are both exercised. On a GPU the same tests run
in fp16."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import photos
from sdcanny import compat, programs
from sdcanny.checkpoint import load_networks
from sdcanny.config import TINY
from sdcanny.fast import FastTorchBackend
from sdcanny.pipeline import Canny2Image
from sdcanny.stages import STAGE_NAMES
from sdcanny.synthetic import HINT_GAIN, synthetic_state_dict, write_checkpoint

needs_aot = pytest.mark.skipif(compat.aot_unavailable_reason() is not None,
                               reason=f"{compat.aot_unavailable_reason()}")
ON_GPU = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)
# latent sides 16..32 (128..256 px), up to 3 samples: 128x256 and 128x128 are inside; 64x128,
# 320x640 and 4 samples outside. One sample has no program here (its variant is not compiled).
RANGE = programs.ShapeRange(max_samples=3, max_latent_side=32)
VARIANTS = ("samples",)
CALL = dict(prompt="a cup", a_prompt="best quality", n_prompt="lowres", num_samples=2, image_resolution=128,
            ddim_steps=4, guess_mode=False, strength=1.0, scale=9.0, seed=7, eta=0.0, low_threshold=100,
            high_threshold=200)


def photo(width=256, height=128):
    return cv2.resize(photos.photo("coffee", stand_in_shape=(400, 600, 3)), (width, height))


def backend_options(**kw):
    return dict(dtype=DTYPE, **kw)


@pytest.fixture(scope="module")
def program_dir(tiny_checkpoint, tmp_path_factory):
    if compat.aot_unavailable_reason() is not None:
        pytest.skip(compat.aot_unavailable_reason())
    directory = tmp_path_factory.mktemp("programs")
    builder = FastTorchBackend(lambda: load_networks(tiny_checkpoint, TINY), DEVICE, **backend_options())
    programs.start_programs(directory)  # the steps of `sdcanny.fast --prepare`, its children's in this process
    seconds = {kind: programs.compile_variant(builder.stages, TINY, directory, builder.device, builder.dtype,
                                              builder.inductor_options, RANGE, kind) for kind in VARIANTS}
    programs.finish(directory, builder.identity(TINY), builder.inductor_options, RANGE, seconds)
    return directory


def aot_pipeline(checkpoint, program_dir, **kw):
    backend = FastTorchBackend.create(checkpoint, TINY, DEVICE, program_dir, **backend_options(**kw))
    return Canny2Image(backend, TINY)


def eager_pipeline(checkpoint, **kw):
    return Canny2Image(FastTorchBackend(load_networks(checkpoint, TINY), DEVICE,
                                        **backend_options(compile=None, **kw)), TINY)


def assert_same_generation(aot, eager, img, args):
    got, want = aot.process(img, **args), eager.process(img, **args)
    assert aot.backend.last_form == "compiled ahead", (args, aot.backend.notes)
    assert [g.shape for g in got] == [w.shape for w in want]
    if ON_GPU:  # fp16: fused kernels round differently from eager's; prepare's check takes the same bound
        error = float((aot.backend.last_latents - eager.backend.last_latents).norm() / eager.backend.last_latents.norm())
        assert error <= 1e-2, (args, error)
    else:
        torch.testing.assert_close(aot.backend.last_latents, eager.backend.last_latents, rtol=1e-4, atol=1e-4)
    assert max(np.abs(g.astype(int) - w).max() for g, w in zip(got, want)) <= (8 if ON_GPU else 1)


@needs_aot
def test_programs_serve_every_size_in_their_range_like_the_eager_stages(tiny_checkpoint, program_dir):
    aot, eager = aot_pipeline(tiny_checkpoint, program_dir), eager_pipeline(tiny_checkpoint)
    # 128x256 with two samples and three, 128x128 with step noise, and the first size again
    for size, img in ((dict(), photo()), (dict(num_samples=3), photo()), (dict(eta=0.5), photo(128, 128)),
                      (dict(), photo())):
        assert_same_generation(aot, eager, img, {**CALL, **size})
    # only the kind the first size needs is loaded, when it needs it
    captured = ["first size capture"] if ON_GPU else []  # the step's graph, inside the first call
    assert list(aot.backend.startup) == ["set-up (CUDA, compiler)", "checkpoint read", "networks to device",
                                         "programs loaded (samples)", *captured, "first size first call"]
    assert aot.backend.notes == []


@needs_aot
def test_the_programs_take_the_weights_as_inputs(program_dir, tmp_path):
    """Programs prepared from one checkpoint serve another of the same config: the weights are
    inputs, not constants of the compiled code."""
    other = tmp_path / "tiny_seed1.pth"
    write_checkpoint(synthetic_state_dict(TINY, seed=1, control_gain=HINT_GAIN), other)
    assert_same_generation(aot_pipeline(other, program_dir), eager_pipeline(other), photo(), CALL)


@needs_aot
def test_each_kind_of_programs_loads_when_a_size_first_needs_it(tiny_checkpoint, program_dir, tmp_path):
    """The graded kind loads at the start (initialize() runs the graded call), after the
    networks; every other kind at the first size that needs it. Stand-in graded programs: copies of the several-samples ones
    (the tiny range holds no graded size, so they are loaded, never called)."""
    both = tmp_path / "programs"
    shutil.copytree(program_dir, both)
    for stage in STAGE_NAMES:
        shutil.copy(programs.program_path(both, stage, "samples"), programs.program_path(both, stage, "graded"))
    record = json.loads((both / programs.RECORD_NAME).read_text())
    (both / programs.RECORD_NAME).write_text(json.dumps({**record, "variants": ["graded", "samples"]}))

    aot = aot_pipeline(tiny_checkpoint, both)
    assert list(aot.backend.programs) == ["graded"]
    assert list(aot.backend.startup) == ["set-up (CUDA, compiler)", "checkpoint read", "networks to device",
                                         "programs loaded (graded)"]
    aot.process(photo(), **{**CALL, "num_samples": 4})  # outside the range: eager, nothing more loaded
    assert aot.backend.last_form == "eager" and list(aot.backend.programs) == ["graded"]
    aot.process(photo(), **CALL)
    assert aot.backend.last_form == "compiled ahead" and list(aot.backend.programs) == ["graded", "samples"]
    assert [n for n in aot.backend.notes if n.startswith("the programs for samples loaded in ")]


@needs_aot
def test_a_stage_compiled_after_another_is_symbolic_only_where_marked():
    """Every stage is compiled through the same function (call_stage); dynamo would take the sizes
    that differ from the previous compile's as symbolic, so that the graded programs of every
    stage but the first ran general code for a size they alone serve."""
    first, second = torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU())
    programs.compile_stage(first, (torch.randn(2, 8),), {})
    static = programs.compile_stage(second, (torch.randn(3, 6),), {})
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert static.guard_check(second, x)
        assert not static.guard_check(second, torch.randn(5, 6))
        torch.testing.assert_close(static(second, x), second(x))


@needs_aot
def test_prepare_rebuilds_for_kinds_the_programs_lack(tiny_checkpoint, program_dir):
    identity = FastTorchBackend(lambda: None, DEVICE, **backend_options()).identity(TINY)
    assert programs.rebuild_reason(program_dir, identity, ("samples",)) is None
    assert programs.rebuild_reason(program_dir, identity, ("graded", "samples")) == \
        f"the programs in {program_dir} lack the kinds graded"
    other = FastTorchBackend(lambda: None, DEVICE, **backend_options(fp32_islands=True)).identity(TINY)
    assert "fp32_islands" in programs.rebuild_reason(program_dir, other, ("samples",))


@needs_aot
def test_a_size_outside_the_range_runs_eager_and_says_why(tiny_checkpoint, program_dir):
    pipe = aot_pipeline(tiny_checkpoint, program_dir)
    eager = eager_pipeline(tiny_checkpoint)
    for size, problem in ((dict(num_samples=4), "num_samples 4 is outside the prepared 1..3"),
                          (dict(num_samples=1), "no programs for one sample were prepared"),
                          (dict(image_resolution=320), "a 320x640 work image is outside the prepared sizes"),
                          (dict(image_resolution=64), "a 64x128 work image is outside the prepared sizes")):
        args = {**CALL, **size}
        got = pipe.process(photo(), **args)
        assert pipe.backend.last_form == "eager"
        assert any(note.startswith(problem) for note in pipe.backend.notes), pipe.backend.notes
        want = eager.process(photo(), **args)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert len(pipe.backend.notes) == 4


@needs_aot
@pytest.mark.parametrize("change, reason", [
    ("torch", "built for torch '0.0.1'"),
    ("islands", "built for fp32_islands False, this is True"),
    ("no overlap", "built for overlap_launches True, this is False"),
    ("unfolded", "built for fold_upsampling True, this is False"),
    ("attention unfolded", "built for fold_cross_attention True, this is False"),
    ("outputs unfolded", "built for fold_transformer_outputs True, this is False"),
    ("delete", "lacks decode.samples.bin"),
    ("record", "no prepared programs"),
])
def test_stale_or_missing_programs_are_not_used_and_the_reason_is_given(tiny_checkpoint, program_dir, tmp_path,
                                                                        change, reason):
    directory = tmp_path / "programs"
    directory.mkdir()
    for path in program_dir.iterdir():
        os.link(path, directory / path.name)  # hard links: no copy of the programs
    record = programs.read_program_record(directory)
    options = {}
    if change == "torch":
        record["identity"]["torch"] = "0.0.1"
    elif change == "islands":
        options = dict(fp32_islands=True)
    elif change == "no overlap":  # other launch options make other programs
        options = dict(overlap_launches=False)
    elif change == "unfolded":  # other upsampling weights too
        options = dict(fold_upsampling=False)
    elif change == "attention unfolded":  # other cross-attention inputs
        options = dict(fold_cross_attention=False)
    elif change == "outputs unfolded":  # other transformer weights
        options = dict(fold_transformer_outputs=False)
    elif change == "delete":
        (directory / "decode.samples.bin").unlink()
    (directory / programs.RECORD_NAME).unlink()
    if change != "record":
        (directory / programs.RECORD_NAME).write_text(json.dumps(record))
    backend = FastTorchBackend.create(tiny_checkpoint, TINY, DEVICE, directory, **backend_options(**options))
    assert backend.programs is None
    assert len(backend.notes) == 1 and reason in backend.notes[0], backend.notes
    assert "python3 -m sdcanny.fast --prepare" in backend.notes[0]


def test_the_batch_axes_table_matches_the_stages_inputs(tiny_checkpoint):
    """BATCH_AXES (which inputs carry N or 2N rows) decides what is symbolic in the programs: it
    must agree with the inputs the stages really take, at two sample counts."""
    builder = FastTorchBackend(lambda: load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32)
    for n in (1, 3):
        examples = programs.example_inputs(builder.stages, TINY, builder.device, builder.dtype, n, (16, 24))
        for name, args in examples.items():
            assert len(args) == len(programs.BATCH_AXES[name]), name
            for arg, batch in zip(args, programs.BATCH_AXES[name]):
                tensors = arg if isinstance(arg, (list, tuple)) else [arg]
                rows = {t.shape[0] if t.dim() else None for t in tensors}
                if batch == "N, then 2N":  # the UNet's skips and the ControlNet's residuals
                    assert [t.shape[0] for t in tensors] == [n] + [2 * n] * (len(tensors) - 1), (name, rows)
                elif batch is None:  # per-call values: a step row, the guidance scalar, a time row (one
                    # row for every sample: at n = 1 that is N rows too, so n = 3 tells them apart)
                    assert n == 1 or rows.isdisjoint({n, 2 * n}), (name, rows)
                else:
                    assert rows == {n if batch == "N" else 2 * n}, (name, batch, rows)


def test_shape_ranges_name_what_they_do_not_serve():
    r = programs.ShapeRange(max_samples=4, max_latent_side=96)
    assert r.problem(4, 32, 48, 77) is None
    assert r.problem(5, 32, 48, 77) == "num_samples 5 is outside the prepared 1..4"
    assert "outside the prepared sizes (multiples of 64 px from 128 to 768)" in r.problem(1, 104, 48, 77)
    assert r.problem(1, 36, 48, 77) is not None  # not a multiple of 8
    assert r.problem(1, 8, 48, 77) is not None  # below the smallest side
    every = tuple(programs.VARIANTS)
    assert r.variant_for(1, 32, 48, 77, every) == ("graded", None)
    assert r.variant_for(1, 32, 48, 77, ("one sample", "samples")) == ("one sample", None)
    assert r.variant_for(1, 40, 48, 77, every) == ("one sample", None)
    assert r.variant_for(3, 32, 48, 77, every) == ("samples", None)
    assert r.variant_for(1, 40, 48, 77, ("samples",)) == (None, "no programs for one sample were prepared")
    assert r.variant_for(5, 32, 48, 77, every) == (None, "num_samples 5 is outside the prepared 1..4")
    assert r.problem(1, 32, 48, 154) == "prompts of 154 tokens (prepared: 77)"
    # the default admits the longest work image of the default size limits (2873 px long side)
    from sdcanny.arguments import WorkSizeLimits
    longest = int((WorkSizeLimits.max_pixels * WorkSizeLimits.max_aspect) ** 0.5) // 64 * 64
    assert programs.ShapeRange().problem(16, longest // 8, 384 // 8, 77) is None


def test_sizes_first_seen_after_the_first_run_eager_in_process(tiny_checkpoint):
    """Without programs, torch.compile serves only the first size (initialize()'s warm-up); a new
    size later gets the eager stages instead of minutes of compilation in a request."""
    backend = FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32, compile="default")
    if backend.compiled is None:
        pytest.skip(backend.notes[0])
    first, form = backend._stage_fns_for((1, 64, 64, 77))
    assert form == "compiled here"
    assert backend._stage_fns_for((1, 64, 64, 77)) == (first, "compiled here")
    other, form = backend._stage_fns_for((2, 64, 64, 77))
    assert form == "eager" and other["control"] is backend.stages.control


def test_the_least_recently_used_size_is_released(tiny_checkpoint):
    backend = FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32, compile=None,
                               max_captured_sizes=2)
    pipe = Canny2Image(backend, TINY)
    for n in (1, 2, 1, 3):
        pipe.process(photo(), **{**CALL, "num_samples": n, "ddim_steps": 1})
    assert [key[0] for key in backend.runs] == [1, 3]


@pytest.mark.parametrize("tune_new_sizes, tuned", [(False, [True, False, True]), (True, [True, True, True])])
def test_cudnn_times_convolutions_for_the_first_size_and_later_ones_only_when_asked(tiny_checkpoint, tune_new_sizes,
                                                                                  tuned):
    """The first size (initialize()'s) again too, when it comes back after its release."""
    backend = FastTorchBackend(load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32, compile=None,
                               max_captured_sizes=1, tune_new_sizes=tune_new_sizes)
    pipe = Canny2Image(backend, TINY)
    got = []
    for n in (1, 2, 1):
        pipe.process(photo(), **{**CALL, "num_samples": n, "ddim_steps": 1})
        (run,) = backend.runs.values()
        got.append(run.tune_convs)
    assert got == tuned


@pytest.mark.parametrize("code, timeout_s, expected", [
    ("pass", 60, None),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", 60, "kills the process with SIGSEGV"),
    ("raise ValueError('no such package')", 60, "fails: ValueError: no such package"),
    ("import time; time.sleep(30)", 1, "did not finish within 1 s"),
])
def test_a_child_that_crashes_fails_or_hangs_is_reported_not_suffered(code, timeout_s, expected):
    problem = programs.child_problem([sys.executable, "-c", code], timeout_s)
    if expected is None:
        assert problem is None, problem
    else:
        assert problem is not None and problem.startswith(expected), problem


def test_parallel_children_run_at_once_and_a_failure_stops_the_rest(tmp_path):
    """prepare compiles each kind of size in a child of its own: they overlap in time, each writes
    its log, and one that fails is named with its log's last line while the others are stopped."""
    stamp = "import sys, time; print('start', time.time()); time.sleep({}); print('end', time.time()); sys.exit({})"
    ok = {name: [sys.executable, "-c", stamp.format(1.0, 0)] for name in ("graded", "one sample")}
    seconds = programs.run_in_parallel(ok, tmp_path, poll_s=0.05)
    assert set(seconds) == set(ok)
    spans = [[float(line.split()[1]) for line in (tmp_path / f"{n.replace(' ', '_')}.log").read_text().splitlines()]
             for n in ok]
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # both started before either ended
    assert all(1.0 <= s < 30 for s in seconds.values())

    slow = [sys.executable, "-c", "import time; print('slow child started', flush=True); time.sleep(60)"]
    failing = [sys.executable, "-c", "raise SystemExit('no room left on the device')"]
    with pytest.raises(RuntimeError, match=r"failing failed \(exit status 1; .*failing.log\): no room left"):
        start = time.perf_counter()
        programs.run_in_parallel({"slow": slow, "failing": failing}, tmp_path, poll_s=0.05)
    assert time.perf_counter() - start < 30  # the slow one was stopped, not waited for


def test_every_module_the_programs_compile_code_of_is_in_their_digest():
    """A change to code the programs compile must make them stale: every sdcanny module that one
    of programs.SOURCE_FILES imports is among them, but for those whose code no stage runs
    traced (what torch offers, the configs, the checkpoint's schedule table, the request type).
    (sdcanny/fp8.py was missing when it was written.)"""
    import re
    not_compiled = {"compat.py", "config.py", "checkpoint.py", "pipeline.py"}
    package = os.path.dirname(programs.__file__)
    imported = set()
    for name in programs.SOURCE_FILES:
        with open(os.path.join(package, name), encoding="utf-8") as f:
            text = f.read()
        imported |= {f"{m}.py" for m in re.findall(r"^\s*from \.(\w+) import", text, re.M)}
        for names in re.findall(r"^\s*from \. import ([\w, ]+)", text, re.M):
            imported |= {f"{m.strip()}.py" for m in names.split(",")}
    assert imported - set(programs.SOURCE_FILES) == not_compiled
