"""grids.py: cell (r, c) of a swap grid is the decoder's output for the style of row r and the class code of
column c, drawn at row r and column c of the picture, with the sources along the top and the left."""
import torch
from torch import nn

import grids

CELL = 28  # MNIST; grid_image takes any image size


class CodeRevealingDecoder(nn.Module):
    """Images whose top half holds the first style coordinate and whose bottom half the first class one."""

    def forward(self, style: torch.Tensor, class_: torch.Tensor) -> torch.Tensor:
        half = CELL // 2 * CELL
        return torch.cat([style[:, :1].expand(-1, half), class_[:, :1].expand(-1, half)], 1).view(-1, 1, CELL, CELL)


def test_swap_cell_r_c_decodes_the_style_of_row_r_with_the_class_code_of_column_c():
    style = torch.tensor([[1.0], [2.0], [3.0]])
    class_codes = torch.tensor([[10.0, 0.0], [20.0, 0.0]])  # fewer columns than rows, another dimension
    cells = grids.swap_cells(CodeRevealingDecoder(), style, class_codes)
    assert cells.shape == (3, 2, 1, CELL, CELL)
    for r in range(3):
        for c in range(2):
            assert (cells[r, c, 0, : CELL // 2] == style[r, 0]).all()
            assert (cells[r, c, 0, CELL // 2:] == class_codes[c, 0]).all()


def test_grid_image_draws_the_sources_and_cell_r_c_at_row_r_and_column_c():
    digits = grids.GRID_GROUPS
    sources = (torch.arange(1, digits + 1) / 100).view(digits, 1, 1, 1).expand(digits, 1, CELL, CELL)
    values = (torch.arange(digits).view(digits, 1) * digits + torch.arange(digits)) / 200  # distinct, below 1
    cells = values.view(digits, digits, 1, 1, 1).expand(digits, digits, 1, CELL, CELL)
    canvas = grids.grid_image(sources, cells)

    def patch(row: int, col: int) -> torch.Tensor:
        top, left = grids.cell_offset(row, CELL), grids.cell_offset(col, CELL)
        return canvas[0, top:top + CELL, left:left + CELL]

    assert (patch(0, 0) == 1).all()  # the blank corner
    for i in range(digits):
        assert torch.equal(patch(0, i + 1), sources[i, 0]) and torch.equal(patch(i + 1, 0), sources[i, 0])
        for j in range(digits):
            assert torch.equal(patch(i + 1, j + 1), cells[i, j, 0])
    assert int((canvas != 1).sum()) == (2 * digits + digits * digits) * CELL * CELL  # white between the cells
