"""Data: the shipped MNIST loads as tensors; broken files give one clear error."""
import gzip
import re
import shutil

import pytest
import torch

import data_loader
from conftest import ROOT

DATA = ROOT / "data"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("split,counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_mnist_loads_with_the_right_shapes_and_label_counts(split, counts):
    images, labels = data_loader.load_split(DATA, split)
    assert images.shape == (sum(counts), 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.bincount().tolist() == counts
    assert images.min() == 0 and images.max() == 1


def copy_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(DATA / "MNIST" / "raw", raw)
    for path in raw.iterdir():
        path.chmod(0o644)
    return raw


def test_truncated_file_names_the_file(tmp_path):
    raw = copy_mnist(tmp_path)
    (raw / "SHA256SUMS").unlink()  # so that the size check, not the hash, catches it
    path = raw / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-1000]))
    with pytest.raises(data_loader.DatasetFileError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        data_loader.load_split(tmp_path, "test")


def test_corrupt_file_fails_its_checksum(tmp_path):
    raw = copy_mnist(tmp_path)
    path = raw / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(data_loader.DatasetFileError, match="t10k-labels-idx1-ubyte.gz.*SHA256.*To fix it"):
        data_loader.load_split(tmp_path, "test")


def test_garbage_file_gives_the_clear_error(tmp_path):
    raw = copy_mnist(tmp_path)
    (raw / "SHA256SUMS").unlink()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(data_loader.DatasetFileError, match="t10k-labels-idx1-ubyte.gz.*decompressed"):
        data_loader.load_split(tmp_path, "test")


def test_a_missing_mnist_file_is_not_downloaded_and_the_message_says_how_to_fix_it(tmp_path, monkeypatch):
    def download(*args):
        raise AssertionError("MNIST ships with the repository: nothing is downloaded")

    monkeypatch.setattr(data_loader, "_download_with_torchvision", download)
    fix = (re.escape(f"missing. To fix it, copy the four MNIST IDX files into {tmp_path / 'MNIST' / 'raw'} ")
           + ".*" + re.escape(f"`git -C {data_loader.REPOSITORY} checkout -- data/MNIST/raw`"))
    with pytest.raises(data_loader.DatasetFileError, match=fix):
        data_loader.load_split(tmp_path, "train")
    assert list(tmp_path.iterdir()) == []


def test_uncompressed_files_load_too(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / stem).write_bytes(gzip.decompress((DATA / "MNIST" / "raw" / f"{stem}.gz").read_bytes()))
    images, labels = data_loader.load_split(tmp_path, "test")
    assert images.shape == (10000, 1, 28, 28) and labels.bincount().tolist() == TEST_COUNTS


FASHION = data_loader.DATASETS["fashion-mnist"][1]


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist package is not installed")
def test_fashion_mnist_loads_from_the_debian_package(tmp_path):
    images, labels = data_loader.load_split(tmp_path, "test", "fashion-mnist")
    assert images.shape == (10000, 1, 28, 28) and labels.bincount().tolist() == [1000] * 10


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_loader, "DATASETS", {"fashion-mnist": ("FashionMNIST", tmp_path / "nowhere")})
    monkeypatch.setattr(data_loader, "_download_with_torchvision", lambda *a: None)
    with pytest.raises(data_loader.DatasetFileError, match="apt-get install -y dataset-fashion-mnist"):
        data_loader.load_split(tmp_path, "test", "fashion-mnist")


def test_validation_split_holds_out_the_last_ten_thousand_train_images():
    (train_x, train_y), (held_x, held_y) = data_loader.evaluation_splits(data_loader.DataSpec("mnist", str(DATA)), "validation")[:2]
    assert (len(train_y), len(held_y)) == (50000, 10000)
    all_x, _ = data_loader.load_split(DATA, "train")
    assert torch.equal(held_x, all_x[50000:]) and torch.equal(train_x, all_x[:50000])


def test_unknown_evaluation_split_is_refused():
    with pytest.raises(ValueError, match="validation"):
        data_loader.evaluation_splits(data_loader.DataSpec("mnist", str(DATA)), "dev")


def test_the_processes_shares_of_a_batch_are_its_whole_groups_in_order():
    labels = torch.arange(12).repeat_interleave(9)  # 12 groups of 9 images
    split = data_loader.ImageSplit(torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1), labels,
                                   [str(g) for g in range(12)])
    whole = data_loader.Batches(split, 4 * 3, "cpu", 4, 3)
    shares = [data_loader.Batches(split, 4 * 3, "cpu", 4, 3, rank=rank, ranks=2) for rank in range(2)]
    order = whole.epoch_order(torch.Generator().manual_seed(0))
    for step in range(whole.steps_per_epoch):
        x, groups = whole.batch(order, step)
        parts = [share.batch(order, step) for share in shares]
        assert torch.equal(torch.cat([part[0] for part in parts]), x)
        # Each share's group ids are its own [0, G / 2), the whole batch's ids of its groups shifted.
        assert torch.equal(torch.cat([part[1] + rank * 2 for rank, part in enumerate(parts)]), groups)
        assert all(share.num_groups == 2 for share in shares)
    with pytest.raises(ValueError, match="cannot share 3 groups"):
        data_loader.Batches(split, 9, "cpu", 3, 3, ranks=2)
    with pytest.raises(ValueError, match="random batches are one process's"):
        data_loader.Batches(split, 12, "cpu", rank=1, ranks=2)
