"""Image grids: uint8 NHWC batches -> one tiled uint8 image, written as PNG with Pillow."""

from __future__ import annotations

import io
import math

import numpy as np

from ddpm_jax import files


def make_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image.

    Gaps are white-ish (255) so dark digits stay visible; C is 1 or 3.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"make_grid expects uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(images: np.ndarray, path: str, *, scale: int | None = None) -> str:
    """Writes the grid of `images` to `path` (directories created); small images are upscaled."""
    from PIL import Image

    grid = make_grid(images)
    if scale is None:  # make 8x8 digits visible: aim for a grid at least ~256 px wide
        scale = max(1, 256 // grid.shape[1])
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    png = io.BytesIO()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(png, format="PNG")
    files.write_bytes_atomically(path, png.getvalue())  # also a gs:// workdir (needs gcsfs)
    return path
