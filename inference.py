"""Swap grids: decode the style of one test image with the class code of another.

The top row holds ten class sources (one test image per digit 0-9) and the first column ten style
sources (the same ten images, so the diagonal is a plain reconstruction). Cell (r, c) is the decoder's
output for the style of row image r and the class code of column c; the corner is blank. Codes are
posterior means. With --accumulate-evidence a column's class code is the accumulated posterior of
several test images of its digit instead of its one image's posterior.

    python inference.py                                  # writes out/swap_mlvae_eps0.1_no_evidence.png
    python inference.py --accumulate-evidence --reference random --seed 3 --out out/swap_evidence.png
    python inference.py --eps-std 0.1 --out out/reference_swap_eps0.1_no_evidence.png \\
        --encoder $MLVAE_REFERENCE_DIR/encoder_0.1_var_reparam \\
        --decoder $MLVAE_REFERENCE_DIR/decoder_0.1_var_reparam

`--reference fixed` takes the first image of each digit in the test split (MNIST test indices
3, 2, 1, 18, 4, 8, 11, 0, 61, 7 for digits 0-9), the same on every machine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

import data_loader
from evaluation import encode, sample_per_label
from grids import NUM_DIGITS, grid_image, reference_indices, swap_cells
from runs import (IMAGE_SUFFIXES, POSITIVE_INT, UserError, add_model_arguments, check_label_counts, check_writable,
                  device_and_models, reports_errors, repository_path, script_parser)
from utils import accumulate_group_evidence

EVIDENCE_BATCH = 256  # the reference accumulates the evidence of one random test batch of this size


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    add = parser.add_argument
    add("--reference", choices=("fixed", "random"), default="fixed",
        help="fixed: the first test image of each digit; random: a random one per digit (see --seed)")
    add("--accumulate-evidence", action="store_true",
        help="class code of a column = accumulated posterior of several test images of its digit")
    add("--evidence-size", type=POSITIVE_INT, default=None,
        help=f"test images per digit to accumulate (default: those of one random test batch of "
             f"{EVIDENCE_BATCH}, about {EVIDENCE_BATCH // NUM_DIGITS} per digit, as the reference does)")
    add("--seed", type=int, default=0, help="seed of --reference random and of the evidence images")
    add("--out", default=None, help="PNG path (default: out/swap_<run>_<no_evidence|evidence>.png in the repository)")
    return parser


def evidence_indices(labels: torch.Tensor, evidence_size: int | None, generator: torch.Generator) -> torch.Tensor:
    """Test-set indices whose class posteriors are accumulated per digit.

    Default: one random batch of EVIDENCE_BATCH test images; else `evidence_size` random images of each digit.
    """
    if evidence_size is None:
        return torch.randperm(len(labels), generator=generator, device=labels.device)[:EVIDENCE_BATCH]
    return sample_per_label(labels, list(range(NUM_DIGITS)), evidence_size, generator=generator).flatten()


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    device, encoder, decoder, settings = device_and_models(parser, args)
    evidence = "evidence" if args.accumulate_evidence else "no_evidence"
    out = check_writable(args.out or repository_path(f"out/swap_{settings.name}_{evidence}.png"), "--out",
                         IMAGE_SUFFIXES)
    images, labels = data_loader.load_split(args.data_dir, "test", settings.dataset, device)
    needed = args.evidence_size if args.accumulate_evidence and args.evidence_size else 1
    check_label_counts(labels, range(NUM_DIGITS), needed, f"{settings.dataset} test", "--evidence-size")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sources = images[reference_indices(labels, args.reference, generator)]
    style_mu, _, class_mu, _ = encode(encoder, sources)
    if args.accumulate_evidence:
        index = evidence_indices(labels, args.evidence_size, generator)
        missing = sorted(set(range(NUM_DIGITS)) - set(labels[index].tolist()))
        if missing:
            raise UserError(f"the random batch of {EVIDENCE_BATCH} evidence images holds no image of the digit(s) "
                            f"{missing}; pass --evidence-size or another --seed")
        _, _, mu, logvar = encode(encoder, images[index])
        group_mu, _ = accumulate_group_evidence(mu, logvar, labels[index])
        # Every member of a group carries its group's mean; take one row per digit.
        first = torch.stack([(labels[index] == digit).nonzero()[0, 0] for digit in range(NUM_DIGITS)])
        class_mu = group_mu[first]
    canvas = grid_image(sources, swap_cells(decoder, style_mu, class_mu))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(canvas, out)
    print(f"Saved the {NUM_DIGITS + 1}x{NUM_DIGITS + 1} swap grid ({evidence.replace('_', ' ')}, "
          f"{args.reference} references) of {settings.encoder_path} to {out}")
    return out


if __name__ == "__main__":
    main()
