"""MNIST-style datasets as whole tensors, and the reference's minibatch schedule.

A split is loaded once into two tensors: images float32 in [0, 1] with shape [N, 1, 28, 28] and
labels int64 with shape [N]. Training indexes them with a fresh permutation each epoch, so the hot
path has no per-sample Python code and the data can live on the GPU.

The IDX files are read directly (gzip-compressed or not) from `<data-dir>/<Folder>/raw/`, the layout
torchvision uses; MNIST ships with this repository under `data/MNIST/raw/`. Example:

    python -c "import data_loader; x, y = data_loader.load_split('data', 'train'); print(x.shape)"
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils import num_training_groups, training_groups

DATASETS = {
    # name: (folder under the data dir, extra folder searched when the files are not there)
    "mnist": ("MNIST", None),
    "fashion-mnist": ("FashionMNIST", Path("/usr/share/datasets/fashion-mnist")),
}
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
EVALUATION_SPLITS = ("test", "validation")
VALIDATION_START = 50000  # the validation split: train images [50000, 60000)
IMAGE_SIZE = 28
IDX_MAGIC = {"images": 2051, "labels": 2049}

HOW_TO_FIX = {
    "mnist": "restore it with `git checkout -- data/MNIST/raw` (the repository carries MNIST) "
    "or copy the four MNIST IDX files into {folder}",
    "fashion-mnist": "install Debian's package (`apt-get install -y dataset-fashion-mnist`, "
    "which puts the files in /usr/share/datasets/fashion-mnist/), or copy the four "
    "Fashion-MNIST IDX files into {folder}",
}


class DatasetFileError(RuntimeError):
    """A dataset file is missing, truncated or corrupt; the message names it and says how to fix it."""


def _fail(dataset: str, path: Path, problem: str) -> DatasetFileError:
    fix = HOW_TO_FIX[dataset].format(folder=path.parent)
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


def _download_with_torchvision(dataset: str, data_dir: Path) -> None:
    """Fetch missing files where a network exists; silently does nothing where none does."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[dataset]
    try:
        for train in (True, False):
            cls(str(data_dir), train=train, download=True)
    except Exception:  # no network (the usual case here): the caller reports the missing file
        pass


