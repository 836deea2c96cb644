"""What the image stages share: the canonical pixel column, numpy views of it, image keys, PNG grids.

Canonical image rows are ``id: string, pixels: fixed_size_list<uint8>[H*W], label: string``: one
greyscale image per row, row-major, 0 (black) to 255 (white), as in the IDX files. The image shape
``[H, W]`` travels in each stage's ``extra["image_shape"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

PIXEL_MAX = 255


def pixels_type(n_pixels: int) -> pa.DataType:
    """Arrow type of the pixel column for images of ``n_pixels`` pixels."""
    return pa.list_(pa.uint8(), n_pixels)


def schema(n_pixels: int) -> pa.Schema:
    """The canonical ``id, pixels, label`` schema."""
    return pa.schema([("id", pa.string()), ("pixels", pixels_type(n_pixels)), ("label", pa.string())])


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list<uint8>[n]`` column as a (rows, n) uint8 array (a copy only when chunked)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    n = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.uint8).reshape(len(column), n)


def pixels_array(pixels: np.ndarray) -> pa.FixedSizeListArray:
    """(rows, n) uint8 -> the canonical pixel column."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1), pa.uint8()), pixels.shape[1])


def table(ids: Sequence[str] | pa.Array, pixels: np.ndarray, labels: Sequence[str] | pa.Array) -> pa.Table:
    """A canonical image table from ids, (rows, n) uint8 pixels and labels."""
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()) if not isinstance(ids, pa.Array) else ids.cast(pa.string()),
         pixels_array(pixels),
         pa.array(labels, pa.string()) if not isinstance(labels, pa.Array) else labels.cast(pa.string())],
        schema=schema(pixels.shape[1]),
    )


def image_keys(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Identical images share a key: (key per row, first row of each key).

    Keys are numbered in byte order of the images, so they do not depend on the row order.
    """
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.ascontiguousarray(pixels, dtype=np.uint8)
    view = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), first.astype(np.int64)


def shared_images(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``a`` whose image also occurs in ``b``: (mask over a, index of the first matching row of b, -1 if none)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), dtype=bool), np.full(len(a), -1, dtype=np.int64)
    keys, _ = image_keys(np.concatenate([a, b]))
    key_a, key_b = keys[: len(a)], keys[len(a):]
    first_b = np.full(int(keys.max()) + 1, -1, dtype=np.int64)
    # reversed so that the first occurrence in b is the one left in first_b
    first_b[key_b[::-1]] = np.arange(len(b) - 1, -1, -1)
    match = first_b[key_a]
    return match >= 0, match


def short_id(row_id: str) -> str:
    """``train-images-idx3-ubyte.gz:#12`` -> ``#12`` (for captions; ids without a colon stay whole)."""
    return row_id.rsplit(":", 1)[-1] if ":" in row_id else row_id


def montage(images: np.ndarray, image_shape: Sequence[int], cols: int, top: int, gap: int) -> np.ndarray:
    """Flat images (n, H*W) tiled row by row on a white sheet, each with ``top`` empty rows above it
    (for a caption) and ``gap`` columns on either side."""
    height, width = (int(v) for v in image_shape)
    n = len(images)
    rows = max(1, -(-n // cols))
    cell_h, cell_w = height + top, width + 2 * gap
    out = np.full((rows * cell_h, cols * cell_w), PIXEL_MAX, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * cell_h + top, c * cell_w + gap
        out[y : y + height, x : x + width] = np.asarray(images[i], dtype=np.uint8).reshape(height, width)
    return out


def grid_png(
    images: np.ndarray, image_shape: Sequence[int], captions: Sequence[str], path: Path, title: str, cols: int = 6
) -> None:
    """Write images (white digits on black, as stored) as one captioned grid, drawn as a single picture."""
    from matplotlib.figure import Figure

    height, width = (int(v) for v in image_shape)
    n = len(images)
    cols = max(1, min(cols, n))
    lines = max((str(c).count("\n") + 1 for c in captions[:n]), default=1)
    top, gap = max(6, round(height * 0.3 * lines)), max(2, width // 5)
    sheet = montage(images, image_shape, cols, top, gap)
    fig_w = max(4.0, 1.4 * cols)
    fig = Figure(figsize=(fig_w, fig_w * sheet.shape[0] / sheet.shape[1] + 0.45))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - 0.45 / fig.get_figheight()))
    ax.set_axis_off()
    ax.imshow(sheet, cmap="gray", vmin=0, vmax=PIXEL_MAX, interpolation="nearest")
    for i, caption in enumerate(captions[:n]):
        r, c = divmod(i, cols)
        ax.text(c * (width + 2 * gap) + gap + width / 2, r * (height + top) + top - 1, caption,
                ha="center", va="bottom", fontsize=7)
    if n == 0:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=9, y=0.995, va="top")
    fig.savefig(path, dpi=100)
