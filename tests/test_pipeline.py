from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

import photos
from canny2image_TRT import hackathon

A_PROMPT = "best quality, extremely detailed"
N_PROMPT = "longbody, lowres, bad anatomy, bad hands, missing fingers"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    h = hackathon(backend="reference", checkpoint=tiny_checkpoint, config="tiny", device="cpu")
    h.initialize()
    return h


@pytest.fixture(scope="module")
def photo():
    return cv2.resize(photos.photo("chelsea", stand_in_shape=(300, 451, 3)), (128, 64))


def run(h, img, seed=2946901, **kw):
    args = dict(prompt="a cat", a_prompt=A_PROMPT, n_prompt=N_PROMPT, num_samples=1, image_resolution=64,
                ddim_steps=4, guess_mode=False, strength=1.0, scale=9.0, seed=seed, eta=0.0,
                low_threshold=100, high_threshold=200)
    args.update(kw)
    return h.process(img, **args)


def test_deterministic_for_a_seed_and_different_for_another(tiny, photo):
    first, again, other = run(tiny, photo), run(tiny, photo), run(tiny, photo, seed=7)
    assert len(first) == 1 and first[0].shape == (64, 128, 3) and first[0].dtype == np.uint8
    assert np.array_equal(first[0], again[0])
    assert np.abs(first[0].astype(int) - other[0]).mean() > 1


def test_every_input_changes_the_image(tiny, photo):
    """Prompt, negative prompt, hint, strength and guess mode each reach the networks."""
    base = run(tiny, photo)[0].astype(int)
    for change in (dict(prompt="a dog"), dict(n_prompt="blurry"), dict(strength=0.5),
                   dict(guess_mode=True), dict(low_threshold=20, high_threshold=40), dict(scale=3.0),
                   dict(eta=0.5)):
        assert np.abs(run(tiny, photo, **change)[0] - base).mean() > 0.5, change


def test_num_samples_gives_independent_images(tiny, photo):
    images = run(tiny, photo, num_samples=2)
    assert len(images) == 2 and all(i.shape == (64, 128, 3) for i in images)
    assert not np.array_equal(images[0], images[1])  # different noise per sample


@pytest.mark.parametrize("change, message", [
    (dict(input_image=None), "None"),
    (dict(input_image=np.zeros((64, 64, 3), np.float32)), "uint8"),
    (dict(input_image=np.zeros((64, 64), np.uint8)), "H x W x 3"),
    (dict(input_image=np.zeros((64, 64, 4), np.uint8)), "H x W x 3"),
    (dict(input_image=np.zeros((0, 64, 3), np.uint8)), "empty"),
    (dict(prompt=3), "prompt must be a string"),
    (dict(n_prompt=None), "n_prompt must be a string"),
    (dict(ddim_steps=0), "ddim_steps"),
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=1.5), "num_samples"),
    (dict(image_resolution=8), "image_resolution"),
    (dict(low_threshold=200, high_threshold=100), "threshold"),
])
def test_bad_input_raises_value_error(tiny, photo, change, message):
    img = change.pop("input_image", photo)
    with pytest.raises(ValueError, match=message):
        run(tiny, img, **change)


def test_unknown_backend_and_config_raise():
    with pytest.raises(ValueError, match="unknown back-end"):
        hackathon(backend="onnx")
    with pytest.raises(ValueError, match="unknown config"):
        hackathon(config="sdxl")


def test_process_before_initialize_raises(photo):
    with pytest.raises(RuntimeError, match="initialize"):
        run(hackathon(backend="reference"), photo)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the torch back-end is available")
def test_initialize_says_why_faster_back_ends_are_not_used(tiny_checkpoint, capsys):
    h = hackathon(checkpoint=tiny_checkpoint, config="tiny", device="cpu")
    h.initialize()
    out = capsys.readouterr().out
    assert h.backend_name == "reference"
    assert "not using 'trt': " in out and "not using 'torch': the torch back-end needs a CUDA GPU" in out


def test_default_paths_are_the_projects_with_the_docker_checkpoint_as_fallback(tmp_path, monkeypatch):
    from sdcanny import paths
    monkeypatch.chdir(tmp_path)  # the grader may import from anywhere
    assert paths.DEFAULT_CHECKPOINT == paths.PROJECT_ROOT / "models" / "control_sd15_canny.pth"
    assert paths.DEFAULT_ENGINE_DIR.is_absolute() and paths.DEFAULT_ENGINE_DIR.parent == paths.PROJECT_ROOT
    own, docker = tmp_path / "own.pth", tmp_path / "docker.pth"
    assert paths.default_checkpoint((own, docker)) == own  # neither exists: the message names ours
    docker.write_bytes(b"x")
    assert paths.default_checkpoint((own, docker)) == docker
    own.write_bytes(b"x")
    assert paths.default_checkpoint((own, docker)) == own
    assert str(paths.DOCKER_CHECKPOINT) == "/home/player/ControlNet/models/control_sd15_canny.pth"
