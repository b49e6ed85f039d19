"""Real photographs that ship with scikit-image (``skimage.data``), written as PNG folders for training/eval.

Nothing is downloaded: only images stored inside the scikit-image package are used. The shipped model was
trained on :data:`TRAIN_PHOTOS` and evaluated on :data:`HELDOUT_PHOTOS`, which share no scene (the stereo
pair's two views are both on the training side).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

#: name -> loader returning an HxW or HxWx3 uint8 photograph (all bundled with scikit-image, no download)
_LOADERS = {
    "astronaut": lambda d: d.astronaut(),
    "camera": lambda d: d.camera(),
    "chelsea": lambda d: d.chelsea(),
    "coffee": lambda d: d.coffee(),
    "coins": lambda d: d.coins(),
    "rocket": lambda d: d.rocket(),
    "motorcycle_left": lambda d: d.stereo_motorcycle()[0],
    "motorcycle_right": lambda d: d.stereo_motorcycle()[1],
    "brick": lambda d: d.brick(),
    "grass": lambda d: d.grass(),
    "gravel": lambda d: d.gravel(),
    "moon": lambda d: d.moon(),
    "hubble_deep_field": lambda d: d.hubble_deep_field(),
    "immunohistochemistry": lambda d: d.immunohistochemistry(),
    "retina": lambda d: d.retina(),
    "page": lambda d: d.page(),
    "text": lambda d: d.text(),
}
PHOTOS = tuple(_LOADERS)
TRAIN_PHOTOS = (
    "coffee", "rocket", "motorcycle_left", "motorcycle_right", "brick", "grass", "gravel", "moon",
    "hubble_deep_field", "immunohistochemistry", "retina", "page", "text",
)
HELDOUT_PHOTOS = ("astronaut", "camera", "chelsea", "coins")


def photo(name: str) -> np.ndarray:
    """The bundled photograph ``name`` as an HxWx3 uint8 array (grey ones replicated to RGB)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown skimage photograph {name!r}; available: {', '.join(PHOTOS)}")
    from skimage import data

    img = np.asarray(_LOADERS[name](data))
    if img.dtype != np.uint8:
        raise ValueError(f"skimage photograph {name!r} is {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def materialize(names: list[str] | tuple[str, ...], folder: str | os.PathLike) -> Path:
    """Write the photographs ``names`` as ``folder/<name>.png`` (atomically; an existing file with the same
    pixels is kept, one with other content is an error rather than being overwritten). Returns ``folder``."""
    from PIL import Image

    from .._io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        img = photo(n)
        path = folder / f"{n}.png"
        if path.exists():
            with Image.open(path) as im:
                old = np.asarray(im.convert("RGB"))
            if old.shape == img.shape and np.array_equal(old, img):
                continue
            raise ValueError(f"{path} exists with different content; refusing to overwrite it")
        atomic_write(path, lambda f, img=img: Image.fromarray(img).save(f, format="PNG"))
    return folder


def folder_for(names: list[str] | tuple[str, ...], cache_root: str | os.PathLike) -> Path:
    """``materialize(names, ...)`` into a cache folder named after the list, reused across runs."""
    key = hashlib.sha1(",".join(names).encode()).hexdigest()[:10]
    return materialize(names, Path(cache_root) / f"skimage_{key}")
