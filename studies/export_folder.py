"""Write an IDX split (MNIST, Fashion-MNIST) as a folder of PNG files, one folder per label, which
`--dataset folder` reads back pixel for pixel:

    python -m studies.export_folder --dataset mnist --split test --out data/mnist_folder
    python -m studies.export_folder --dataset mnist --out data/mnist_folder       # train/ and test/

Each image becomes OUT/<split>/<label>/<index:05d>.png, an 8-bit grayscale PNG (lossless), where
<index> is its position in the split. A split is written into a hidden folder beside its target and
renamed into place when complete, so that a killed export leaves no partial split; a target split
folder that exists and is not empty is an error, and nothing is written.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import data_loader
from runs import POSITIVE_INT, UserError, check_writable, reports_errors, script_parser


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--dataset", choices=sorted(data_loader.DATASETS), default="mnist", help="data set")
    parser.add_argument("--data-dir", default="data", help="folder holding <Dataset>/raw/ IDX files")
    parser.add_argument("--split", choices=["train", "test", "both"], default="both", help="split(s) to write")
    parser.add_argument("--out", required=True, help="folder that receives <split>/<label>/<index:05d>.png")
    parser.add_argument("--limit", type=POSITIVE_INT, default=None, help="write only the first N images of each split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def check_target(folder: Path) -> None:
    """Raise UserError unless `folder` can receive a split: absent, or an empty folder."""
    if folder.is_file():
        raise UserError(f"--out: {folder} is a file; give another --out")
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"--out: {folder} exists and is not empty; give another --out, or delete {folder} first")


def write_split(images, labels, folder: Path, progress: bool) -> None:
    """Write images (uint8 [N, H, W]) as `folder`/<label>/<index:05d>.png, renaming a complete build
    folder into place."""
    build = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(build, ignore_errors=True)
    try:
        for label in sorted(set(labels.tolist())):
            (build / str(label)).mkdir(parents=True)
        for index in tqdm(range(len(images)), desc=f"writing {folder}", unit="img", disable=not progress):
            Image.fromarray(images[index]).save(build / str(labels[index]) / f"{index:05d}.png")
        if folder.is_dir():
            folder.rmdir()  # empty, as check_target made sure
        os.rename(build, folder)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = check_writable(args.out, "--out", folder=True)
    splits = ["train", "test"] if args.split == "both" else [args.split]
    for split in splits:
        check_target(out / split)
    for split in splits:
        images, labels = data_loader.idx_arrays(args.data_dir, split, args.dataset)
        images, labels = images[: args.limit], labels[: args.limit]
        write_split(images, labels, out / split, not args.no_progress)
        print(f"wrote {len(images)} {args.dataset} {split} images to {out / split}/<label>/<index:05d>.png")
    return out


if __name__ == "__main__":
    main()
