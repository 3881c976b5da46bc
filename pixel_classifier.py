"""Train the pixel-space CNN that judges swap generations (see swap_score.py), and report its test accuracy.

    python pixel_classifier.py                            # -> checkpoints/pixel_classifier_mnist.pt
    python pixel_classifier.py --dataset fashion-mnist    # -> checkpoints/pixel_classifier_fashion-mnist.pt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from networks import PixelClassifier
from utils import atomic_save, pick_device, script_parser


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--dataset", choices=sorted(data_loader.DATASETS), default="mnist", help="data set")
    parser.add_argument("--data-dir", default="data", help="folder holding <Dataset>/raw/ IDX files")
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training split")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--num-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--out", default=None, help="default: checkpoints/pixel_classifier_<dataset>.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


@torch.no_grad()
def predict(model: PixelClassifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels [N] of images [N, 1, 28, 28] (or [N, 784]), in eval mode."""
    model.eval()
    return torch.cat([model(chunk).argmax(1) for chunk in images.split(batch_size)])


def load_pixel_classifier(path: str | Path, device: torch.device) -> PixelClassifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pixel classifier at {path}; train one with `python pixel_classifier.py`")
    model = PixelClassifier().to(device)
    model.load_state_dict(torch.load(path, weights_only=True, map_location=device))
    return model.eval()


def main(argv: list[str] | None = None) -> float:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = pick_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images, labels = data_loader.load_split(args.data_dir, "train", args.dataset, device)
    images, labels = images[: args.num_train], labels[: args.num_train]
    test_images, test_labels = data_loader.load_split(args.data_dir, "test", args.dataset, device)
    model = PixelClassifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = len(images) // args.batch_size
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(images), generator=generator, device=device)
        bar = tqdm(perm[: steps * args.batch_size].split(args.batch_size), desc=f"epoch {epoch + 1}",
                   disable=args.no_progress, leave=False)
        for index in bar:
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    accuracy = 100.0 * (predict(model, test_images) == test_labels).float().mean().item()
    out = Path(args.out or f"checkpoints/pixel_classifier_{args.dataset}.pt")
    atomic_save(model.state_dict(), out)
    print(f"{args.dataset} test accuracy {accuracy:.2f}%; saved {out}")
    return accuracy


if __name__ == "__main__":
    main()
