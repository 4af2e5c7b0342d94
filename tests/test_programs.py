"""Ahead-of-time programs (sdcanny/programs.py) and the per-size choice of the fast back-end.

The programs are compiled once per session on the CPU (fp32, the tiny config: about three
minutes on two cores) with a deliberately small range, so that sizes inside and outside it are
both exercised. On a GPU the same tests run in fp16 with CUDA graphs (the H100 run)."""
from __future__ import annotations

import json
import os
import shutil
import sys

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

needs_aot = pytest.mark.skipif(compat.aot_unavailable_reason() is not None,
                               reason=f"{compat.aot_unavailable_reason()}")
ON_GPU = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)
# latent sides up to 24 (192 px), up to 2 samples: 64x128 and 128x128 are inside, 192x384 and 3
# samples outside
RANGE = programs.ShapeRange(max_samples=2, max_latent_side=24)
CALL = dict(prompt="a cup", a_prompt="best quality", n_prompt="lowres", num_samples=1, image_resolution=64,
            ddim_steps=4, guess_mode=False, strength=1.0, scale=9.0, seed=7, eta=0.0, low_threshold=100,
            high_threshold=200)


def photo(width=128, height=64):
    return cv2.resize(photos.photo("coffee", stand_in_shape=(400, 600, 3)), (width, height))


def backend_options(**kw):
    return dict(dtype=DTYPE, **kw)


@pytest.fixture(scope="module")
def program_dir(tiny_checkpoint, tmp_path_factory):
    if compat.aot_unavailable_reason() is not None:
        pytest.skip(compat.aot_unavailable_reason())
    directory = tmp_path_factory.mktemp("programs")
    builder = FastTorchBackend(lambda: load_networks(tiny_checkpoint, TINY), DEVICE, **backend_options())
    programs.prepare(builder.stages, TINY, directory, builder.identity(tiny_checkpoint, TINY), builder.device,
                     builder.dtype, builder.inductor_options, RANGE)
    return directory


def aot_pipeline(tiny_checkpoint, program_dir, **kw):
    backend = FastTorchBackend.create(tiny_checkpoint, TINY, DEVICE, program_dir, **backend_options(**kw))
    return Canny2Image(backend, TINY)


def eager_pipeline(tiny_checkpoint, **kw):
    return Canny2Image(FastTorchBackend(load_networks(tiny_checkpoint, TINY), DEVICE,
                                        **backend_options(compile=None, **kw)), TINY)


@needs_aot
def test_programs_serve_every_size_in_their_range_like_the_eager_stages(tiny_checkpoint, program_dir):
    aot, eager = aot_pipeline(tiny_checkpoint, program_dir), eager_pipeline(tiny_checkpoint)
    sizes = [dict(), dict(num_samples=2), dict(image_resolution=128, eta=0.5)]
    for size in sizes:  # 64x128, twice that, and 128x128 with step noise
        args = {**CALL, **size}
        img = photo(64, 64) if size.get("image_resolution") == 128 else photo()
        got, want = aot.process(img, **args), eager.process(img, **args)
        assert aot.backend.last_form == "compiled ahead", size
        assert [g.shape for g in got] == [w.shape for w in want]
        tol = dict(rtol=1e-2, atol=1e-2) if ON_GPU else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(aot.backend.last_latents, eager.backend.last_latents, **tol)
        assert max(np.abs(g.astype(int) - w).max() for g, w in zip(got, want)) <= (8 if ON_GPU else 1)
    assert aot.backend._stages is None  # the checkpoint was never read: the programs hold the weights
    assert list(aot.backend.startup) == ["programs loaded", "first size first call", "first size capture"]


@needs_aot
def test_a_size_outside_the_range_runs_eager_and_says_why(tiny_checkpoint, program_dir):
    pipe = aot_pipeline(tiny_checkpoint, program_dir)
    eager = eager_pipeline(tiny_checkpoint)
    for size, problem in ((dict(num_samples=3), "num_samples 3 is outside the prepared 1..2"),
                          (dict(image_resolution=192), "a 192x384 work image is outside the prepared sizes")):
        args = {**CALL, **size}
        img = photo(256, 128)
        got = pipe.process(img, **args)
        assert pipe.backend.last_form == "eager"
        assert any(note.startswith(problem) for note in pipe.backend.notes), pipe.backend.notes
        want = eager.process(img, **args)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert "checkpoint read" in pipe.backend.startup  # read once, when the first such size came