def read_idx_split(data_dir: str | Path, split: str, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    """A whole IDX split as arrays: images uint8 [N, 28, 28] and labels uint8 [N]."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    if split not in SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_PREFIX)}")
    raw_dir = Path(data_dir) / DATASETS[dataset][0] / "raw"
    arrays = {}
    for kind, suffix in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
        stem = f"{SPLIT_PREFIX[split]}-{suffix}"
        path = _find_file(dataset, raw_dir, stem)
        if path is None:
            _download_with_torchvision(dataset, Path(data_dir))
            path = _find_file(dataset, raw_dir, stem)
        if path is None:
            raise _fail(dataset, raw_dir / (stem + ".gz"), "it is missing")
        arrays[kind] = read_idx(path, kind, dataset)
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise _fail(dataset, raw_dir, f"{len(images)} images but {len(labels)} labels")
    return images, labels


def load_split(data_dir: str | Path, split: str, dataset: str = "mnist",
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a whole split: images float32 [N, 1, 28, 28] in [0, 1] and labels int64 [N], on `device`."""
    images, labels = read_idx_split(data_dir, split, dataset)
    images = torch.from_numpy(images.copy()).to(device).unsqueeze(1).float().div_(255.0)
    return images, torch.from_numpy(labels.astype(np.int64)).to(device)


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


def add_data_arguments(parser, from_run: bool = False) -> None:
    """The flags that choose the data (the fields of DataSpec). With `from_run`, for the scripts that
    evaluate a trained run, they default to None: the run's args.json then supplies them."""
    add = parser.add_argument

    def default(value):
        return None if from_run else value

    run = " (default: the run's, from args.json)" if from_run else ""
    add("--dataset", choices=DATASET_CHOICES, default=default("mnist"),
        help=f"mnist or fashion-mnist (IDX files), or folder: grouped images under --data-dir (docs/data.md){run}")
    add("--data-dir", default=default("data"),
        help=f"IDX data sets: the folder holding <Dataset>/raw/; folder: the data set's root{run}")
    add("--data-list", default=None, help="folder data: a file of `relative/path group [split]` lines")
    add("--split-list", default=None, help="folder data: a file of `relative/path split` lines (0/1 train, 2 test)")
    add("--image-size", type=int, default=None,
        help="folder data: resize the shorter side to N and centre-crop NxN (default: the images' own size)")
    add("--channels", type=int, choices=(1, 3), default=None,
        help="folder data: 1 (grayscale) or 3 (RGB) (default: 3 when any image is colour, else 1)")
    add("--cache-dir", default=None, help="folder data: where decoded images are cached (default: cache/)")


def idx_split(data_dir: str | Path, split: str, dataset: str = "mnist") -> ImageSplit:
    """An IDX split as an ImageSplit: uint8 [N, 1, 28, 28], labels the digits (or garments) 0-9."""
    images, labels = read_idx_split(data_dir, split, dataset)
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


def as_float(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 images moved to `device` as float32 in [0, 1] (exactly load_split's values)."""
    return images.to(device).float().div_(255.0)


def labelled_images(spec: DataSpec, split: str, device: torch.device | str = "cpu", progress: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split of `spec`: float images [N, C, H, W] in [0, 1] on `device`, labels [N] and the
    group names the labels index."""
    if spec.dataset != FOLDER:
        images, labels = load_split(spec.data_dir, split, spec.dataset, device)
        return images, labels, [str(label) for label in range(10)]
    part = getattr(load_data(spec, progress), split)
    return as_float(part.images, device), part.labels.to(device), part.groups


def validation_rows(labels: torch.Tensor, unseen_groups: bool) -> torch.Tensor:
    """Boolean mask [N] of the train rows that form the validation split of a folder data set: the last
    VALIDATION_FRACTION of each group's images, or, where the test groups are not training groups, the
    last VALIDATION_FRACTION of the groups (so validation asks what the test split asks)."""
    if unseen_groups:
        return labels >= int(labels.max() + 1) - max(1, round(VALIDATION_FRACTION * int(labels.max() + 1)))
    counts = torch.bincount(labels)
    order = torch.argsort(labels, stable=True)
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - (torch.cumsum(counts, 0) - counts)[labels[order]]
    return rank >= counts[labels] - (counts[labels] * VALIDATION_FRACTION).round().long()


def halves_per_group(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask [N]: the first half (rounded up) of each group's rows, in row order."""
    counts = torch.bincount(labels)
    order = torch.argsort(labels, stable=True)
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - (torch.cumsum(counts, 0) - counts)[labels[order]]
    return rank < (counts[labels] + 1) // 2


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
    return (as_float(train_x, device), train_y.to(device)), (as_float(held_x, device), held_y.to(device)), note


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
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(labels), device=labels.device) - starts[sorted_labels]
    usable = rank < (counts // k * k)[sorted_labels]
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
    """

    def __init__(self, split: ImageSplit, batch_size: int, device: torch.device | str,
                 groups_per_batch: int | None = None, images_per_group: int | None = None,
                 group_size: int | None = None) -> None:
        # Where it fits (CPU memory, or a GPU), the whole split lives on the device; a memory-mapped
        # split on the CPU is read through the page cache, batch by batch.
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size, self.images_per_group = batch_size, images_per_group
        self.group_size = group_size
        if images_per_group is None:
            self.num_groups = num_training_groups(len(split.groups), batch_size, group_size)
            self.steps_per_epoch = len(self.labels) // batch_size
        else:
            self.num_groups = groups_per_batch
            counts = torch.bincount(split.labels)
            self.steps_per_epoch = int((counts // images_per_group).sum()) // groups_per_batch
            self.slots = torch.arange(groups_per_batch, device=device).repeat_interleave(images_per_group)
        self.device = torch.device(device)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """The rows of one epoch; rows [s * batch_size, (s + 1) * batch_size) are batch s."""
        if self.images_per_group is None:
            return torch.randperm(len(self.labels), generator=generator, device=generator.device)
        return group_balanced_order(self.labels, self.num_groups, self.images_per_group, generator)

    def batch(self, order: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step` of an epoch order: float images [B, C, H, W] in [0, 1] and group ids [B] in
        [0, num_groups)."""
        index = order[step * self.batch_size:(step + 1) * self.batch_size]
        # index_select gathers rows about twice as fast as images[index] on the CPU.
        x = as_float(self.images.index_select(0, index), self.device)
        if self.images_per_group is not None:
            return x, self.slots
        return x, training_groups(self.labels.index_select(0, index), self.group_size)
