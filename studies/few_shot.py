"""Few-shot classification of classes the model never saw, from class codes, beside a pixel baseline.

Train a model with some labels held out (`python training.py --epochs 100 --classes 0 1 2 3 4 5 6 7`),
then, for S labelled training images of each held-out class (S = 1, 5, 10), build one prototype per
class and label every held-out test image by its nearest prototype. With class codes the prototype is
the group posterior mean of the S shots, fused by evidence accumulation; in the pixel baseline it is
the mean image. Averaged over `--trials` random draws of the shots.

    python -m studies.few_shot --checkpoint-dir checkpoints/mlvae_eps0.1_classes01234567 --held-out 8 9
"""
from __future__ import annotations

import argparse
import json

import torch

import data_loader
from evaluation import encode, sample_per_label
from runs import (POSITIVE_INT, Bounded, add_model_arguments, check_finite, check_label_counts, check_writable,
                  device_and_models, reports_errors, repository_path, script_parser, write_text_atomic)
from utils import fused_means


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.set_defaults(checkpoint_dir=repository_path("checkpoints/mlvae_eps0.1_classes01234567"))
    parser.add_argument("--held-out", type=int, nargs="+", choices=range(10), metavar="LABEL", default=[8, 9],
                        help="labels unseen in training (at least two)")
    parser.add_argument("--shots", type=POSITIVE_INT, nargs="+", default=[1, 5, 10], help="labelled images per class")
    parser.add_argument("--trials", type=Bounded(int, 2), default=200,
                        help="random draws of the shots per setting (at least 2, for a std)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shot draws")
    parser.add_argument("--json", default=None, help="write the accuracies here")
    return parser


def nearest_prototype_accuracy(prototypes: torch.Tensor, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy per trial [T] of labelling queries [N, D] by their nearest prototype among [T, C, D]."""
    distances = torch.cdist(queries.unsqueeze(0).expand(len(prototypes), -1, -1), prototypes)
    return (distances.argmin(dim=2) == targets).float().mean(dim=1)


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(set(args.held_out)) != len(args.held_out) or len(args.held_out) < 2:
        parser.error(f"--held-out {' '.join(map(str, args.held_out))}: give at least two different labels "
                     "(with one, every query would match the one prototype)")
    if args.json:
        check_writable(args.json, "--json")
    device, encoder, _, settings = device_and_models(parser, args)
    (train_x, train_y), (test_x, test_y), _ = data_loader.evaluation_splits(settings.data, "test", device)
    check_label_counts(test_y, args.held_out, 1, f"{settings.dataset} test", "--held-out")
    check_label_counts(train_y, args.held_out, max(args.shots), f"{settings.dataset} train", "--shots")
    keep = torch.isin(test_y, torch.tensor(args.held_out, device=device))
    test_x, test_y = test_x[keep], test_y[keep]
    targets = torch.searchsorted(torch.tensor(sorted(args.held_out), device=device), test_y)
    _, _, train_mu, train_logvar = encode(encoder, train_x)
    _, _, test_mu, _ = encode(encoder, test_x)
    train_pixels, test_pixels = train_x.flatten(1), test_x.flatten(1)
    generator = torch.Generator().manual_seed(args.seed)
    results = {"held_out": sorted(args.held_out), "trials": args.trials, "class_code": {}, "pixels": {}}
    print("| shots per class | class code (evidence-fused prototype) | pixels (mean-image prototype) |")
    print("| --- | --- | --- |")
    for shots in args.shots:
        picks = sample_per_label(train_y, sorted(args.held_out), shots, args.trials, generator)  # [T, C, S]
        code_prototypes = fused_means(train_mu, train_logvar, picks.flatten(0, 1)).view(*picks.shape[:2], -1)
        pixel_prototypes = train_pixels[picks].mean(dim=2)
        row = []
        for name, prototypes, queries in (("class_code", code_prototypes, test_mu),
                                          ("pixels", pixel_prototypes, test_pixels)):
            accuracy = 100.0 * nearest_prototype_accuracy(prototypes, queries, targets)
            results[name][str(shots)] = {"mean": accuracy.mean().item(), "std": accuracy.std().item()}
            check_finite(results[name][str(shots)], f"the {shots}-shot {name} accuracy")
            row.append(f"{accuracy.mean():.2f} +- {accuracy.std():.2f}")
        print(f"| {shots} | " + " | ".join(row) + " |", flush=True)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
