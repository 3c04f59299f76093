"""The benchmark's photos: a real photo at its own size (~500x375) and upscaled to 12 MP."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "catdog-web" / "cat"


def _source() -> Image.Image:
    photos = sorted(SHARED_PHOTOS.glob("*.jpg")) if SHARED_PHOTOS.is_dir() else []
    if photos:
        return Image.open(photos[0]).convert("RGB")
    # No dataset on this machine: a synthetic stand-in with photo-like size and entropy.
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (94, 125, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((500, 375), Image.Resampling.BICUBIC)


def write_bench_images(folder: Path) -> dict[str, Path]:
    """{'small': ~500x375 JPEG, 'large': 4000x3000 JPEG} written into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    source = _source()
    small = source.resize((500, 375), Image.Resampling.BICUBIC) if source.size[0] < 450 else source
    large = source.resize((4000, 3000), Image.Resampling.BICUBIC)
    paths = {}
    for name, image in (("small", small), ("large", large)):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        paths[name] = folder / f"{name}.jpg"
        paths[name].write_bytes(buffer.getvalue())
    return paths
