"""The data: MNIST-style IDX datasets as whole tensors, folders of grouped images, and the batches.

A split is loaded once into two tensors: images uint8 [N, C, H, W] (MNIST: [N, 1, 28, 28]) and
labels int64 [N], the group ids. `Batches`, the one batch path of training, the benchmark and the
evaluations, gathers each batch by index (a fresh permutation each epoch, the reference's random
batches, or group-balanced ones of G groups of K images) and turns it into float32 in [0, 1] on the
device, so the hot path has no per-sample Python code and the data can live on the GPU.
`DataSpec` names a data set as args.json records it; `load_data` reads either kind.

The IDX files are read directly (gzip-compressed or not) from `<data-dir>/<Folder>/raw/`, the layout
torchvision uses; MNIST ships with this repository under `data/MNIST/raw/` and is never downloaded.
Example:

    python -c "import data_loader; x, y = data_loader.load_split('data', 'train'); print(x.shape)"

A folder of the user's own grouped images (`load_folder`: ImageFolder's train/<group>/ and
test/<group>/ layout, group folders alone, or a list file of `path group` lines) is decoded once, in
parallel, into a uint8 cache that later runs memory-map; `to_float` turns a batch of it into floats
on the device. docs/data.md describes the layouts, the cache and the flags. Example:

    python -c "import data_loader; d = data_loader.load_folder('data/mnist_folder'); print(d.notes)"
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import PIL
import torch
from PIL import Image, ImageFile
from tqdm import tqdm

from utils import num_training_groups, rank_within_groups, training_groups

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
    if path.name in expected and file_sha256(path) != expected[path.name]:
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


def idx_arrays(data_dir: str | Path, split: str, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """A whole split as read from its IDX files: images uint8 [N, 28, 28] and labels uint8 [N] (read-only)."""
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
    return images, labels


def load_split(data_dir: str | Path, split: str, dataset: str = "mnist",
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split: images float32 [N, 1, 28, 28] in [0, 1] and labels int64 [N], on `device`."""
    images, labels = idx_arrays(data_dir, split, dataset)
    images = to_float(torch.from_numpy(images.copy()).unsqueeze(1), device)
    return images, torch.from_numpy(labels.astype(np.int64)).to(device)


def to_float(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images (a batch, or a whole split) as float32 in [0, 1] on `device`: moved first, so
    that only the uint8 bytes cross to the device, then converted there."""
    if images.is_floating_point():  # already converted (an evaluation's split)
        return images.to(device)
    return images.to(device).float().div_(255.0)


FOLDER = "folder"  # --dataset folder: a user's folder of grouped images (load_folder)
DATASET_CHOICES = (*sorted(DATASETS), FOLDER)
VALIDATION_FRACTION = 1 / 6  # of the train split, as MNIST's 10,000 of 60,000


@dataclass
class ImageSplit:
    """One split as tensors: uint8 images [N, C, H, W] on the CPU (memory-mapped for folder data) and
    int64 group ids [N] indexing `groups`, the group names."""

    images: torch.Tensor
    labels: torch.Tensor
    groups: list[str]
    files: list[str] | None = None


@dataclass
class FolderData:
    """A data set's train and test splits, their image shape and the lines a script prints first."""

    train: ImageSplit
    test: ImageSplit
    channels: int
    image_size: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)


@dataclass(frozen=True)
class DataSpec:
    """Which images a run reads: an IDX data set by name, or a folder data set with its decode settings.
    Training records it in args.json, and every script reads it from there."""

    dataset: str = "mnist"
    data_dir: str = "data"
    data_list: str | None = None
    split_list: str | None = None
    image_size: int | None = None
    channels: int | None = None
    cache_dir: str | None = None

    @classmethod
    def from_settings(cls, settings: dict) -> "DataSpec":
        """The spec of a dict holding (some of) its fields, e.g. args.json or vars(args)."""
        return cls(**{key: settings[key] for key in cls.__dataclass_fields__ if settings.get(key) is not None})


def idx_split(data_dir: str | Path, split: str, dataset: str = "mnist") -> ImageSplit:
    """An IDX split as an ImageSplit: uint8 [N, 1, 28, 28], labels the digits (or garments) 0-9."""
    images, labels = idx_arrays(data_dir, split, dataset)
    return ImageSplit(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                      [str(label) for label in range(10)])


def load_data(spec: DataSpec, progress: bool = True) -> FolderData:
    """Both splits of the data set `spec` names: IDX files, or a folder decoded once into its cache."""
    if spec.dataset == FOLDER:
        kwargs = {"cache_dir": spec.cache_dir} if spec.cache_dir else {}
        return load_folder(spec.data_dir, data_list=spec.data_list, split_list=spec.split_list,
                           image_size=spec.image_size, channels=spec.channels, progress=progress, **kwargs)
    if spec.image_size not in (None, 28) or spec.channels not in (None, 1):
        raise DatasetFileError(f"--image-size and --channels apply to --dataset {FOLDER}; {spec.dataset} images "
                               "are 28x28 grayscale")
    return FolderData(idx_split(spec.data_dir, "train", spec.dataset), idx_split(spec.data_dir, "test", spec.dataset),
                      1, (28, 28))


