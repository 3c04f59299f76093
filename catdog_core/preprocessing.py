"""The last step from a decoded image to a model input row, shared by training, build and service."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_array(image: Image.Image, target_size: tuple[int, int]) -> np.ndarray:
    """Resize (squash) an RGB image to target_size=(width, height) and return HxWx3 uint8."""
    if image.size != target_size:
        image = image.resize(target_size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
