"""Swap grids: decode the style of one test image with the class code of another.

The top row holds ten class sources (one test image per digit 0-9) and the first column ten style
sources (the same ten images, so the diagonal is a plain reconstruction). Cell (r, c) is the decoder's
output for the style of row image r and the class code of column c; the corner is blank. Codes are
posterior means. With --accumulate-evidence a column's class code is the accumulated posterior of
several test images of its digit instead of its one image's posterior.

    python inference.py                                  # images/swap_mlvae_eps0.1_no_evidence.png
    python inference.py --accumulate-evidence --reference random --seed 3
    python inference.py --eps-std 0.1 --out images/reference_swap_eps0.1_no_evidence.png \\
        --encoder ../shared/reference/checkpoints/encoder_0.1_var_reparam \\
        --decoder ../shared/reference/checkpoints/decoder_0.1_var_reparam

`--reference fixed` takes the first image of each digit in the test split (MNIST test indices
3, 2, 1, 18, 4, 8, 11, 0, 61, 7 for digits 0-9), the same on every machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

import data_loader
from evaluation import encode, sample_per_label
from runs import add_model_arguments, device_and_models, script_parser
from utils import accumulate_group_evidence

NUM_DIGITS = 10
CELL = 28  # pixels of one image
GAP = 2  # white pixels between neighbouring cells
SEPARATOR = 8  # white pixels between the source row/column and the generated cells
EVIDENCE_BATCH = 256  # the reference accumulates the evidence of one random test batch of this size


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    add = parser.add_argument
    add("--reference", choices=("fixed", "random"), default="fixed",
        help="fixed: the first test image of each digit; random: a random one per digit (see --seed)")
    add("--accumulate-evidence", action="store_true",
        help="class code of a column = accumulated posterior of several test images of its digit")
    add("--evidence-size", type=int, default=None,
        help=f"test images per digit to accumulate (default: those of one random test batch of "
             f"{EVIDENCE_BATCH}, about {EVIDENCE_BATCH // NUM_DIGITS} per digit, as the reference does)")
    add("--seed", type=int, default=0, help="seed of --reference random and of the evidence images")
    add("--out", default=None, help="PNG path (default: images/swap_<run>_<no_evidence|evidence>.png)")
    return parser


def reference_indices(labels: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Test-set indices of one image per digit 0-9: the first of each digit, or a random one."""
    return sample_per_label(labels, list(range(NUM_DIGITS)), 1, generator=None if mode == "fixed" else generator
                            ).flatten()


def evidence_indices(labels: torch.Tensor, evidence_size: int | None, generator: torch.Generator) -> torch.Tensor:
    """Test-set indices whose class posteriors are accumulated per digit.

    Default: one random batch of EVIDENCE_BATCH test images; else `evidence_size` random images of each digit.
    """
    if evidence_size is None:
        return torch.randperm(len(labels), generator=generator, device=labels.device)[:EVIDENCE_BATCH]
    return sample_per_label(labels, list(range(NUM_DIGITS)), evidence_size, generator=generator).flatten()


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

    def put(row: int, col: int, image: torch.Tensor) -> None:
        top, left = cell_offset(row), cell_offset(col)
        canvas[:, top:top + CELL, left:left + CELL] = image.cpu()

    for i, image in enumerate(sources, start=1):
        put(0, i, image)
        put(i, 0, image)
    for r in range(cells.shape[0]):
        for c in range(cells.shape[1]):
            put(r + 1, c + 1, cells[r, c])
    return canvas


def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.evidence_size is not None and args.evidence_size < 1:
        parser.error("--evidence-size must be at least 1")
    device, encoder, decoder, settings = device_and_models(parser, args)
    try:
        images, labels = data_loader.load_split(args.data_dir, "test", settings.dataset, device)
    except data_loader.DatasetFileError as error:
        sys.exit(f"error: {error}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sources = images[reference_indices(labels, args.reference, generator)]
    style_mu, _, class_mu, _ = encode(encoder, sources)
    if args.accumulate_evidence:
        index = evidence_indices(labels, args.evidence_size, generator)
        _, _, mu, logvar = encode(encoder, images[index])
        group_mu, _ = accumulate_group_evidence(mu, logvar, labels[index])
        # Every member of a group carries its group's mean; take one row per digit.
        first = torch.stack([(labels[index] == digit).nonzero()[0, 0] for digit in range(NUM_DIGITS)])
        class_mu = group_mu[first]
    canvas = grid_image(sources, swap_cells(decoder, style_mu, class_mu))
    evidence = "evidence" if args.accumulate_evidence else "no_evidence"
    out = Path(args.out or f"images/swap_{settings.name}_{evidence}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(canvas, out)
    print(f"Saved the {NUM_DIGITS + 1}x{NUM_DIGITS + 1} swap grid ({evidence.replace('_', ' ')}, "
          f"{args.reference} references) of {settings.encoder_path} to {out}")
    return out


if __name__ == "__main__":
    main()
