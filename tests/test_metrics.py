"""Fidelity metrics against expectations computed independently of sdcanny.metrics."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import types

import cv2
import numpy as np
import pytest
import torch

from sdcanny import metrics
from sdcanny.image import stand_in_photo

HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None


@pytest.fixture(scope="module")
def photo():
    """A real photograph (scikit-image's, where installed; else a test pattern with texture), BGR,
    kept away from 0 and 255 so that +-noise never clips."""
    if HAS_SKIMAGE:
        import skimage.data
        img = cv2.cvtColor(skimage.data.chelsea(), cv2.COLOR_RGB2BGR)[:128, :192]
    else:
        texture = np.random.default_rng(3).integers(-30, 30, (128, 192, 3))
        img = stand_in_photo((128, 192, 3)).astype(np.int16) + texture
    return np.clip(img, 20, 235).astype(np.uint8)


@pytest.mark.skipif(not HAS_SKIMAGE, reason="scikit-image (optional) is the second implementation compared with")
@pytest.mark.parametrize("sigma", [1.0, 4.0, 25.0])
def test_psnr_and_ssim_equal_scikit_image(photo, sigma):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    rng = np.random.default_rng(int(sigma))
    noisy = np.clip(photo + rng.normal(0, sigma, photo.shape).round(), 0, 255).astype(np.uint8)
    assert metrics.psnr(photo, noisy) == pytest.approx(peak_signal_noise_ratio(photo, noisy, data_range=255), rel=1e-12)
    for a, b in ((photo, noisy), (photo[:6, :9], noisy[:6, :9]), (photo[..., 0], noisy[..., 0])):
        m = min(a.shape[:2])
        win = 7 if m >= 7 else m - (1 - m % 2)
        expected = structural_similarity(a, b, data_range=255, win_size=win,
                                         channel_axis=2 if a.ndim == 3 else None)
        assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-9)


def checkerboard_noise(shape, amplitude):
    """+amplitude / -amplitude in a checkerboard: mean square exactly amplitude**2."""
    yy, xx = np.indices(shape[:2])
    sign = np.where((yy + xx) % 2 == 0, 1, -1)[:, :, None]
    return np.broadcast_to(sign * amplitude, shape).astype(np.int16)


def test_psnr_of_identical_images_is_infinite(photo):
    assert metrics.psnr(photo, photo.copy()) == math.inf


@pytest.mark.parametrize("amplitude", [1, 5, 20])
def test_psnr_of_a_known_noise_level_matches_the_formula(photo, amplitude):
    noisy = (photo.astype(np.int16) + checkerboard_noise(photo.shape, amplitude)).astype(np.uint8)
    expected = 10 * math.log10(255.0 ** 2 / amplitude ** 2)  # MSE is exactly amplitude^2
    assert metrics.psnr(photo, noisy) == pytest.approx(expected, abs=1e-9)
    assert metrics.psnr(noisy, photo) == pytest.approx(expected, abs=1e-9)


def test_psnr_of_gaussian_noise_matches_its_measured_mse(photo):
    rng = np.random.default_rng(0)
    noisy = np.clip(photo + rng.normal(0, 3, photo.shape).round(), 0, 255).astype(np.uint8)
    mse = np.mean((photo.astype(np.float64) - noisy) ** 2)
    assert metrics.psnr(photo, noisy) == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-12)
    assert 35 < metrics.psnr(photo, noisy) < 40  # sigma 3 -> about 38.6 dB


def test_ssim_of_identical_images_is_one_and_drops_with_noise(photo):
    assert metrics.ssim(photo, photo.copy()) == pytest.approx(1.0, abs=1e-12)
    light = (photo.astype(np.int16) + checkerboard_noise(photo.shape, 2)).astype(np.uint8)
    heavy = (photo.astype(np.int16) + checkerboard_noise(photo.shape, 15)).astype(np.uint8)
    s_light, s_heavy = metrics.ssim(photo, light), metrics.ssim(photo, heavy)
    assert 1.0 > s_light > s_heavy > 0.0
    assert metrics.ssim(light, photo) == pytest.approx(s_light, abs=1e-12)  # symmetric


def test_ssim_works_on_the_tiny_config_s_smallest_outputs():
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert metrics.ssim(a[:5, :5], a[:5, :5]) == pytest.approx(1.0)  # window shrinks to 5


def test_metric_inputs_are_checked(photo):
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(photo, photo[:64])
    with pytest.raises(ValueError, match="uint8"):
        metrics.ssim(photo, photo.astype(np.float32))


def test_diff_stats_and_relative_l2(photo):
    other = photo.copy()
    other[3, 4, 1] = photo[3, 4, 1] - 17
    assert metrics.diff_stats(photo, other) == {"max_abs_diff": 17, "mean_abs_diff": pytest.approx(17 / photo.size)}
    assert metrics.relative_l2(np.array([3.0, 4.0]), np.array([0.0, 0.0])) == math.inf
    assert metrics.relative_l2(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0
    assert metrics.relative_l2(np.array([0.0, 5.0]), np.array([3.0, 4.0])) == pytest.approx(math.sqrt(10) / 5)


def test_perceptual_distance_is_the_l2_norm_of_the_feature_difference():
    a = np.zeros(2048, np.float32)
    b = np.zeros(2048, np.float32)
    b[0], b[2047] = 3.0, 4.0
    assert metrics.perceptual_distance(a, b) == pytest.approx(5.0)
    assert metrics.perceptual_distance(b, b) == 0.0
    with pytest.raises(ValueError, match="length"):
        metrics.perceptual_distance(a, b[:10])


def test_pd_input_is_what_pytorch_fid_read_from_the_hackathon_s_jpeg(photo, tmp_path):
    """The hackathon did cv2.imwrite('x.jpg', img), then pytorch-fid: PIL.Image.open().convert('RGB')
    and ToTensor (HWC uint8 -> CHW float / 255). Reproduced here through real files."""
    Image = pytest.importorskip("PIL.Image", reason="Pillow (needed only with pytorch-fid, for PD) is not installed")
    path = tmp_path / "bird_0.jpg"
    assert cv2.imwrite(str(path), photo)
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    got = metrics.hackathon_pd_input(photo)
    assert got.dtype == np.float32 and got.shape == (3,) + photo.shape[:2]
    np.testing.assert_array_equal(got, expected)
    # cv2 writes the array as BGR and PIL reads RGB: channel 0 of the tensor is the array's channel 2
    assert np.abs(got[0] * 255 - photo[:, :, 2]).mean() < 3


def test_pd_reports_unavailable_without_pytorch_fid(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # as if not installed (import would fail)
    monkeypatch.setattr(metrics.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytorch_fid" else find_spec(name, *a))
    reason = metrics.pd_unavailable_reason()
    assert reason is not None and "pytorch-fid is not installed" in reason and "\n" not in reason
    with pytest.raises(RuntimeError, match="pytorch-fid is not installed"):
        metrics.InceptionFeatures()


def test_pd_in_this_environment_is_reported_or_available():
    reason = metrics.pd_unavailable_reason()
    assert reason is None or ("pytorch-fid" in reason or "weights" in reason)


def _fake_pytorch_fid(monkeypatch, inception_cls=None, import_error=None):
    """Stand-ins for the pytorch_fid package, to drive the code paths around the real one."""
    pkg = types.ModuleType("pytorch_fid")
    pkg.__spec__ = importlib.machinery.ModuleSpec("pytorch_fid", None, is_package=True)
    pkg.__path__ = []
    monkeypatch.setitem(sys.modules, "pytorch_fid", pkg)
    if import_error is not None:
        def broken(name, *a, **k):
            if name == "pytorch_fid.inception":
                raise import_error
            return importlib.import_module(name, *a, **k)
        monkeypatch.setattr(metrics.importlib, "import_module", broken)
        return
    mod = types.ModuleType("pytorch_fid.inception")
    mod.FID_WEIGHTS_URL = metrics.FID_WEIGHTS_URL
    mod.InceptionV3 = inception_cls
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", mod)


def test_pd_reports_a_pytorch_fid_that_does_not_import(monkeypatch):
    _fake_pytorch_fid(monkeypatch, import_error=ModuleNotFoundError("No module named 'torchvision'"))
    reason = metrics.pd_unavailable_reason()
    assert "does not import" in reason and "torchvision" in reason


class FakeInception:
    """Shape-faithful stand-in for pytorch-fid's InceptionV3 (never used for a reported figure)."""
    BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}

    def __init__(self, blocks):
        assert blocks == [3]

    def to(self, device):
        return self

    def eval(self):
        return self

    def __call__(self, x):
        assert x.shape[:2] == (1, 3) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        means = x.mean(dim=(2, 3))  # (1, 3)
        feats = torch.cat([means.repeat(1, 682), means[:, :2]], dim=1)  # (1, 2048)
        return [feats[:, :, None, None].repeat(1, 1, 2, 2)]  # spatial 2x2: the caller must pool it


def test_pd_needs_locally_cached_weights_and_never_downloads(monkeypatch, tmp_path, photo):
    pytest.importorskip("PIL", reason="Pillow (needed only with pytorch-fid, for PD) is not installed")
    _fake_pytorch_fid(monkeypatch, FakeInception)
    monkeypatch.setattr(metrics, "torch_hub_checkpoints_dir", lambda: tmp_path / "checkpoints")
    reason = metrics.pd_unavailable_reason()
    weights = tmp_path / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert reason is not None and str(weights) in reason and "never downloads" in reason
    with pytest.raises(RuntimeError, match="weights"):
        metrics.InceptionFeatures("cpu")

    weights.parent.mkdir()
    weights.write_bytes(b"")
    assert metrics.pd_unavailable_reason() is None
    features = metrics.InceptionFeatures("cpu")
    fa = features(photo)
    assert fa.shape == (2048,) and fa.dtype == np.float64
    darker = (photo // 2).astype(np.uint8)
    fb = features(darker)
    assert features.distance(photo, photo) == 0.0
    assert features.distance(photo, darker) == pytest.approx(np.linalg.norm(fa - fb)) and fa[0] > fb[0]
