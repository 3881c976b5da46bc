"""Train the pixel-space CNN that judges swap generations (see studies/swap_score.py), and report its test accuracy.

    python -m studies.pixel_classifier --out out/pixel_classifier_mnist.pt
    python -m studies.pixel_classifier --dataset fashion-mnist --out out/pixel_classifier_fashion-mnist.pt
    python -m studies.pixel_classifier --dataset folder --data-dir data/identities --out out/judge_identities.pt

The default --out, checkpoints/pixel_classifier_<dataset>.pt, holds the shipped classifier that
studies/swap_score.py reads (out/pixel_classifier_folder_<data folder name>.pt for folder data);
replacing an existing file takes --overwrite. On folder data it learns the groups; where the test groups
are not training groups it learns them from the first half of each test group's images and is scored
on the second half, the half the swap score draws its sources from (data_loader.evaluation_splits).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from evaluation import default_judge_path, predict
from networks import PixelClassifier
from runs import (POSITIVE, POSITIVE_INT, UserError, add_data_arguments, atomic_save, check_finite, check_writable,
                  device_flag, reports_errors, script_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=POSITIVE_INT, default=8, help="passes over the training split")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="images per step")
    parser.add_argument("--lr", type=POSITIVE, default=1e-3, help="Adam learning rate")
    parser.add_argument("--num-train", type=POSITIVE_INT, default=None, help="use only the first N training images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--out", default=None, help="default: checkpoints/pixel_classifier_<dataset>.pt "
                        "(folder data: out/pixel_classifier_folder_<data folder name>.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


@reports_errors
def main(argv: list[str] | None = None) -> float:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = device_flag(parser, args)
    spec = data_loader.DataSpec.from_settings(vars(args))
    out = check_writable(args.out or default_judge_path(spec), "--out")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists; pass another --out, or --overwrite to replace it")
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    (images, labels), (test_images, test_labels), note = data_loader.evaluation_splits(spec, "test", device)
    if note:
        print(note)
    if args.num_train is not None and args.num_train > len(labels):
        raise UserError(f"--num-train {args.num_train} exceeds the {len(labels)} {args.dataset} training images; "
                        f"pass at most {len(labels)}")
    images, labels = images[: args.num_train], labels[: args.num_train]
    if args.batch_size > len(labels):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(labels)} training images; "
                        "pass a smaller one")
    model = PixelClassifier(int(labels.max()) + 1, tuple(images.shape[1:])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    for epoch in range(args.epochs):
        model.train()
        bar = tqdm(data_loader.epoch_batches(len(images), args.batch_size, generator), desc=f"epoch {epoch + 1}",
                   disable=args.no_progress, leave=False)
        for index in bar:
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    accuracy = 100.0 * (predict(model, test_images) == test_labels).float().mean().item()
    check_finite({"test accuracy": accuracy, "last loss": loss.item()}, "the pixel classifier")
    atomic_save(model.state_dict(), out)
    print(f"{args.dataset} test accuracy {accuracy:.2f}%; saved {out}")
    return accuracy


if __name__ == "__main__":
    main()