@needs_aot
@pytest.mark.parametrize("change, reason", [
    ("touch", "built for checkpoint"),
    ("torch", "built for torch '0.0.1'"),
    ("islands", "built for fp32_islands False, this is True"),
    ("delete", "lacks decode.pt2"),
    ("record", "no prepared programs"),
])
def test_stale_or_missing_programs_are_not_used_and_the_reason_is_given(tiny_checkpoint, program_dir, tmp_path,
                                                                        change, reason):
    directory = tmp_path / "programs"
    directory.mkdir()
    for path in program_dir.iterdir():
        os.link(path, directory / path.name)  # hard links: no copy of the packages
    checkpoint = tmp_path / "tiny.pth"
    shutil.copy2(tiny_checkpoint, checkpoint)  # same size and mtime; touching it leaves the original alone
    record = programs.read_program_record(directory)
    options = {}
    if change == "touch":
        os.utime(checkpoint, ns=(1, 1))
    elif change == "torch":
        record["identity"]["torch"] = "0.0.1"
    elif change == "islands":
        options = dict(fp32_islands=True)
    elif change == "delete":
        (directory / "decode.pt2").unlink()
    (directory / programs.RECORD_NAME).unlink()
    if change != "record":
        (directory / programs.RECORD_NAME).write_text(json.dumps(record))
    backend = FastTorchBackend.create(checkpoint, TINY, DEVICE, directory, **backend_options(**options))
    assert backend.programs is None
    assert len(backend.notes) == 1 and reason in backend.notes[0], backend.notes
    assert "python3 -m sdcanny.fast --prepare" in backend.notes[0]


@needs_aot
def test_the_example_inputs_have_the_batch_and_sizes_the_dynamic_shapes_say(tiny_checkpoint):
    builder = FastTorchBackend(lambda: load_networks(tiny_checkpoint, TINY), "cpu", dtype=torch.float32)
    examples = programs.example_inputs(builder.stages, TINY, builder.device, builder.dtype)
    n, (h, w) = programs.EXAMPLE_SAMPLES, programs.GRADED_LATENT
    specs = {name: programs.dynamic_shapes(name, args, programs.ShapeRange()) for name, args in examples.items()}
    decode = dict(zip(("h", "skips", "emb", "context", "controls", "x", "step", "guidance", "noise"),
                      zip(examples["unet_decode"], specs["unet_decode"])))
    (x, x_spec), (step, step_spec) = decode["x"], decode["step"]
    assert x.shape == (n, 4, h, w) and x_spec[0].__name__ == "samples" and step_spec is None
    skips, skip_specs = decode["skips"]
    assert len(skips) == len(skip_specs) == TINY.unet.num_control_residuals - 1
    for skip, spec in zip(skips, skip_specs):  # 2N, and height/width as multiples of latent / 8
        assert skip.shape[0] == 2 * n and spec[0].__name__ == "2*samples"
        for axis, root, side in ((2, "latent_h_8", h), (3, "latent_w_8", w)):
            factor = skip.shape[axis] // (side // 8)  # 8 at the latent's size, 1 at the UNet's bottom
            assert spec[axis].__name__ == (root if factor == 1 else f"{factor}*{root}")
    hint, hint_spec = examples["encode"][1], specs["encode"][1]
    assert hint.shape[2:] == (8 * h, 8 * w) and hint_spec[2].__name__ == "64*latent_h_8"


def test_shape_ranges_name_what_they_do_not_serve():
    r = programs.ShapeRange(max_samples=4, max_latent_side=96)
    assert r.problem(4, 32, 48, 77) is None
    assert r.problem(5, 32, 48, 77) == "num_samples 5 is outside the prepared 1..4"
    assert "outside the prepared sizes (multiples of 64 px up to 768)" in r.problem(1, 104, 48, 77)
    assert r.problem(1, 36, 48, 77) is not None  # not a multiple of 8
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
