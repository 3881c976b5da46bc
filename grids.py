"""Swap grids, drawn one way for inference.py's PNGs and training.py's TensorBoard images.

A grid has the sources (one test image per digit) along the top row and down the first column, and in
cell (r, c) the decoder's output for the style of row image r and the class code of column c; the
corner is blank.
"""
from __future__ import annotations

import torch

from evaluation import sample_per_label

NUM_DIGITS = 10
CELL = 28  # pixels of one image
GAP = 2  # white pixels between neighbouring cells
SEPARATOR = 8  # white pixels between the source row/column and the generated cells


def reference_indices(labels: torch.Tensor, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """Test-set indices of one image per digit 0-9: the first of each digit, or a random one."""
    return sample_per_label(labels, list(range(NUM_DIGITS)), 1, generator=None if mode == "fixed" else generator
                            ).flatten()


@torch.no_grad()
def swap_cells(decoder: torch.nn.Module, style: torch.Tensor, class_codes: torch.Tensor) -> torch.Tensor:
    """Decoded images [R, C, 1, 28, 28]: style code r with class code c, every pair."""
    rows, cols = len(style), len(class_codes)
    images = decoder(style.repeat_interleave(cols, 0), class_codes.repeat(rows, 1))
    return images.view(rows, cols, 1, CELL, CELL)


def cell_offset(index: int) -> int:
    """Pixel offset of row or column `index` of the grid; index 0 holds the sources."""
    return index * (CELL + GAP) + (SEPARATOR - GAP if index > 0 else 0)


def grid_image(sources: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The whole picture [1, H, W] on a white background: sources along the top and the left, the
    generations [R, C, 1, 28, 28] inside, and a blank corner."""
    size = cell_offset(NUM_DIGITS) + CELL
    canvas = torch.ones(1, size, size)
    sources, cells = sources.cpu(), cells.cpu()  # one copy each, not one per cell

    def put(row: int, col: int, image: torch.Tensor) -> None:
        top, left = cell_offset(row), cell_offset(col)
        canvas[:, top:top + CELL, left:left + CELL] = image

    for i, image in enumerate(sources, start=1):
        put(0, i, image)
        put(i, 0, image)
    for r in range(cells.shape[0]):
        for c in range(cells.shape[1]):
            put(r + 1, c + 1, cells[r, c])
    return canvas
