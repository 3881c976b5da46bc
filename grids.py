"""Swap grids, drawn one way for inference.py's PNGs and training.py's TensorBoard images.

A grid has the sources (one test image per group: a digit, or a folder data set's group) along the top
row and down the first column, and in cell (r, c) the decoder's output for the style of row image r and
the class code of column c; the corner is blank. Images of any size and of 1 or 3 channels.
"""
from __future__ import annotations

import torch

from evaluation import sample_per_label

GRID_GROUPS = 10  # groups along each side of a grid unless chosen: the ten digits of MNIST
GAP = 2  # white pixels between neighbouring cells
SEPARATOR = 8  # white pixels between the source row/column and the generated cells


def reference_indices(labels: torch.Tensor, groups: list[int], mode: str,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Indices of one image per label of `groups`: the first of each, or a random one."""
    return sample_per_label(labels, groups, 1, generator=None if mode == "fixed" else generator).flatten()


@torch.no_grad()
def swap_cells(decoder: torch.nn.Module, style: torch.Tensor, class_codes: torch.Tensor) -> torch.Tensor:
    """Decoded images [R, C, channels, H, W]: style code r with class code c, every pair."""
    rows, cols = len(style), len(class_codes)
    images = decoder(style.repeat_interleave(cols, 0), class_codes.repeat(rows, 1))
    return images.view(rows, cols, *images.shape[1:])


def cell_offset(index: int, cell: int) -> int:
    """Pixel offset of row or column `index` of a grid of `cell`-pixel images; index 0 holds the sources."""
    return index * (cell + GAP) + (SEPARATOR - GAP if index > 0 else 0)


def grid_image(sources: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The whole picture [channels, H', W'] on a white background: the sources [N, channels, h, w]
    along the top and the left, the generations [N, N, channels, h, w] inside, and a blank corner."""
    channels, height, width = sources.shape[1:]
    canvas = torch.ones(channels, cell_offset(len(sources), height) + height, cell_offset(len(sources), width) + width)
    sources, cells = sources.cpu(), cells.cpu()  # one copy each, not one per cell

    def put(row: int, col: int, image: torch.Tensor) -> None:
        top, left = cell_offset(row, height), cell_offset(col, width)
        canvas[:, top:top + height, left:left + width] = image

    for i, image in enumerate(sources, start=1):
        put(0, i, image)
        put(i, 0, image)
    for r in range(cells.shape[0]):
        for c in range(cells.shape[1]):
            put(r + 1, c + 1, cells[r, c])
    return canvas
