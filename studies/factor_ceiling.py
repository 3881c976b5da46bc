"""What one rendering tells about each factor: the convolutional encoder's stack trained with the factors as
labels (networks.FactorRegressor), scored as studies.factors scores a code, on the unseen test identities.

    python -m studies.factor_ceiling --json out/factor_ceiling.json
    python -m studies.factor_ceiling --data-dir /tmp/identities_small --epochs 2 --json /tmp/ceiling.json

studies.factors asks what a code holds; this asks what the image itself gives an encoder of the same stack
when the factors are its targets: the R^2 of rotation, scale and the two shifts, the pooled cos/sin R^2 of
the two hues, and digit accuracy, from one rendering. The train renderings train it, the test renderings
(identities never seen) score it; the same scores on the train renderings tell a network that could not
fit from one that did not generalise. One network predicts every factor and the digit (squared error on
the standardised targets plus the digit's cross-entropy), so its scores are a lower bound of what one
rendering holds, not an upper one; a code scoring near them holds about all that one rendering shows.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from networks import FactorRegressor
from runs import (POSITIVE, POSITIVE_INT, UserError, add_data_arguments, check_finite, check_writable, device_flag,
                  pick_threads, repository_path, reports_errors, script_parser, write_text_atomic)
from studies.factors import factor_splits, prediction_scores
from studies.identities import FACTORS, identities_root

DIGITS = 10


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_data_arguments(parser)
    parser.set_defaults(dataset=data_loader.FOLDER, data_dir=repository_path("data/identities"))
    parser.add_argument("--epochs", type=POSITIVE_INT, default=20, help="passes over the train renderings")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=256, help="renderings per step")
    parser.add_argument("--lr", type=POSITIVE, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None,
                        help="CPU threads (default: OMP_NUM_THREADS, else the idle cores)")
    parser.add_argument("--json", default=None, help="write the scores here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def train_regressor(images: torch.Tensor, targets: torch.Tensor, digits: torch.Tensor, *, epochs: int,
                    batch_size: int, lr: float, generator: torch.Generator, progress: bool) -> FactorRegressor:
    """A FactorRegressor fitted to standardised `targets` [N, T] (squared error) and `digits` [N]
    (cross-entropy), one Adam step per batch of a fresh permutation each epoch."""
    model = FactorRegressor(targets.shape[1] + DIGITS, tuple(images.shape[1:])).to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        batches = data_loader.epoch_batches(len(images), batch_size, generator)
        for rows in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress,
                         leave=False, dynamic_ncols=True):
            rows = rows.to(images.device)
            out = model(images[rows])
            loss = (out[:, :targets.shape[1]] - targets[rows]).pow(2).mean(0).sum() \
                + F.cross_entropy(out[:, targets.shape[1]:], digits[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    check_finite({"last loss": loss.item()}, "the factor regressor")
    return model


@torch.no_grad()
def regressor_scores(model: FactorRegressor, images: torch.Tensor, targets: torch.Tensor, owners: list[str],
                     digits: torch.Tensor) -> dict[str, float]:
    """Test R^2 of each factor and digit accuracy (a fraction), as studies.factors scores a probe."""
    out = torch.cat([model(chunk) for chunk in images.split(1024)])
    columns = targets.shape[1]
    return prediction_scores(out[:, :columns], targets, owners, out[:, columns:].argmax(1), digits)


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = device_flag(parser, args)
    if args.json:
        check_writable(args.json, "--json")
    spec = data_loader.DataSpec.from_settings(vars(args))
    root = identities_root(spec, "the data of --dataset and --data-dir", "studies.factor_ceiling")
    threads, _ = pick_threads(args.threads)
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    splits, targets, owners, digits = factor_splits(spec, root, device, progress)
    if args.batch_size > len(digits["train"]):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(digits['train'])} train renderings; "
                        "pass a smaller one")
    generator = torch.Generator().manual_seed(args.seed)
    model = train_regressor(splits["train"][0], targets["train"], digits["train"], epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, generator=generator, progress=progress)
    model.eval()
    scores = regressor_scores(model, splits["test"][0], targets["test"], owners, digits["test"])
    fitted = regressor_scores(model, splits["train"][0], targets["train"], owners, digits["train"])
    results = {"command": "python -m studies.factor_ceiling " + " ".join(sys.argv[1:] if argv is None else argv),
               "data_dir": str(root), "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
               "lr": args.lr, "train_renderings": len(digits["train"]), "test_renderings": len(digits["test"]),
               "scores": scores, "train_scores": fitted}
    check_finite(results, "the scores")
    print("| " + " | ".join([*FACTORS, "digit"]) + " |\n|" + " --- |" * (len(FACTORS) + 1) + "\n| "
          + " | ".join([*(f"{scores[name]:.3f}" for name in FACTORS), f"{100 * scores['digit']:.1f}"]) + " |")
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
