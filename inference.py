"""Swap grids: decode the style of one test image with the class code of another.

The top row holds the class sources (one test image per group: the digits 0-9, or the first ten
groups of a folder data set, or those --groups names) and the first column the style sources (the same
images, so the diagonal is a plain reconstruction). Cell (r, c) is the decoder's output for the style
of row image r and the class code of column c; the corner is blank. Codes are posterior means. With
--accumulate-evidence a column's class code is the accumulated posterior of several test images of its
group instead of its one image's posterior. Colour data give colour grids.

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
from grids import GRID_GROUPS, grid_image, reference_indices, swap_cells
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
        help=f"test images per group to accumulate (default: those of one random test batch of "
             f"{EVIDENCE_BATCH}, about {EVIDENCE_BATCH // GRID_GROUPS} per digit on MNIST, as the reference does)")
    add("--groups", nargs="+", default=None, metavar="NAME",
        help=f"the test groups of the grid, by name (default: the first {GRID_GROUPS}; on MNIST the digits 0-9)")
    add("--num-groups", type=POSITIVE_INT, default=GRID_GROUPS, help="how many first groups when --groups is not given")
    add("--seed", type=int, default=0, help="seed of --reference random and of the evidence images")
    add("--out", default=None, help="PNG path (default: out/swap_<run>_<no_evidence|evidence>.png in the repository)")
    return parser


def evidence_indices(labels: torch.Tensor, groups: list[int], evidence_size: int | None,
                     generator: torch.Generator) -> torch.Tensor:
    """Test-set indices whose class posteriors are accumulated per group.

    Default: one random batch of EVIDENCE_BATCH test images; else `evidence_size` random images of each
    group of `groups`.
    """
    if evidence_size is None:
        return torch.randperm(len(labels), generator=generator, device=labels.device)[:EVIDENCE_BATCH]
    return sample_per_label(labels, groups, evidence_size, generator=generator).flatten()


def grid_groups(names: list[str], chosen: list[str] | None, count: int) -> list[int]:
    """The label ids of the grid's groups: those named in `chosen`, else the first `count`."""
    if chosen is None:
        return list(range(min(count, len(names))))
    ids = {name: i for i, name in enumerate(names)}
    missing = [name for name in chosen if name not in ids]
    if missing:
        raise UserError(f"--groups: the test split has no group named {', '.join(map(repr, missing))}; its groups "
                        f"include {', '.join(map(repr, names[:5]))}")
    return [ids[name] for name in chosen]


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    device, encoder, decoder, settings = device_and_models(parser, args)
    evidence = "evidence" if args.accumulate_evidence else "no_evidence"
    out = check_writable(args.out or repository_path(f"out/swap_{settings.name}_{evidence}.png"), "--out",
                         IMAGE_SUFFIXES)
    images, labels, names = data_loader.labelled_images(settings.data, "test", device)
    groups = grid_groups(names, args.groups, args.num_groups)
    needed = args.evidence_size if args.accumulate_evidence and args.evidence_size else 1
    check_label_counts(labels, groups, needed, f"{settings.dataset} test", "--evidence-size")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sources = images[reference_indices(labels, groups, args.reference, generator)]
    style_mu, _, class_mu, _ = encode(encoder, sources)
    if args.accumulate_evidence:
        index = evidence_indices(labels, groups, args.evidence_size, generator)
        missing = sorted(set(groups) - set(labels[index].tolist()))
        if missing:
            raise UserError(f"the random batch of {EVIDENCE_BATCH} evidence images holds no image of the group(s) "
                            f"{[names[i] for i in missing]}; pass --evidence-size or another --seed")
        _, _, mu, logvar = encode(encoder, images[index])
        group_mu, _ = accumulate_group_evidence(mu, logvar, labels[index])
        # Every member of a group carries its group's mean; take one row per group.
        first = torch.stack([(labels[index] == group).nonzero()[0, 0] for group in groups])
        class_mu = group_mu[first]
    canvas = grid_image(sources, swap_cells(decoder, style_mu, class_mu))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(canvas, out)
    print(f"Saved the {len(groups) + 1}x{len(groups) + 1} swap grid ({evidence.replace('_', ' ')}, "
          f"{args.reference} references) of {settings.encoder_path} to {out}")
    return out


if __name__ == "__main__":
    main()
