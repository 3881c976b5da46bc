"""MNIST-style datasets as whole tensors, and the reference's minibatch schedule.

A split is loaded once into two tensors: images float32 in [0, 1] with shape [N, 1, 28, 28] and
labels int64 with shape [N]. Training indexes them with a fresh permutation each epoch, so the hot
path has no per-sample Python code and the data can live on the GPU.

The IDX files are read directly (gzip-compressed or not) from `<data-dir>/<Folder>/raw/`, the layout
torchvision uses; MNIST ships with this repository under `data/MNIST/raw/` and is never downloaded.
Example:

    python -c "import data_loader; x, y = data_loader.load_split('data', 'train'); print(x.shape)"
"""
from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

DATASETS = {
    # name: (folder under the data dir, extra folder searched when the files are not there)
    "mnist": ("MNIST", None),
    "fashion-mnist": ("FashionMNIST", Path("/usr/share/datasets/fashion-mnist")),
}
SHIPPED = {"mnist"}  # data sets whose files ship with the repository: a missing file is never downloaded
REPOSITORY = Path(__file__).resolve().parent  # MNIST ships in its data/MNIST/raw/
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
EVALUATION_SPLITS = ("test", "validation")
VALIDATION_START = 50000  # the validation split: train images [50000, 60000)
IMAGE_SIZE = 28
IDX_MAGIC = {"images": 2051, "labels": 2049}

HOW_TO_FIX = {
    "mnist": "copy the four MNIST IDX files into {folder} (the repository ships them in {shipped}, where "
    "`git -C {repository} checkout -- data/MNIST/raw` restores them)",
    "fashion-mnist": "install Debian's package (`apt-get install -y dataset-fashion-mnist`, "
    "which puts the files in /usr/share/datasets/fashion-mnist/), or copy the four "
    "Fashion-MNIST IDX files into {folder}",
}


class DatasetFileError(RuntimeError):
    """A dataset file is missing, truncated or corrupt; the message names it and says how to fix it."""


def _fail(dataset: str, path: Path, problem: str) -> DatasetFileError:
    fix = HOW_TO_FIX[dataset].format(folder=path.parent, shipped=REPOSITORY / "data" / "MNIST" / "raw",
                                     repository=REPOSITORY)
    return DatasetFileError(f"{dataset} file {path}: {problem}. To fix it, {fix}.")


def _find_file(dataset: str, raw_dir: Path, stem: str) -> Path | None:
    extra = DATASETS[dataset][1]
    for folder in (raw_dir, extra):
        if folder is None:
            continue
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _check_sha256(dataset: str, path: Path) -> None:
    """Compare against SHA256SUMS beside the file, where that list names it."""
    sums = path.parent / "SHA256SUMS"
    if not sums.is_file():
        return
    expected = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    if path.name in expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected[path.name]:
        raise _fail(dataset, path, "its SHA256 differs from the one listed in SHA256SUMS (corrupt file)")


def read_idx(path: Path, kind: str, dataset: str = "mnist") -> np.ndarray:
    """Read one IDX file (images: uint8 [N, 28, 28]; labels: uint8 [N]) with full validation."""
    _check_sha256(dataset, path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise _fail(dataset, path, f"cannot be decompressed ({error})") from error
    ndim = 3 if kind == "images" else 1
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _fail(dataset, path, f"it is truncated ({len(raw)} bytes, shorter than its header)")
    magic, *dims = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, header_len, 4))
    if magic != IDX_MAGIC[kind]:
        raise _fail(dataset, path, f"not an IDX {kind} file (magic number {magic}, expected {IDX_MAGIC[kind]})")
    if kind == "images" and dims[1:] != [IMAGE_SIZE, IMAGE_SIZE]:
        raise _fail(dataset, path, f"images are {dims[1]}x{dims[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise _fail(dataset, path, f"it holds {len(raw) - header_len} data bytes, its header announces {expected} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _download_with_torchvision(dataset: str, raw_dir: Path) -> None:
    """Fetch the files into a temporary folder where a network exists, then move them into `raw_dir`;
    where none does (the usual case here), nothing is created and the caller reports the missing file."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[dataset]
    with tempfile.TemporaryDirectory() as scratch:
        try:
            for train in (True, False):
                cls(scratch, train=train, download=True)
        except Exception:  # no network
            return
        raw_dir.mkdir(parents=True, exist_ok=True)
        for path in (Path(scratch) / DATASETS[dataset][0] / "raw").iterdir():
            shutil.move(path, raw_dir / path.name)


def load_split(data_dir: str | Path, split: str, dataset: str = "mnist",
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split: images float32 [N, 1, 28, 28] in [0, 1] and labels int64 [N], on `device`."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    if split not in SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_PREFIX)}")
    raw_dir = Path(data_dir) / DATASETS[dataset][0] / "raw"
    arrays = {}
    for kind, suffix in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
        stem = f"{SPLIT_PREFIX[split]}-{suffix}"
        path = _find_file(dataset, raw_dir, stem)
        if path is None and dataset not in SHIPPED:
            _download_with_torchvision(dataset, raw_dir)
            path = _find_file(dataset, raw_dir, stem)
        if path is None:
            raise _fail(dataset, raw_dir / (stem + ".gz"), "it is missing")
        arrays[kind] = read_idx(path, kind, dataset)
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise _fail(dataset, path, f"{len(images)} images but {len(labels)} labels")
    images = torch.from_numpy(images.copy()).to(device).unsqueeze(1).float().div_(255.0)
    return images, torch.from_numpy(labels.astype(np.int64)).to(device)


def evaluation_splits(data_dir: str | Path, dataset: str, split: str, device: torch.device | str = "cpu"
                      ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (held-out images, labels)) for an evaluation.

    split "test": the train and the test split. split "validation": train images [0, VALIDATION_START)
    and [VALIDATION_START, end), for choosing settings without looking at the test split (train the
    model with `training.py --num-train 50000` so that it never saw the held-out images).
    """
    if split not in EVALUATION_SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; choose from {EVALUATION_SPLITS}")
    images, labels = load_split(data_dir, "train", dataset, device)
    if split == "validation":
        start = VALIDATION_START
        return (images[:start], labels[:start]), (images[start:], labels[start:])
    return (images, labels), load_split(data_dir, "test", dataset, device)


def epoch_batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of the reference's schedule: a fresh random permutation cut into full batches.

    The last partial batch is dropped, as the reference's DataLoader(drop_last=True) does.
    """
    perm = torch.randperm(num_samples, generator=generator, device=generator.device)
    return list(perm[: num_samples - num_samples % batch_size].split(batch_size))