def labelled_images(spec: DataSpec, split: str, device: torch.device | str = "cpu", progress: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split of `spec`: float images [N, C, H, W] in [0, 1] on `device`, labels [N] and the
    group names the labels index."""
    part = idx_split(spec.data_dir, split, spec.dataset) if spec.dataset != FOLDER \
        else getattr(load_data(spec, progress), split)
    return to_float(part.images, device), part.labels.to(device), part.groups


def validation_rows(labels: torch.Tensor, unseen_groups: bool) -> torch.Tensor:
    """Boolean mask [N] of the train rows that form the validation split of a folder data set: the last
    VALIDATION_FRACTION of each group's images, or, where the test groups are not training groups, the
    last VALIDATION_FRACTION of the groups (so validation asks what the test split asks)."""
    if unseen_groups:
        return labels >= int(labels.max() + 1) - max(1, round(VALIDATION_FRACTION * int(labels.max() + 1)))
    counts = torch.bincount(labels)[labels]
    return rank_within_groups(labels) >= counts - (counts * VALIDATION_FRACTION).round().long()


def halves_per_group(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask [N]: the first half (rounded up) of each group's rows, in row order."""
    return rank_within_groups(labels) < (torch.bincount(labels)[labels] + 1) // 2


Labelled = tuple[torch.Tensor, torch.Tensor]


def evaluation_splits(spec: DataSpec, split: str, device: torch.device | str = "cpu", progress: bool = False
                      ) -> tuple[Labelled, Labelled, str | None]:
    """((train images, labels), (held-out images, labels), note) for an evaluation: float images on
    `device`, labels in one id space, and a line saying how the pair was formed where it is not plain.

    split "test": the train and the test split. split "validation": for MNIST train images [0,
    VALIDATION_START) and [VALIDATION_START, end); for folder data validation_rows of the train split.
    Where the held-out groups are not training groups (unseen identities), probes are fitted on the first
    half of each held-out group's images and scored on the second half.
    """
    if split not in EVALUATION_SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; choose from {EVALUATION_SPLITS}")
    if spec.dataset != FOLDER:
        images, labels = load_split(spec.data_dir, "train", spec.dataset, device)
        if split == "validation":
            start = VALIDATION_START
            return (images[:start], labels[:start]), (images[start:], labels[start:]), None
        return (images, labels), load_split(spec.data_dir, "test", spec.dataset, device), None
    data = load_data(spec, progress)
    test_labels = align_test_groups(data.train, data.test)
    unseen = test_labels is None
    train_x, train_y = data.train.images, data.train.labels
    if split == "validation":
        held = validation_rows(train_y, unseen)
        held_x, held_y, train_x, train_y = train_x[held], train_y[held], train_x[~held], train_y[~held]
    else:
        held_x, held_y = data.test.images, data.test.labels if unseen else test_labels
    note = None
    if unseen:
        first = halves_per_group(held_y)
        train_x, train_y, held_x, held_y = held_x[first], held_y[first], held_x[~first], held_y[~first]
        note = (f"note: the {split} groups are not training groups: probes are fitted on the first half of each "
                f"{split} group's images and scored on the second half")
    return (to_float(train_x, device), train_y.to(device)), (to_float(held_x, device), held_y.to(device)), note


def epoch_batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of the reference's schedule: a fresh random permutation cut into full batches.

    The last partial batch is dropped, as the reference's DataLoader(drop_last=True) does.
    """
    perm = torch.randperm(num_samples, generator=generator, device=generator.device)
    return list(perm[: num_samples - num_samples % batch_size].split(batch_size))


def group_balanced_order(labels: torch.Tensor, groups_per_batch: int, images_per_group: int,
                         generator: torch.Generator) -> torch.Tensor:
    """One epoch of group-balanced batches, as rows [steps * G * K]: each batch holds G groups of K images.

    Every group's images are shuffled and cut into blocks of K; a group's last n mod K images sit this
    epoch out (another shuffle lets them in the next), and a group with fewer than K images is never
    drawn. The blocks are shuffled and G at a time make a batch; each block is one group of its batch
    (two blocks of one group in a batch are fused apart). The last incomplete batch is dropped.
    Random numbers come from `generator` alone, on its device, with no Python loop over groups.
    """
    k = images_per_group
    shuffled = torch.randperm(len(labels), generator=generator, device=generator.device).to(labels.device)
    by_group = shuffled[torch.argsort(labels[shuffled], stable=True)]  # rows grouped, random within a group
    sorted_labels = labels[by_group]
    usable = rank_within_groups(sorted_labels) < (torch.bincount(sorted_labels) // k * k)[sorted_labels]
    blocks = by_group[usable].view(-1, k)
    blocks = blocks[torch.randperm(len(blocks), generator=generator, device=generator.device).to(labels.device)]
    steps = len(blocks) // groups_per_batch
    return blocks[: steps * groups_per_batch].reshape(-1)


def describe_groups(labels: torch.Tensor, images_per_group: int) -> str:
    """How group-balanced batches treat the groups of `labels`: one line for a script's output."""
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    small = counts < images_per_group
    left_out = int((counts[~small] % images_per_group).sum())
    return (f"{len(counts)} groups: {int(small.sum())} with fewer than {images_per_group} images "
            f"({int(counts[small].sum())} images) are never drawn; the other groups' images enter in blocks of "
            f"{images_per_group}, {left_out} of them sitting out each epoch in turn")


class Batches:
    """The one batch path of training (and of the benchmark and the evaluations): a split's rows in
    epoch orders, each batch gathered, moved to the device as float and given its group ids.

    Random batches (the reference's, MNIST's default): a fresh permutation a epoch, one group per label
    in a batch (or per `group_size` images of a label), a fixed group index of one slot per possible
    group. Group-balanced batches (`images_per_group` K): `groups_per_batch` G groups of K images each,
    group ids the G slots (group_balanced_order). No Python code runs per sample.

    Of `ranks` processes, the one of `rank` takes whole groups: its G / ranks consecutive blocks of
    each batch (the batch rows [rank * B / ranks, (rank + 1) * B / ranks)), with group ids [0, G / ranks).
    Every process draws the same epoch order. Random batches group by label inside a batch, so that
    no split of their rows keeps groups whole at equal shares: they are one process's.
    """

    def __init__(self, split: ImageSplit, batch_size: int, device: torch.device | str,
                 groups_per_batch: int | None = None, images_per_group: int | None = None,
                 group_size: int | None = None, rank: int = 0, ranks: int = 1) -> None:
        # Where it fits (CPU memory, or a GPU), the whole split lives on the device; a memory-mapped
        # split on the CPU is read through the page cache, batch by batch.
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.images_per_group = batch_size, images_per_group
        self.group_size = group_size
        if images_per_group is None:
            if ranks > 1:
                raise ValueError("random batches are one process's; several processes take group-balanced ones")
            self.num_groups = num_training_groups(len(split.groups), batch_size, group_size)
            self.steps_per_epoch = len(self.labels) // batch_size
        else:
            if groups_per_batch % ranks:
                raise ValueError(f"{ranks} processes cannot share {groups_per_batch} groups per batch equally")
            self.num_groups = groups_per_batch // ranks  # this process's groups of each batch
            counts = torch.bincount(split.labels)
            self.steps_per_epoch = int((counts // images_per_group).sum()) // groups_per_batch
            self.slots = torch.arange(self.num_groups, device=device).repeat_interleave(images_per_group)
        self.rows = slice(rank * batch_size // ranks, (rank + 1) * batch_size // ranks)  # this process's, of a batch
        self.device = torch.device(device)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """The rows of one epoch; rows [s * batch_size, (s + 1) * batch_size) are batch s."""
        if self.images_per_group is None:
            return torch.randperm(len(self.labels), generator=generator, device=generator.device)
        return group_balanced_order(self.labels, self.num_groups, self.images_per_group, generator)

    def batch(self, order: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of batch `step` of an epoch order: float images [B, C, H, W] in [0, 1]
        and group ids [B] in [0, num_groups)."""
        start = step * self.batch_size
        index = order[start + self.rows.start:start + self.rows.stop]
        # index_select gathers rows about twice as fast as images[index] on the CPU.
        x = to_float(self.images.index_select(0, index), self.device)
        if self.images_per_group is not None:
            return x, self.slots
        return x, training_groups(self.labels.index_select(0, index), self.group_size)


# Folder data: a user's images grouped by folder or by a list file, decoded once into a uint8 cache.

DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / "cache"
TEST_FRACTION = 0.2  # share of each group's images that goes to test when the data names no split
CACHE_FORMAT = 1  # part of the cache key: raise it when what an entry holds or how it is decoded changes
SPLITS = ("train", "test")  # row order: every train row, then every test row
SPLIT_WORDS = {  # a list file's split column; validation goes to train, where the scripts carve theirs
    "0": "train", "train": "train", "1": "train", "val": "train", "valid": "train", "validation": "train",
    "2": "test", "test": "test",
}
CHUNK_BYTES = 16 << 20  # decoded bytes one worker task hands back at most
HEADER_CHUNK = 256  # files per task when only the headers are read


@dataclass
class _Listing:
    """The images of a folder data set before decoding, one row each in row order."""

    paths: list[str]  # relative to the data folder, with "/" between parts
    groups: list[str]
    splits: list[str]
    stats: list[tuple[int, int]]  # (size in bytes, modification time in ns)
    how_split: str  # the first note
    skipped: list[str]  # files that are not images, relative to the data folder
    list_digests: dict[str, str]  # SHA256 of the list files read


def image_suffixes() -> frozenset[str]:
    """The lower-case file suffixes that Pillow opens (MPO files open through its JPEG plugin)."""
    return frozenset(suffix for suffix, kind in Image.registered_extensions().items()
                     if kind in Image.OPEN or kind == "MPO")


def _is_image_name(name: str, suffixes: frozenset[str]) -> bool:
    return os.path.splitext(name)[1].lower() in suffixes


def _scan_tree(folder: str, prefix: str, suffixes: frozenset[str], images: list, skipped: list[str],
               seen: set[str]) -> None:
    """Append every image file under `folder`, sub-folders included and links followed, to `images` as
    (relative path, stat), and every other file to `skipped`. Names that start with "." are hidden:
    such files count as skipped, such folders are not read."""
    real = os.path.realpath(folder)
    if real in seen:  # a link back up the tree
        return
    seen.add(real)
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        relative = prefix + entry.name
        if entry.is_dir():
            if not entry.name.startswith("."):
                _scan_tree(entry.path, relative + "/", suffixes, images, skipped, seen)
        elif entry.name.startswith(".") or not _is_image_name(entry.name, suffixes):
            skipped.append(relative)
        else:
            try:
                info = entry.stat()
            except OSError as error:
                raise DatasetFileError(f"image {entry.path} cannot be read ({error.strerror}); "
                                       "replace it or delete it") from error
            images.append((relative, info))


def _group_folders(parent: Path, prefix: str, suffixes: frozenset[str], skipped: list[str],
                   what: str) -> dict[str, list]:
    """{group name: [(relative path, stat), ...]} of the group folders in `parent`; a file directly in
    `parent` is skipped, a group folder without an image and a `parent` without a group are errors."""
    groups = {}
    with os.scandir(parent) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if not entry.is_dir():
            skipped.append(prefix + entry.name)
        elif not entry.name.startswith("."):
            images = []
            _scan_tree(entry.path, f"{prefix}{entry.name}/", suffixes, images, skipped, set())
            if not images:
                raise DatasetFileError(f"group folder {entry.path} holds no image (a file that Pillow reads, "
                                       "such as .png or .jpg); add its images or remove the folder")
            groups[entry.name] = images
    if not groups:
        raise DatasetFileError(f"{what} {parent} holds no group folder; put each group's images in a folder "
                               f"of its own, {parent}/<group>/<image>")
    return groups


def _group_generator(group: str, seed: int) -> np.random.Generator:
    """A generator for one group's split: it depends on the seed and the group's name only, so that
    adding or removing a group leaves every other group's split as it was."""
    digest = hashlib.sha256(group.encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _test_count(images: int, fraction: float) -> int:
    """How many of a group's images go to test: `fraction` of them, rounded half up, leaving train one."""
    return min(images - 1, math.floor(images * fraction + 0.5))


def _split_at_random(groups: dict[str, list[str]], seed: int, fraction: float) -> dict[str, str]:
    """{relative path: split}: each group's images, sorted, shuffled with the group's own generator, and
    the first `_test_count` of them sent to test."""
    splits = {}
    for group, paths in groups.items():
        paths = sorted(paths)
        test = set(_group_generator(group, seed).permutation(len(paths))[:_test_count(len(paths), fraction)])
        splits.update((path, "test" if i in test else "train") for i, path in enumerate(paths))
    return splits


def _random_split_note(seed: int, fraction: float) -> str:
    smallest = max(2, math.floor(0.5 / fraction))
    while _test_count(smallest, fraction) == 0:
        smallest += 1
    return (f"each group's images split at random (seed {seed}): {fraction:.0%} of each group to test, rounded, "
            f"a group of fewer than {smallest} images wholly to train")


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex): data files checked, list files keyed, results matched to their weights."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _find_list_file(path: str | Path, data_dir: Path, what: str) -> Path:
    """A list file as given, else (a relative path) inside the data folder."""
    path = Path(path).expanduser()
    for candidate in (path, data_dir / path):
        if candidate.is_file():
            return candidate
    tried = path if path.is_absolute() else f"{path} (nor {data_dir / path})"
    raise DatasetFileError(f"{what} {tried} does not exist; give the path of the file")


def _list_lines(path: Path, what: str, layout: str, allowed: tuple[int, ...]) -> list[tuple[int, list[str]]]:
    """(line number, columns) of every line of a list file that is neither blank nor a "#" comment.
    Columns are split at whitespace, or at tabs when a line holds one (so that paths may hold spaces);
    every line must have as many columns as the first, a number in `allowed`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetFileError(f"{what} {path} is not UTF-8 text ({error}); give a text file of "
                               f"`{layout}` lines") from error
    lines, columns = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [field.strip() for field in line.split("\t")] if "\t" in line else line.split()
        columns = columns or len(fields)
        if "" in fields or len(fields) != columns or columns not in allowed:
            raise DatasetFileError(f"{what} {path} line {number}: {line.strip()!r} is not a `{layout}` line"
                                   + (f" like the lines above it ({columns} columns)" if lines else ""))
        lines.append((number, fields))
    if not lines:
        raise DatasetFileError(f"{what} {path} holds no line; give a file of `{layout}` lines")
    return lines


def _normal_path(text: str) -> str:
    return os.path.normpath(text).replace(os.sep, "/")


def _split_word(word: str, path: Path, number: int, what: str) -> str:
    try:
        return SPLIT_WORDS[word.lower()]
    except KeyError:
        raise DatasetFileError(f"{what} {path} line {number}: split {word!r} is not one of 0 (train), "
                               "1 (validation, read as train), 2 (test), train, test") from None


def _read_split_list(path: Path, paths: list[str]) -> dict[str, str]:
    """{relative path: split} of a `relative/path split` file, for each of `paths`."""
    splits = {_normal_path(fields[0]): _split_word(fields[1], path, number, "split list")
              for number, fields in _list_lines(path, "split list", "relative/path split", (2,))}
    for relative in paths:
        if relative not in splits:
            raise DatasetFileError(f"split list {path} gives no split for {relative}; add the line "
                                   f"`{relative} 0` (train) or `{relative} 2` (test)")
    return splits


def _listing_from_folders(data_dir: Path, split_list: Path | None, seed: int, fraction: float,
                          suffixes: frozenset[str]) -> tuple[list, str, list[str]]:
    """(rows (path, group, split, stat), how they were split, skipped files) of layouts
    train/<group>/ + test/<group>/, or <group>/ alone."""
    skipped = []
    present = [name for name in SPLITS if (data_dir / name).is_dir()]
    if len(present) == 1:
        other = SPLITS[1 - SPLITS.index(present[0])]
        raise DatasetFileError(f"{data_dir} holds {present[0]}/ but no {other}/; add {data_dir / other}/<group>/ "
                               f"folders, or rename {present[0]}/ if it is a group")
    if present:
        if split_list is not None:
            raise DatasetFileError(f"{data_dir} holds train/ and test/, which give the split; drop the split "
                                   f"list {split_list}")
        rows = []
        for split in SPLITS:
            groups = _group_folders(data_dir / split, f"{split}/", suffixes, skipped, f"the {split} split's folder")
            rows += [(path, group, split, info) for group, images in groups.items() for path, info in images]
        skipped += [name for name in sorted(os.listdir(data_dir)) if name not in SPLITS]
        return rows, "the train/ and test/ folders give the split", skipped
    groups = _group_folders(data_dir, "", suffixes, skipped, "the data folder")
    paths = {group: [path for path, _ in images] for group, images in groups.items()}
    if split_list is not None:
        splits = _read_split_list(split_list, [path for group in paths.values() for path in group])
        how = f"group folders, split by the split list {split_list} (0 and 1 train, 2 test)"
    else:
        splits = _split_at_random(paths, seed, fraction)
        how = "group folders without train/ and test/: " + _random_split_note(seed, fraction)
    rows = [(path, group, splits[path], info) for group, images in groups.items() for path, info in images]
    return rows, how, skipped


def _listing_from_list(data_dir: Path, data_list: Path, split_list: Path | None, seed: int,
                       fraction: float) -> tuple[list, str]:
    """(rows (path, group, split, stat), how they were split) of a `relative/path group [split]` file."""
    lines = _list_lines(data_list, "data list", "relative/path group [split]", (2, 3))
    has_split = len(lines[0][1]) == 3
    if has_split and split_list is not None:
        raise DatasetFileError(f"data list {data_list} has a split column and a split list {split_list} is "
                               "given too; drop one of them")
    entries, first_line = [], {}
    for number, fields in lines:
        relative = _normal_path(fields[0])
        if relative in first_line:
            raise DatasetFileError(f"data list {data_list} line {number}: {fields[0]} is listed on line "
                                   f"{first_line[relative]} already; list each image once")
        first_line[relative] = number
        try:
            info = os.stat(data_dir / relative)
        except OSError as error:
            raise DatasetFileError(f"data list {data_list} line {number} names {data_dir / relative}, which "
                                   f"cannot be read ({error.strerror}); fix the line or --data-dir") from error
        split = _split_word(fields[2], data_list, number, "data list") if has_split else None
        entries.append((relative, fields[1], split, info))
    if has_split:
        how = "with its split column (0 and 1 train, 2 test)"
    elif split_list is not None:
        splits = _read_split_list(split_list, [entry[0] for entry in entries])
        entries = [(path, group, splits[path], info) for path, group, _, info in entries]
        how = f"and the split list {split_list} (0 and 1 train, 2 test)"
    else:
        groups = {}
        for path, group, _, _ in entries:
            groups.setdefault(group, []).append(path)
        splits = _split_at_random(groups, seed, fraction)
        entries = [(path, group, splits[path], info) for path, group, _, info in entries]
        how = "without a split: " + _random_split_note(seed, fraction)
    return entries, f"the data list {data_list} {how}"


def _list_images(data_dir: Path, data_list: str | Path | None, split_list: str | Path | None, seed: int,
                 fraction: float) -> _Listing:
    """Every image of the data set, sorted into row order: train before test, then by group, then by path."""
    digests = {}
    if split_list is not None:
        split_list = _find_list_file(split_list, data_dir, "split list")
        digests["split_list"] = file_sha256(split_list)
    if data_list is not None:
        data_list = _find_list_file(data_list, data_dir, "data list")
        digests["data_list"] = file_sha256(data_list)
        rows, how = _listing_from_list(data_dir, data_list, split_list, seed, fraction)
        skipped = []
    else:
        rows, how, skipped = _listing_from_folders(data_dir, split_list, seed, fraction, image_suffixes())
    rows.sort(key=lambda row: (SPLITS.index(row[2]), row[1], row[0]))
    for split in SPLITS:
        if not any(row[2] == split for row in rows):
            raise DatasetFileError(f"the {split} split of {data_dir} is empty ({how}); give it images")
    counts = {split: sum(row[2] == split for row in rows) for split in SPLITS}
    groups = {split: len({row[1] for row in rows if row[2] == split}) for split in SPLITS}
    how_split = (f"folder data {data_dir}: {how}; train: {counts['train']} images, {groups['train']} groups; "
                 f"test: {counts['test']} images, {groups['test']} groups")
    return _Listing(paths=[row[0] for row in rows], groups=[row[1] for row in rows], splits=[row[2] for row in rows],
                    stats=[(row[3].st_size, row[3].st_mtime_ns) for row in rows], how_split=how_split,
                    skipped=skipped, list_digests=digests)


# Decoding: run in worker processes, so every function below reads only its arguments.

@contextlib.contextmanager
def _strict_decoding():
    """Pillow set to raise on a truncated file instead of filling the missing pixels."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _is_colour(mode: str) -> bool:
    """Whether an image of this Pillow mode holds colour: palette images count as colour, since they
    convert to RGB."""
    return mode in ("P", "PA") or Image.getmodebase(mode) == "RGB"


def _read_headers(paths: list[str]) -> list[tuple[str, tuple[int, int]] | str]:
    """(mode, (width, height)) of each file from its header alone, or the reason it cannot be opened."""
    headers = []
    with _strict_decoding():
        for path in paths:
            try:
                with Image.open(path) as image:
                    headers.append((image.mode, image.size))
            except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for a broken file
                headers.append(_describe(error))
    return headers


def _resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """The shorter side resized to `size` (bilinear, which Pillow antialiases when shrinking), then the
    centre `size`x`size` cut out: torchvision's Resize(size) and CenterCrop(size) on a PIL image."""
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.BILINEAR)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _decode_image(path: str, image_size: int | None, mode: str) -> np.ndarray:
    """One image as uint8 [C, H, W] in `mode` ("L" or "RGB"): its first frame, forced to load in
    full, transparency composited on white, 16-bit grayscale scaled to 8 bits."""
    with Image.open(path) as image:
        image.load()
        if image.mode.startswith("I;16"):
            image = Image.fromarray(((np.asarray(image, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert(mode)
    if image_size is not None:
        image = _resize_and_crop(image, image_size)
    pixels = np.asarray(image)
    return pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1)


def _decode_chunk(paths: list[str], image_size: int | None, mode: str, shape: tuple[int, int, int]
                  ) -> tuple[np.ndarray | None, tuple[int, str] | None]:
    """(uint8 [len(paths), *shape], None), or (None, (index of the first file that fails, why))."""
    out = np.empty((len(paths), *shape), np.uint8)
    with _strict_decoding():
        for i, path in enumerate(paths):
            try:
                pixels = _decode_image(path, image_size, mode)
            except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ... for a broken file
                return None, (i, _describe(error))
            if pixels.shape != shape:
                return None, (i, f"it decodes to {pixels.shape[2]}x{pixels.shape[1]} pixels (width x height), "
                                 f"unlike its header and the other images' {shape[2]}x{shape[1]}")
            out[i] = pixels
    return out, None


def _start_method() -> str:
    """fork on Linux: workers start in milliseconds and need not import torch again; spawn elsewhere,
    where fork is unsafe (macOS) or missing (Windows)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _run_chunks(task: Callable, chunks: list[list[str]], workers: int, bar: tqdm, consume: Callable) -> None:
    """consume(chunk number, task(chunk)) for each chunk in order; the tasks run on `workers` processes
    (in this one when that is 1). A consume that raises cancels the tasks not yet started."""
    if workers == 1 or len(chunks) == 1:
        for number, chunk in enumerate(chunks):
            consume(number, task(chunk))
            bar.update(len(chunk))
        return
    context = multiprocessing.get_context(_start_method())
    pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context)
    try:
        for number, result in enumerate(pool.map(task, chunks)):
            consume(number, result)
            bar.update(len(chunks[number]))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _unreadable(path: str, why: str) -> DatasetFileError:
    return DatasetFileError(f"image {path} cannot be decoded ({why}); replace it or delete it")


def _decode_settings(files: list[str], image_size: int | None, channels: int | None, workers: int,
                     progress: bool) -> tuple[str, int, int]:
    """(Pillow mode, H, W) of the decoded images. The headers are read only when the channels or the
    size come from the data; images of mixed sizes without `image_size` are an error naming two."""
    if channels is not None and image_size is not None:
        return ("L" if channels == 1 else "RGB"), image_size, image_size
    headers = []

    def keep(number: int, result: list) -> None:
        for i, header in enumerate(result):
            if isinstance(header, str):
                raise _unreadable(files[number * HEADER_CHUNK + i], header)
        headers.extend(result)

    with tqdm(total=len(files), desc="reading image headers", unit="img", disable=not progress, leave=False) as bar:
        _run_chunks(_read_headers, _chunks(files, HEADER_CHUNK), workers, bar, keep)
    if channels is None:
        channels = 3 if any(_is_colour(mode) for mode, _ in headers) else 1
    if image_size is not None:
        return ("L" if channels == 1 else "RGB"), image_size, image_size
    first = headers[0][1]
    other = next((i for i, (_, size) in enumerate(headers) if size != first), None)
    if other is not None:
        size = headers[other][1]
        raise DatasetFileError(f"the images differ in size: {files[0]} is {first[0]}x{first[1]} and "
                               f"{files[other]} is {size[0]}x{size[1]} pixels (width x height); pass "
                               "--image-size N to resize each image's shorter side to N and centre-crop it to NxN")
    return ("L" if channels == 1 else "RGB"), first[1], first[0]


def _decode_into(images: np.ndarray, files: list[str], image_size: int | None, mode: str, workers: int,
                 progress: bool) -> None:
    """Decode `files` into the rows of `images` (uint8 [N, C, H, W]), in parallel."""
    shape = images.shape[1:]
    per_chunk = max(1, min(1024, CHUNK_BYTES // int(np.prod(shape)), math.ceil(len(files) / (4 * workers))))

    def store(number: int, result: tuple) -> None:
        pixels, failure = result
        start = number * per_chunk
        if failure is not None:
            raise _unreadable(files[start + failure[0]], failure[1])
        images[start:start + len(pixels)] = pixels

    task = partial(_decode_chunk, image_size=image_size, mode=mode, shape=shape)
    with tqdm(total=len(files), desc="decoding images", unit="img", disable=not progress) as bar:
        _run_chunks(task, _chunks(files, per_chunk), workers, bar, store)


# The cache: one folder per key under the cache folder, holding images.npy and meta.json.

def _cache_keys(data_dir: Path, listing: _Listing, settings: dict) -> tuple[str, str]:
    """(key of the entry, key of its source). The entry's key covers the files (paths, groups, splits,
    sizes, modification times) and the decode settings; the source's covers the data folder and the
    settings alone, so that an entry that a changed file replaced can be found and removed."""
    settings = {"format": CACHE_FORMAT, "pillow": PIL.__version__, **settings, "lists": listing.list_digests}
    files = json.dumps([listing.paths, listing.groups, listing.splits, listing.stats])
    entry = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + files.encode())
    source = hashlib.sha256(json.dumps({"data_dir": str(data_dir), **settings}, sort_keys=True).encode())
    return entry.hexdigest(), source.hexdigest()


def _read_meta(entry: Path) -> dict | None:
    try:
        return json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _open_images(entry: Path, rows: int) -> tuple[np.ndarray, dict] | None:
    """The entry's images memory-mapped (copy-on-write: writable for torch, never written back to the
    file) and its metadata, or None when the entry is missing or does not match the listing."""
    meta = _read_meta(entry)
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("rows") != rows:
        return None
    try:
        images = np.load(entry / "images.npy", mmap_mode="c")
    except (OSError, ValueError):
        return None
    expected = (rows, *(meta.get(key) for key in ("channels", "height", "width")))
    if images.dtype != np.uint8 or images.shape != expected:
        return None
    return images, meta


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, and another user's
        pass
    return True


def _remove_stale_builds(cache_dir: Path) -> None:
    """Remove the build folders of processes that died while building."""
    for folder in cache_dir.glob(".building-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _build_entry(entry: Path, files: list[str], image_size: int | None, channels: int | None, source: str,
                 workers: int, progress: bool) -> None:
    """Decode `files` into a build folder and rename it to `entry`: whenever the process dies, `entry`
    is either absent or complete. Another process that finished the same entry first wins."""
    cache_dir = entry.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache_dir)
    build = cache_dir / f".building-{entry.name}-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir()
    try:
        mode, height, width = _decode_settings(files, image_size, channels, workers, progress)
        shape = (len(files), 1 if mode == "L" else 3, height, width)
        images = np.lib.format.open_memmap(build / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        _decode_into(images, files, image_size, mode, workers, progress)
        images.flush()
        del images
        meta = {"format": CACHE_FORMAT, "rows": shape[0], "channels": shape[1], "height": height, "width": width,
                "source": source}
        (build / "meta.json").write_text(json.dumps(meta))
        for path in (build / "images.npy", build / "meta.json", build):
            _fsync(path)
        try:
            os.rename(build, entry)
        except OSError:
            if _read_meta(entry) is None:
                raise
            shutil.rmtree(build, ignore_errors=True)  # the same entry, built by another process
        _fsync(cache_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def _remove_superseded(entry: Path, source: str) -> list[str]:
    """Remove the other entries of the same data folder and settings (built before a file changed)."""
    removed = []
    for other in sorted(entry.parent.iterdir()):
        if other != entry and not other.name.startswith(".") and (_read_meta(other) or {}).get("source") == source:
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other.name)
    return removed


def _entry_name(data_dir: Path, key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", data_dir.name).strip("._") or "data"
    return f"{readable[:40]}-{key[:16]}"


def _image_split(images: torch.Tensor, listing: _Listing, rows: slice) -> ImageSplit:
    groups, labels = np.unique(np.array(listing.groups[rows], dtype=object).astype(str), return_inverse=True)
    return ImageSplit(images=images[rows], labels=torch.from_numpy(labels.astype(np.int64).reshape(-1)),
                      groups=[str(group) for group in groups], files=listing.paths[rows])


def _groups_note(train: ImageSplit, test: ImageSplit) -> str:
    shared = len(set(test.groups) & set(train.groups))
    kind = "seen groups" if shared == len(test.groups) else "unseen groups" if shared == 0 else "a partial overlap"
    return f"test groups that are train groups: {shared} of {len(test.groups)} ({kind})"


def _skipped_note(skipped: list[str]) -> str:
    examples = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    return f"skipped, as not images in a group folder: {len(skipped)} ({examples})"


def _worker_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_folder(data_dir: str | Path, *, data_list: str | Path | None = None, split_list: str | Path | None = None,
                image_size: int | None = None, channels: int | None = None,
                cache_dir: str | Path = DEFAULT_CACHE_DIR, split_seed: int = 0, test_fraction: float = TEST_FRACTION,
                workers: int | None = None, progress: bool = True) -> FolderData:
    """A folder of grouped images as uint8 train and test splits, memory-mapped from the cache.

    Layouts (docs/data.md): `data_dir/train/<group>/...` and `data_dir/test/<group>/...`; group folders
    alone, each group's images split at random with `split_seed` (or by `split_list`); or a
    `data_list` of `relative/path group [split]` lines, split by its column, by `split_list`, or at
    random. `image_size` N resizes the shorter side to N and centre-crops NxN; without it every image
    must have one size. `channels` 1 or 3 forces grayscale or RGB; by default 3 when any image holds
    colour. The images are decoded once, by `workers` processes (default: one per CPU), into a cache
    entry under `cache_dir` keyed by the files' paths, sizes and modification times and the settings.
    Bad data raises DatasetFileError naming the file or folder.
    """
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    if split_seed < 0:
        raise ValueError(f"split_seed must be at least 0, got {split_seed}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DatasetFileError(f"--data-dir {data_dir} is not a folder; give the folder that holds the images")
    listing = _list_images(data_dir, data_list, split_list, split_seed, test_fraction)
    settings = {"image_size": image_size, "channels": channels, "split_seed": split_seed,
                "test_fraction": test_fraction}
    key, source = _cache_keys(data_dir, listing, settings)
    entry = Path(cache_dir).expanduser().absolute() / _entry_name(data_dir, key)
    opened = _open_images(entry, len(listing.paths))
    if opened is None:
        shutil.rmtree(entry, ignore_errors=True)  # one that does not match its key: never read as valid
        workers = workers or _worker_count()
        started = time.perf_counter()
        _build_entry(entry, [str(data_dir / path) for path in listing.paths], image_size, channels, source,
                     workers, progress)
        opened = _open_images(entry, len(listing.paths))
        removed = _remove_superseded(entry, source)
        cache_note = (f"decoded {len(listing.paths)} images in {time.perf_counter() - started:.1f} s with "
                      f"{workers} worker process{'es' if workers > 1 else ''} into the cache {entry}"
                      + (f" (removed the entry it replaces, {', '.join(removed)})" if removed else ""))
    else:
        cache_note = f"cache hit: {entry} holds the decoded images"
    array, meta = opened
    images = torch.from_numpy(array)
    train_rows = listing.splits.count("train")
    train = _image_split(images, listing, slice(0, train_rows))
    test = _image_split(images, listing, slice(train_rows, None))
    notes = [listing.how_split, _groups_note(train, test)]
    if listing.skipped:
        notes.append(_skipped_note(listing.skipped))
    channels = "1 channel" if meta["channels"] == 1 else f"{meta['channels']} channels"
    notes.append(f"{channels}, {meta['height']}x{meta['width']} pixels; {cache_note}")
    return FolderData(train=train, test=test, channels=meta["channels"], image_size=(meta["height"], meta["width"]),
                      notes=notes)


def align_test_groups(train: ImageSplit, test: ImageSplit) -> torch.Tensor | None:
    """The test labels as train group ids when every test group is a train group; None when no test
    group is (unseen groups). A partial overlap raises DatasetFileError naming a missing group."""
    ids = {group: i for i, group in enumerate(train.groups)}
    missing = [group for group in test.groups if group not in ids]
    if len(missing) == len(test.groups):
        return None
    if missing:
        raise DatasetFileError(f"test group {missing[0]!r} has no train images ({len(missing)} of the "
                               f"{len(test.groups)} test groups are not train groups); give every test group "
                               "train images, or none of them (unseen groups)")
    return torch.tensor([ids[group] for group in test.groups], dtype=torch.int64)[test.labels]
