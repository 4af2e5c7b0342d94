from __future__ import annotations

import cv2
import numpy as np
import pytest

from photos import photo
from sdcanny.image import canny, hwc3, resize_image, validate_image, work_image_and_edges, work_size


def bgr(rgb):
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)


def test_resize_shapes_on_real_photos():
    assert resize_image(photo("chelsea"), 256).shape == (256, 384, 3)  # 300x451 -> 256x384.9
    assert resize_image(photo("astronaut"), 256).shape == (256, 256, 3)
    assert resize_image(photo("coffee"), 512).shape == (512, 768, 3)  # 400x600, enlarged
    assert resize_image(photo("rocket"), 100).shape == (128, 128, 3)  # 427x640 -> 100x149.9 -> 2x64, 2x64


def test_work_size_rounds_as_the_originals_numpy_formula():
    """Against resize_image's formula in the original (np.round: ties to even), over sizes whose
    scaled sides land on halves (352 / 64 = 5.5 -> 6, 288 / 64 = 4.5 -> 4) and everywhere between."""
    def original(h, w, resolution):
        k = float(resolution) / min(h, w)
        return int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64

    assert work_size(352, 256, 256) == (384, 256) and work_size(288, 256, 256) == (256, 256)
    for h in range(1, 1200, 7):
        for w in (h, 96, 300, 451, 1013):
            for resolution in (64, 100, 256, 512, 768):
                assert work_size(h, w, resolution) == original(h, w, resolution), (h, w, resolution)
    assert all(type(side) is int for side in work_size(300, 451, 256))


def test_halving_with_area_interpolation_is_the_2x2_block_mean():
    img = photo("astronaut")  # 512 x 512
    out = resize_image(img, 256).astype(np.float64)
    block_mean = img.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(out - block_mean).max() <= 0.5 + 1e-9


def test_scale_one_keeps_the_image_and_enlarging_uses_lanczos():
    img = photo("coffee")[:256, :384]
    assert np.array_equal(resize_image(img, 256), img)
    # 260 enlarges (Lanczos) but rounds back to 256x384: cv2.resize gives the same pixels then, and
    # resize_image hands back the image itself
    for resolution in (256, 260):
        assert resize_image(img, resolution) is img
        interpolation = cv2.INTER_LANCZOS4 if resolution > 256 else cv2.INTER_AREA
        assert np.array_equal(cv2.resize(img, (384, 256), interpolation=interpolation), img)
    small = img[:128, :192]
    up = resize_image(small, 256)
    assert np.array_equal(up, cv2.resize(small, (384, 256), interpolation=cv2.INTER_LANCZOS4))
    assert not np.array_equal(up, cv2.resize(small, (384, 256), interpolation=cv2.INTER_LINEAR))


def test_a_view_at_the_work_size_gives_the_edges_of_its_copy():
    """resize_image hands a view at the work size to cv2.Canny as it is (no copy of its own): a
    channel-reversed view, a view of every other column and a Fortran-ordered array give the edges
    of their contiguous copies."""
    img = photo("coffee")  # 400 x 600
    wide = np.concatenate([img, img], axis=1)
    views = [img[:256, :384, ::-1], wide[:256, :768:2], np.asfortranarray(img[:256, :384])]
    for view in views:
        assert view.shape == (256, 384, 3) and not view.flags["C_CONTIGUOUS"]
        edges = work_image_and_edges(view, 256, 100, 200)[1]
        assert edges.any()
        assert np.array_equal(edges, work_image_and_edges(np.ascontiguousarray(view), 256, 100, 200)[1])


def test_canny_on_a_step_edge_and_a_real_photo():
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert canny(flat, 100, 200).max() == 0
    step = flat.copy()
    step[:, 32:] = 250
    edges = canny(step, 100, 200)
    cols = np.nonzero(edges.any(axis=0))[0]
    assert set(np.unique(edges)) == {0, 255} and cols.min() >= 30 and cols.max() <= 33
    assert edges[2:-2].any(axis=1).all()  # one edge pixel in every inner row
    edges = canny(resize_image(photo("chelsea"), 256), 100, 200)
    assert edges.shape == (256, 384) and set(np.unique(edges)) == {0, 255}
    assert 0.01 < (edges > 0).mean() < 0.3
    assert (canny(resize_image(photo("chelsea"), 256), 50, 100) > 0).sum() > (edges > 0).sum()


def test_hwc3():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = hwc3(gray)
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    colour = np.zeros((2, 2, 3), np.uint8)
    assert hwc3(colour) is colour


@pytest.mark.parametrize("image, message", [
    (None, "None"),
    ([[1, 2]], "numpy array"),
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8), np.uint8), "H x W x 3"),
    (np.zeros((8, 8, 4), np.uint8), "H x W x 3"),
    (np.zeros((0, 8, 3), np.uint8), "empty"),
])
def test_validate_image(image, message):
    with pytest.raises(ValueError, match=message):
        validate_image(image)
