"""Test photographs: scikit-image's bundled ones where it is installed (it is optional: the
hackathon docker lacks it), else generated stand-ins for tests that only need an image with edges;
tests that need a particular photograph skip without it, saying so."""
from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from sdcanny.image import stand_in_photo

HAS_SKIMAGE = importlib.util.find_spec("skimage") is not None
STAND_IN_VARIANTS = {"chelsea": 0, "coffee": 1, "astronaut": 2, "rocket": 3}


def photo(name: str, stand_in_shape: tuple | None = None) -> np.ndarray:
    """skimage.data.<name>() as BGR; without scikit-image, a stand-in of `stand_in_shape`, or a skip."""
    if HAS_SKIMAGE:
        import skimage.data
        rgb = getattr(skimage.data, name)()
        return cv2.cvtColor(rgb, cv2.COLOR_GRAY2BGR if rgb.ndim == 2 else cv2.COLOR_RGB2BGR)
    if stand_in_shape is None:
        pytest.skip(f"needs scikit-image's {name} photograph (scikit-image is optional and not installed)")
    return stand_in_photo(stand_in_shape, STAND_IN_VARIANTS.get(name, 4))
