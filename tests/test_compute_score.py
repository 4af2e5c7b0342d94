"""compute_score.py end to end on the tiny synthetic checkpoint (CPU, reference against reference)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import compute_score
from photos import HAS_SKIMAGE, photo
from canny2image_TRT import hackathon
from sdcanny import score
from sdcanny.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny_argv(checkpoint, tmp_path, *extra, out="out", steps=4, limit=1):
    return ["--config", "tiny", "--checkpoint", str(checkpoint), "--resolution", "64", "--steps", str(steps),
            "--limit", str(limit), "--backend", "reference", "--out", str(tmp_path / out),
            "--cache-dir", str(tmp_path / "cache"), *extra]


def load_json(path):
    return json.loads(Path(path).read_text())


def as_float(v):
    return math.inf if v == "inf" else v


# ---- a full run ----------------------------------------------------------------------------------

needs_skimage = pytest.mark.skipif(not HAS_SKIMAGE, reason="the built-in photographs are scikit-image's (optional)")


@needs_skimage
def test_full_run_over_two_builtin_images_writes_every_report_file(tiny_checkpoint, tmp_path, capsys):
    argv = tiny_argv(tiny_checkpoint, tmp_path, steps=10, limit=2)
    assert compute_score.main(argv) == 0
    stdout = capsys.readouterr().out
    out = tmp_path / "out"
    report = load_json(out / "score.json")
    summary = (out / "summary.md").read_text()
    sheet = cv2.imread(str(out / "contact_sheet.png"))

    # every file, every image
    assert [r["name"] for r in report["images"]] == ["astronaut", "chelsea"]
    assert [r["prompt"] for r in report["images"]] == ["an astronaut", "a cat"]
    for row in report["images"]:
        cand = cv2.imread(str(out / row["candidate_image"]), cv2.IMREAD_UNCHANGED)
        ref = cv2.imread(str(out / row["reference_image"]), cv2.IMREAD_UNCHANGED)
        assert cand.shape == ref.shape == tuple(row["output_shape"]) and cand.dtype == np.uint8
        np.testing.assert_array_equal(cand, ref)  # the same back-end: identical images
        assert row["psnr"] == "inf" and row["ssim"] == pytest.approx(1.0) and row["max_abs_diff"] == 0
        assert row["pd"] is None and row["latency_ms"] > 0 and row["against_latency_ms"] > 0
    assert sheet is not None and sheet.shape[0] > 2 * 64 and sheet.shape[1] > 5 * 64
    assert report["images"][0]["output_shape"] == [64, 64, 3]
    assert report["images"][1]["output_shape"] == [64, 128, 3]  # chelsea 300x451 at resolution 64

    # the printed figures are the JSON's
    lines = stdout.splitlines()
    for row in report["images"] + [dict(report["mean"], name="mean")]:
        printed = next(line.split() for line in lines if line.split()[:1] == [row["name"]])
        expected = [row["name"], f"{row['latency_ms']:.1f}", f"{row['against_latency_ms']:.1f}", "n/a",
                    "inf", f"{row['ssim']:.4f}"]
        assert printed[:6] == expected
        md = ["**mean**" if row["name"] == "mean" else row["name"]] + expected[1:]
        assert f"| {' | '.join(md)} |" in summary  # and the Markdown table's
    speed = report["speed"]
    assert (f"mean {speed['candidate']['mean_ms']:.1f} ms, median {speed['candidate']['median_ms']:.1f} ms, "
            f"p90 {speed['candidate']['p90_ms']:.1f} ms") in stdout
    assert (f"speedup {speed['speedup_mean']:.2f}x (mean), {speed['speedup_median']:.2f}x (median) from a single "
            "timed run per image") in stdout  # --repeat 1: labelled as one run
    assert speed["speedup_mean"] == pytest.approx(speed["against"]["mean_ms"] / speed["candidate"]["mean_ms"])
    assert report["mean"]["latency_ms"] == pytest.approx(np.mean([r["latency_ms"] for r in report["images"]]))
    # a tiny model at 64 px and 10 steps is not the hackathon's workload: its gates do not apply
    gates = report["gates"]
    assert gates["verdict"] == "N/A" and gates["pd"]["pass"] is None and gates["latency"]["pass"] is None
    assert "config tiny, image_resolution 64, ddim_steps 10" in gates["not_applicable"]
    assert f"gates: not applicable: {gates['not_applicable']}" in stdout and "verdict: N/A" in stdout
    assert "Not applicable: the hackathon's gates are defined for its workload" in summary
    # reference against reference on the same device: said to be trivial, in the output and the report
    assert report["comparison"]["note"].startswith("trivial comparison: the candidate and the reference are both")
    assert report["comparison"]["note"] in stdout and report["comparison"]["note"] in summary
    assert sum(line.startswith("PD unavailable: ") for line in lines) == 1
    assert report["pd"]["reason"] in stdout
    assert report["candidate"]["peak_gpu_memory"] == "n/a (CPU)" and "peak GPU memory: n/a (CPU)" in stdout
    assert report["candidate"]["initialize_seconds"] > 0
    assert report["command"] == "python3 compute_score.py " + " ".join(argv)
    assert f"`{report['command']}`" in summary and report["device"] in summary
    assert report["workload"]["args"] == {**score.GRADED, "image_resolution": 64, "ddim_steps": 10,
                                          "a_prompt": score.A_PROMPT, "n_prompt": score.N_PROMPT}


def test_a_different_candidate_shows_in_every_figure(tiny_checkpoint, tmp_path):
    """A candidate that differs from the reference (here: the reference with one pixel off and a
    uniform +-4 pattern) gives PSNR/SSIM/diff figures that match the saved images."""
    class Perturbed(hackathon):
        def process(self, *args):
            out = super().process(*args)[0].astype(np.int16)
            yy, xx = np.indices(out.shape[:2])
            out += np.where((yy + xx) % 2 == 0, 4, -4)[:, :, None]
            out[0, 0, 0] += 40
            return [np.clip(out, 0, 255).astype(np.uint8)]

    made = []
    def factory(**kw):
        made.append(kw["backend"])
        return (Perturbed if len(made) == 2 else hackathon)(**kw)  # the 2nd back-end built is the candidate

    opts = score.ScoreOptions(backend="reference", checkpoint=tiny_checkpoint, config="tiny", limit=1, resolution=64,
                              steps=4, out=tmp_path / "out", cache_dir=tmp_path / "cache", reference_timing=False)
    report = score.run(opts, factory, echo=lambda *a: None)
    row = report["images"][0]
    cand = cv2.imread(str(tmp_path / "out" / row["candidate_image"]), cv2.IMREAD_UNCHANGED).astype(np.float64)
    ref = cv2.imread(str(tmp_path / "out" / row["reference_image"]), cv2.IMREAD_UNCHANGED).astype(np.float64)
    mse = np.mean((cand - ref) ** 2)
    assert row["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert row["max_abs_diff"] == np.abs(cand - ref).max() >= 40 and 0 < row["ssim"] < 1
    assert report["speed"]["against"] is None and report["speed"]["speedup_mean"] is None
    assert report["against"]["initialize_seconds"] is not None  # the cache was empty: the reference ran


# ---- the reference cache -------------------------------------------------------------------------

def test_reference_cache_hits_on_the_second_run_and_misses_on_any_change(tiny_checkpoint, tiny_state, tmp_path,
                                                                          capsys):
    images = tmp_path / "pictures_croped"
    images.mkdir()
    cv2.imwrite(str(images / "bird_0.jpg"), photo("coffee", stand_in_shape=(400, 600, 3)))

    def run(*extra, checkpoint=tiny_checkpoint):
        argv = tiny_argv(checkpoint, tmp_path, "--images", str(images), "--no-reference-timing", "--warmup", "0",
                         *extra)
        assert compute_score.main(argv) == 0
        capsys.readouterr()
        report = load_json(tmp_path / "out" / "score.json")
        return report["reference_cache"]["hits"], report["reference_cache"]["misses"], report

    hits, misses, first = run()
    assert (hits, misses) == (0, 1) and first["against"]["initialize_seconds"] is not None
    assert first["images"][0]["prompt"] == "a bird"  # the hackathon's prompt for a directory
    hits, misses, second = run()
    assert (hits, misses) == (1, 0)
    assert second["against"]["initialize_seconds"] is None  # the reference was not even loaded
    assert second["images"][0]["psnr"] == "inf"  # and the cached image is the one it would make

    assert run("--steps", "5")[:2] == (0, 1)
    assert run("--seed", "7")[:2] == (0, 1)
    assert run("--refresh")[:2] == (0, 1)
    assert run()[:2] == (1, 0)  # the originals are still there

    other = tmp_path / "other.pth"
    key = next(k for k in tiny_state if k.startswith("model.diffusion_model.out."))
    write_checkpoint({**tiny_state, key: tiny_state[key] + 0.01}, other)  # one tensor retrained
    hits, misses, changed = run(checkpoint=other)
    assert (hits, misses) == (0, 1)
    assert changed["workload"]["checkpoint_fingerprint"] != first["workload"]["checkpoint_fingerprint"]
    assert (tmp_path / "cache").is_dir() and len(list((tmp_path / "cache").glob("*.png"))) == 4


def test_reference_key_depends_on_every_parameter():
    args = score.process_args(score.ScoreOptions(), "a bird")
    base = score.reference_key("ck", "img", args, "sd15", "cpu")
    assert base == score.reference_key("ck", "img", dict(args), "sd15", "cpu")
    changed = {"prompt": "a cat", "a_prompt": "", "n_prompt": "", "num_samples": 2, "image_resolution": 512,
               "ddim_steps": 30, "guess_mode": True, "strength": 0.5, "scale": 7.5, "seed": 1, "eta": 0.5,
               "low_threshold": 50, "high_threshold": 150}
    assert set(changed) == set(args)
    keys = {score.reference_key("ck", "img", {**args, k: v}, "sd15", "cpu") for k, v in changed.items()}
    for other in (("ck2", "img", args, "sd15", "cpu"), ("ck", "img2", args, "sd15", "cpu"),
                  ("ck", "img", args, "tiny", "cpu"), ("ck", "img", args, "sd15", "cuda:H100")):
        keys.add(score.reference_key(*other))
    assert base not in keys and len(keys) == len(changed) + 4


def test_checkpoint_fingerprint_reads_both_ends(tmp_path):
    path = tmp_path / "ck.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    base = score.checkpoint_fingerprint(path, chunk=1000)
    for pos in (0, 999, 2000, 2999):  # the first and the last 1000 bytes
        edited = bytearray(data)
        edited[pos] ^= 1
        path.write_bytes(edited)
        assert score.checkpoint_fingerprint(path, chunk=1000) != base
    edited = bytearray(data)
    edited[1500] ^= 1  # the middle is not read (documented)
    path.write_bytes(edited)
    assert score.checkpoint_fingerprint(path, chunk=1000) == base
    path.write_bytes(data + b"x")
    assert score.checkpoint_fingerprint(path, chunk=1000) != base


# ---- --step-error --------------------------------------------------------------------------------

class BackendWithoutHook:
    """A back-end that generates like the reference but offers no step_callback."""

    name = "reference"

    def __init__(self, inner):
        self.inner = inner

    def generate(self, request):
        return self.inner.generate(request)


def test_step_error_says_when_a_back_end_has_no_hook(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import canny2image_TRT
    create = canny2image_TRT.create_backend
    monkeypatch.setattr(canny2image_TRT, "create_backend", lambda *a, **k: BackendWithoutHook(create(*a, **k)))
    assert compute_score.main(tiny_argv(tiny_checkpoint, tmp_path, "--step-error", "--no-reference-timing")) == 0
    assert "back-end 'reference' does not support --step-error" in capsys.readouterr().out
    report = load_json(tmp_path / "out" / "score.json")
    assert report["step_error"]["supported"] is False


def test_step_error_reports_every_step(tiny_checkpoint, tmp_path, capsys):
    assert compute_score.main(tiny_argv(tiny_checkpoint, tmp_path, "--step-error", "--no-reference-timing",
                                        steps=4)) == 0
    stdout = capsys.readouterr().out
    se = load_json(tmp_path / "out" / "score.json")["step_error"]
    assert se["supported"] is True
    assert [s["timestep"] for s in se["steps"]] == [751, 501, 251, 1]
    assert all(s["mean_rel_l2"] == 0.0 and s["max_rel_l2"] == 0.0 for s in se["steps"])  # same back-end
    assert "step   3 (t=1): 0.000e+00 / 0.000e+00" in stdout
    assert "Per-step latent divergence" in (tmp_path / "out" / "summary.md").read_text()


# ---- bad input -----------------------------------------------------------------------------------

def _fails(argv, capsys, message):
    assert compute_score.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("compute_score.py: error: ") and message in err, err


def test_missing_images_directory(tiny_checkpoint, tmp_path, capsys):
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--images", str(tmp_path / "nope")), capsys,
           f"images directory not found: {tmp_path / 'nope'}")


def test_empty_images_directory(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--images", str(tmp_path / "empty")), capsys, "no images in")


def test_unreadable_image(tiny_checkpoint, tmp_path, capsys):
    d = tmp_path / "pics"
    d.mkdir()
    cv2.imwrite(str(d / "bird_0.jpg"), np.full((64, 64, 3), 128, np.uint8))
    (d / "bird_1.jpg").write_bytes(b"this is not a jpeg")
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--images", str(d)), capsys, f"cannot read image {d / 'bird_1.jpg'}")


def test_images_path_that_is_a_file_missing_checkpoint_and_bad_options(tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"")
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--images", str(f)), capsys, "must be a directory")
    _fails(tiny_argv(tmp_path / "missing.pth", tmp_path), capsys, "checkpoint not found")
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--limit", "0"), capsys, "--limit must be >= 1")
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--repeat", "0"), capsys, "--repeat >= 1")
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--steps", "3"), capsys, "--steps: ddim_steps=3 is not supported")
    _fails(tiny_argv(tiny_checkpoint, tmp_path, "--seed", "-1"), capsys, "-1 would draw another seed on each side")


def test_unavailable_back_end_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    argv = tiny_argv(tiny_checkpoint, tmp_path)
    argv[argv.index("--backend") + 1] = "torch"
    _fails(argv, capsys, "back-end 'torch' is unavailable: the torch back-end needs a CUDA GPU")


def test_directory_images_are_read_in_natural_order(tmp_path):
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"bird_{i}.jpg"), np.full((8, 8, 3), i, np.uint8))
    imgs = score.load_image_dir(tmp_path, "a bird")
    assert [i.name for i in imgs] == ["bird_1", "bird_2", "bird_10"]
    assert all(i.image.dtype == np.uint8 and i.image.shape == (8, 8, 3) for i in imgs)


@needs_skimage
def test_builtin_images_are_bgr_photographs_with_prompts():
    imgs = score.load_builtin_images()
    assert len(imgs) >= 6 and len({i.prompt for i in imgs}) == len(imgs)
    for img in imgs:
        assert img.image.dtype == np.uint8 and img.image.ndim == 3 and img.image.shape[2] == 3
    chelsea = next(i for i in imgs if i.name == "chelsea")
    import skimage.data
    np.testing.assert_array_equal(chelsea.image[:, :, ::-1], skimage.data.chelsea())


def test_without_scikit_image_the_builtins_are_distinct_generated_patterns(monkeypatch):
    monkeypatch.setattr(score, "optional", lambda module, missing_means: None)  # as when it is not installed
    imgs = score.load_builtin_images()
    assert [i.name for i in imgs] == ["pattern0", "pattern1", "pattern2"]
    from sdcanny.image import canny, resize_image
    edges = [canny(resize_image(i.image, 256), 100, 200) for i in imgs]
    assert all(e.shape == (256, 384) and (e > 0).mean() > 0.005 for e in edges)  # the graded size, with edges
    assert not np.array_equal(edges[0], edges[1]) and not np.array_equal(edges[1], edges[2])


def test_command_line_exit_status(tmp_path):
    """The script itself (not main()): bad input -> message on stderr and exit status 2."""
    proc = subprocess.run([sys.executable, "compute_score.py", "--images", str(tmp_path / "none")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "images directory not found" in proc.stderr


def test_gates_apply_to_the_graded_workload_only():
    graded = score.ScoreOptions(config="sd15", resolution=256, steps=20, seed=2946901)
    assert score.gates_not_applicable(graded) is None
    g = score.gates(11.0, 900.0, None, score.gates_not_applicable(graded))
    assert (g["verdict"], g["pd"]["pass"], g["latency"]["pass"]) == ("PASS", True, True)
    assert score.gates(12.5, 900.0, None)["verdict"] == "FAIL"
    assert score.gates(None, 900.0, "no pytorch-fid")["verdict"] == "INCOMPLETE"
    for off in (dict(config="tiny"), dict(resolution=512), dict(steps=10), dict(seed=1)):
        opts = score.ScoreOptions(**{**dict(config="sd15", resolution=256, steps=20, seed=2946901), **off})
        assert score.gates(11.0, 900.0, None, score.gates_not_applicable(opts))["verdict"] == "N/A", off


def test_a_comparison_is_trivial_only_for_one_back_end_on_one_device():
    assert score.comparison_note("reference", "reference", None, "cpu").startswith("trivial comparison")
    assert score.comparison_note("torch", "reference", None, "cuda") is None
    assert score.comparison_note("reference", "reference", "cuda", "cpu") is None  # GPU against CPU can differ
