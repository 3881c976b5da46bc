"""Folder data (data_loader.load_folder): the three layouts, decoding (formats, suffixes, channels,
size, transparency), the cache, the export of an IDX split that reads back as the IDX tensors, and one
`error:` line naming the file or folder for each bad input. All data is written to tmp_path."""
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import data_loader
from conftest import ROOT
from data_loader import DatasetFileError, ImageSplit, align_test_groups, load_folder
from runs import reports_errors
from studies import export_folder


def save(path, pixels, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)


def noise(rng, size, colour=False):
    return rng.integers(0, 256, (size, size, 3) if colour else (size, size), dtype=np.uint8)


def load(folder, tmp_path, **options):
    return load_folder(folder, cache_dir=tmp_path / "cache", workers=1, progress=False, **options)


def as_chw(pixels):
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1).transpose(2, 0, 1).copy())


@pytest.fixture
def split_folders(tmp_path):
    """train/<group>/ and test/<group>/ with 3 groups of 32 px grayscale PNGs (30 train, 8 test each);
    returns the folder and {relative path: pixels}."""
    rng = np.random.default_rng(0)
    pixels = {}
    for split, count in (("train", 30), ("test", 8)):
        for group in ("cat", "dog", "émeu 3"):
            for index in rng.permutation(count):  # written out of order
                relative = f"{split}/{group}/{index:03d}.png"
                pixels[relative] = noise(rng, 32)
                save(tmp_path / "data" / relative, pixels[relative])
    return tmp_path / "data", pixels


@pytest.fixture
def colour_groups(tmp_path):
    """50 group folders of 4 images at 64 px: RGB PNG, RGB JPEG, grayscale PNG, and a grayscale JPEG
    under an upper-case suffix."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "groups"
    for group in range(50):
        save(folder / f"g{group:02d}" / "a.png", noise(rng, 64, colour=True))
        save(folder / f"g{group:02d}" / "b.jpg", noise(rng, 64, colour=True), quality=95)
        save(folder / f"g{group:02d}" / "c.png", noise(rng, 64))
        save(folder / f"g{group:02d}" / "d.JPG", noise(rng, 64), format="JPEG")
    return folder


def test_train_and_test_folders_give_rows_sorted_by_group_then_path(split_folders, tmp_path):
    folder, pixels = split_folders
    data = load(folder, tmp_path)
    assert data.channels == 1 and data.image_size == (32, 32)
    for split, count in ((data.train, 90), (data.test, 24)):
        assert split.groups == ["cat", "dog", "émeu 3"]
        assert len(split.files) == count
        assert split.files == sorted(split.files, key=lambda path: (path.split("/")[1], path))
        assert [split.groups[label] for label in split.labels] == [path.split("/")[1] for path in split.files]
        assert torch.equal(split.images, torch.stack([as_chw(pixels[path]) for path in split.files]))
    assert "train/ and test/ folders give the split" in data.notes[0]
    assert data.notes[1] == "test groups that are train groups: 3 of 3 (seen groups)"
    assert torch.equal(align_test_groups(data.train, data.test), data.test.labels)


def test_group_folders_alone_are_split_in_each_group_with_the_seed(colour_groups, tmp_path):
    save(colour_groups / "lonely" / "only.png", noise(np.random.default_rng(2), 64, colour=True))
    data = load(colour_groups, tmp_path)
    assert "split at random (seed 0)" in data.notes[0] and "wholly to train" in data.notes[0]
    assert len(data.train.files) == 50 * 3 + 1 and len(data.test.files) == 50  # 20% of 4 images, rounded: 1
    assert "lonely" in data.train.groups and "lonely" not in data.test.groups
    assert not set(data.train.files) & set(data.test.files)
    train_ids = align_test_groups(data.train, data.test)
    assert [data.train.groups[i] for i in train_ids] == [data.test.groups[i] for i in data.test.labels]
    again = load(colour_groups, tmp_path)
    other_seed = load(colour_groups, tmp_path, split_seed=1)
    assert again.test.files == data.test.files and other_seed.test.files != data.test.files


def write_flat_images(folder, count, rng):
    names = [f"{index + 1:06d}.png" for index in range(count)]
    for name in names:
        save(folder / name, noise(rng, 32))
    return names


def test_a_data_list_with_a_celeba_split_list_maps_validation_to_train(tmp_path):
    folder = tmp_path / "img_align_celeba"
    names = write_flat_images(folder, 60, np.random.default_rng(3))
    identity = {name: str(100 + index // 6) for index, name in enumerate(names)}  # 10 identities of 6 images
    partition = {name: "0" if index < 36 else "1" if index < 48 else "2" for index, name in enumerate(names)}
    (folder / "identity_CelebA.txt").write_text("".join(f"{n} {identity[n]}\n" for n in names))
    (tmp_path / "list_eval_partition.txt").write_text("".join(f"{n} {partition[n]}\n" for n in reversed(names)))
    data = load(folder, tmp_path, data_list="identity_CelebA.txt",  # found inside the data folder
                split_list=tmp_path / "list_eval_partition.txt")
    assert data.train.files == [n for n in names if partition[n] in "01"]
    assert data.test.files == [n for n in names if partition[n] == "2"]
    assert [data.test.groups[label] for label in data.test.labels] == [identity[n] for n in data.test.files]
    assert data.test.groups == ["108", "109"] and align_test_groups(data.train, data.test) is None
    assert data.notes[1] == "test groups that are train groups: 0 of 2 (unseen groups)"


def test_a_data_list_split_column_takes_words_or_numbers(tmp_path):
    folder = tmp_path / "flat"
    names = write_flat_images(folder, 12, np.random.default_rng(4))
    splits = ["train", "TEST", "0", "2"] * 3
    lines = [f"{name}\tgroup {index // 6}\t{split}\n" for index, (name, split) in enumerate(zip(names, splits))]
    (tmp_path / "list.txt").write_text("# path, group, split\n" + "".join(lines))
    data = load(folder, tmp_path, data_list=tmp_path / "list.txt")
    assert data.test.files == [name for name, split in zip(names, splits) if split in ("TEST", "2")]
    assert data.test.groups == ["group 0", "group 1"]  # tab-separated columns keep the space
    assert "split column" in data.notes[0]


def test_a_data_list_without_a_split_is_split_at_random(tmp_path):
    folder = tmp_path / "flat"
    names = write_flat_images(folder, 20, np.random.default_rng(5))
    (tmp_path / "list.txt").write_text("".join(f"{name} {index % 2}\n" for index, name in enumerate(names)))
    data = load(folder, tmp_path, data_list=tmp_path / "list.txt")
    assert len(data.test.files) == 4 and data.test.groups == ["0", "1"]  # 2 of each group's 10
    assert "split at random" in data.notes[0]


def test_files_that_are_not_images_are_skipped_and_counted(split_folders, tmp_path):
    folder, _ = split_folders
    for junk in ("README.md", ".DS_Store", "train/cat/notes.txt", "train/loose.png", "test/dog/._000.png"):
        (folder / junk).write_bytes(b"not an image")
    (folder / "train" / "dog" / ".ipynb_checkpoints").mkdir()
    (folder / "train" / "dog" / ".ipynb_checkpoints" / "x.png").write_bytes(b"not an image")
    data = load(folder, tmp_path)
    assert len(data.train.files) == 90 and data.train.groups == ["cat", "dog", "émeu 3"]
    assert data.notes[2].startswith("skipped, as not images in a group folder: 5 (")


def test_nested_folders_count_as_their_groups_images(split_folders, tmp_path):
    folder, pixels = split_folders
    save(folder / "train" / "cat" / "close-ups" / "x.png", noise(np.random.default_rng(6), 32))
    data = load(folder, tmp_path)
    assert "train/cat/close-ups/x.png" in data.train.files
    assert data.train.groups[data.train.labels[data.train.files.index("train/cat/close-ups/x.png")]] == "cat"


def test_upper_case_suffixes_are_images(tmp_path):
    rng = np.random.default_rng(7)
    pixels = {name: noise(rng, 32) for name in ("a.PNG", "b.Png", "c.JPG", "d.JPEG")}
    for group in ("x", "y"):
        for name, image in pixels.items():
            save(tmp_path / "data" / group / name, image, format="PNG" if "p" in name.lower() else "JPEG")
    data = load(tmp_path / "data", tmp_path)
    assert len(data.train.files) + len(data.test.files) == 8


def test_channels_are_three_when_any_image_is_colour(colour_groups, tmp_path):
    data = load(colour_groups, tmp_path)
    assert data.channels == 3 and data.image_size == (64, 64)
    for split in (data.train, data.test):
        for row, path in enumerate(split.files):
            with Image.open(colour_groups / path) as image:
                expected = as_chw(np.asarray(image.convert("RGB")))
            assert torch.equal(split.images[row], expected), path


def test_channels_can_be_forced(colour_groups, tmp_path):
    gray = load(colour_groups, tmp_path, channels=1)
    assert gray.channels == 1
    with Image.open(colour_groups / gray.train.files[0]) as image:
        assert torch.equal(gray.train.images[0], as_chw(np.asarray(image.convert("L"))))
    only_gray = tmp_path / "gray"
    for group in ("a", "b"):
        for index in range(3):
            save(only_gray / group / f"{index}.png", noise(np.random.default_rng(index), 32))
    assert load(only_gray, tmp_path).channels == 1
    rgb = load(only_gray, tmp_path, channels=3)
    assert rgb.channels == 3 and torch.equal(rgb.train.images[:, 0], rgb.train.images[:, 2])


def test_image_size_resizes_the_shorter_side_and_crops_the_centre_as_torchvision_does(tmp_path):
    rng = np.random.default_rng(8)
    shapes = {"tall.png": (80, 48), "wide.png": (48, 81), "small.png": (20, 20), "square.png": (64, 64)}
    for group in ("a", "b"):
        for name, (height, width) in shapes.items():
            save(tmp_path / "data" / group / name, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    data = load(tmp_path / "data", tmp_path, image_size=32)
    assert data.image_size == (32, 32)
    reference = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])
    for split in (data.train, data.test):
        for row, path in enumerate(split.files):
            with Image.open(tmp_path / "data" / path) as image:
                assert torch.equal(split.images[row], as_chw(np.asarray(reference(image.convert("RGB"))))), path


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16, :, 3] = 255  # top half opaque black, bottom half transparent
    for group in ("a", "b"):
        for index in range(3):
            save(tmp_path / "data" / group / f"{index}.png", rgba)
    data = load(tmp_path / "data", tmp_path)
    assert data.channels == 3
    assert (data.train.images[:, :, :16] == 0).all() and (data.train.images[:, :, 16:] == 255).all()


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits(tmp_path):
    for group in ("a", "b"):
        for index in range(3):
            path = tmp_path / "data" / group / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(path)
    data = load(tmp_path / "data", tmp_path)
    assert data.channels == 1 and data.train.images[0, 0, 0].tolist() == [0, 100, 255]


def test_the_mnist_export_reads_back_as_the_idx_tensors(tmp_path, capsys):
    out = tmp_path / "mnist_folder"
    export_folder.main(["--split", "train", "--out", str(out), "--limit", "300", "--no-progress"])
    export_folder.main(["--split", "test", "--out", str(out), "--limit", "300", "--no-progress"])
    data = load(out, tmp_path)
    assert data.channels == 1 and data.image_size == (28, 28)
    for split, rows in (("train", data.train), ("test", data.test)):
        images, labels = data_loader.idx_arrays(ROOT / "data", split)
        order = np.argsort(labels[:300], kind="stable")  # by label, then index: the folder's row order
        assert rows.images.dtype == torch.uint8
        assert torch.equal(rows.images, torch.from_numpy(images[:300][order].copy()).unsqueeze(1))
        assert torch.equal(rows.labels, torch.from_numpy(labels[:300][order].astype(np.int64)))
    floats, _ = data_loader.load_split(ROOT / "data", "test")
    assert torch.equal(data_loader.to_float(data.test.images, "cpu"), floats[:300][torch.from_numpy(order)])


def test_the_export_refuses_a_split_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "out" / "test").mkdir(parents=True)
    (tmp_path / "out" / "test" / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit:
        export_folder.main(["--out", str(tmp_path / "out"), "--limit", "5", "--no-progress"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out: {tmp_path / 'out' / 'test'} exists and is not empty; give another --out, "
        f"or delete {tmp_path / 'out' / 'test'} first"]
    assert sorted(os.listdir(tmp_path / "out")) == ["test"]  # train/ not written either


def fail_to_decode(*args, **kwargs):
    raise AssertionError("decoded although the cache holds the images")


def test_a_second_load_reads_the_cache_without_decoding(split_folders, tmp_path, monkeypatch):
    folder, _ = split_folders
    first = load(folder, tmp_path)
    assert "decoded 114 images" in first.notes[-1]
    monkeypatch.setattr(data_loader, "_decode_image", fail_to_decode)
    monkeypatch.setattr(data_loader, "_read_headers", fail_to_decode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about a read-only array handed to torch
        second = load(folder, tmp_path)
    assert "cache hit" in second.notes[-1]
    assert torch.equal(second.train.images, first.train.images) and second.test.files == first.test.files


def test_writing_to_the_images_leaves_the_cache_file_as_it_was(split_folders, tmp_path):
    folder, _ = split_folders
    first = load(folder, tmp_path)
    expected = first.train.images.clone()
    first.train.images.add_(1)  # copy-on-write memory: private to this process
    assert torch.equal(load(folder, tmp_path).train.images, expected)


def test_a_changed_file_rebuilds_the_cache_and_drops_the_old_entry(split_folders, tmp_path):
    folder, pixels = split_folders
    first = load(folder, tmp_path)
    changed = np.full((32, 32), 7, np.uint8)
    save(folder / "test/dog/003.png", changed)
    os.utime(folder / "test/dog/003.png", ns=(1, 1))  # a new modification time even on a coarse clock
    second = load(folder, tmp_path)
    assert "decoded 114 images" in second.notes[-1] and "removed the entry it replaces" in second.notes[-1]
    row = second.test.files.index("test/dog/003.png")
    assert (second.test.images[row] == 7).all() and not (first.test.images[row] == 7).all()
    assert len([entry for entry in os.listdir(tmp_path / "cache") if not entry.startswith(".")]) == 1


def test_other_decode_settings_get_their_own_entry(split_folders, tmp_path):
    folder, _ = split_folders
    load(folder, tmp_path)
    resized = load(folder, tmp_path, image_size=16)
    assert resized.image_size == (16, 16) and "decoded" in resized.notes[-1]
    assert "cache hit" in load(folder, tmp_path).notes[-1]


def test_a_build_that_dies_leaves_no_entry(split_folders, tmp_path, monkeypatch):
    folder, _ = split_folders
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "cache" / f".building-data-0123456789abcdef-{dead.pid}"
    stale.mkdir(parents=True)  # left by a process killed while building
    decode = data_loader._decode_image
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt
        return decode(*args)

    monkeypatch.setattr(data_loader, "_decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(folder, tmp_path)
    assert os.listdir(tmp_path / "cache") == []
    monkeypatch.setattr(data_loader, "_decode_image", decode)
    assert "decoded 114 images" in load(folder, tmp_path).notes[-1]


def test_worker_processes_decode_what_one_process_does(colour_groups, tmp_path):
    one = load(colour_groups, tmp_path)
    pool = load_folder(colour_groups, cache_dir=tmp_path / "pool_cache", workers=2, progress=False)
    assert "2 worker processes" in pool.notes[-1]
    assert torch.equal(pool.train.images, one.train.images) and torch.equal(pool.test.images, one.test.images)


def image_split(groups, labels):
    return ImageSplit(images=torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels=torch.tensor(labels),
                      groups=groups)


def test_align_test_groups_maps_shared_groups_and_rejects_a_partial_overlap():
    train = image_split(["a", "b", "c"], [0, 1, 2])
    assert align_test_groups(train, image_split(["a", "c"], [1, 0, 1])).tolist() == [2, 0, 2]
    assert align_test_groups(train, image_split(["x", "y"], [0, 1])) is None
    with pytest.raises(DatasetFileError, match="test group 'x' has no train images"):
        align_test_groups(train, image_split(["a", "x"], [0, 1]))


def two_groups(folder, rng, size=32):
    for group in ("a", "b"):
        for index in range(5):
            save(folder / group / f"{index}.png", noise(rng, size))


def bad_input(tmp_path, case):
    """(load_folder's options, text the error line must hold) of one bad input written to tmp_path."""
    rng = np.random.default_rng(9)
    data = tmp_path / "data"
    if case == "missing data dir":
        return {"data_dir": data}, f"{data} is not a folder"
    if case == "empty test split":
        two_groups(data / "train", rng)
        (data / "test").mkdir()
        return {"data_dir": data}, f"{data / 'test'} holds no group folder"
    if case == "train without test":
        two_groups(data / "train", rng)
        return {"data_dir": data}, f"{data} holds train/ but no test/"
    if case == "groups too small for a test split":
        for group in ("a", "b"):
            save(data / group / "0.png", noise(rng, 32))
        return {"data_dir": data}, f"the test split of {data} is empty"
    if case == "group without an image":
        two_groups(data, rng)
        (data / "c").mkdir()
        (data / "c" / "README.txt").write_text("no images here")
        return {"data_dir": data}, f"group folder {data / 'c'} holds no image"
    if case == "unreadable image":
        two_groups(data, rng)
        (data / "a" / "9.png").write_bytes(b"\x89PNG not really")
        return {"data_dir": data}, f"image {data / 'a' / '9.png'} cannot be decoded"
    if case in ("truncated png", "truncated jpeg"):
        two_groups(data, rng)
        path = data / "b" / ("9.png" if case == "truncated png" else "9.jpg")
        save(path, noise(rng, 32))
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return {"data_dir": data}, f"image {path} cannot be decoded"
    if case == "mixed sizes":
        two_groups(data, rng)
        save(data / "b" / "9.png", noise(rng, 64))
        return {"data_dir": data}, f"{data / 'a' / '0.png'} is 32x32 and {data / 'b' / '9.png'} is 64x64 pixels"
    if case.startswith("list") or case.startswith("split list"):
        names = write_flat_images(data, 6, rng)
        lines = [f"{name} {index % 2}" for index, name in enumerate(names)]
        bad_line = {"list line with one column": names[3], "list line with four columns": f"{names[3]} 1 0 0",
                    "list names a missing file": "000099.png 1", "list repeats a path": f"{names[0]} 1"}
        if case == "list split word":
            lines = [f"{line} 0" for line in lines]
            bad_line[case] = f"{names[3]} 1 later"
        lines[3] = bad_line.get(case, lines[3])
        listed = tmp_path / "list.txt"
        listed.write_text("" if case == "list without lines" else "\n".join(lines) + "\n")
        if case == "split list without a path":
            split = tmp_path / "split.txt"
            split.write_text("".join(f"{name} 0\n" for name in names[1:]))
            expected = f"split list {split} gives no split for {names[0]}"
            return {"data_dir": data, "data_list": listed, "split_list": split}, expected
        expected = {"list names a missing file": f"line 4 names {data / '000099.png'}",
                    "list repeats a path": f"line 4: {names[0]} is listed on line 1 already",
                    "list without lines": f"data list {listed} holds no line"}
        return {"data_dir": data, "data_list": listed}, expected.get(case, f"data list {listed} line 4")
    if case == "missing list":
        write_flat_images(data, 6, rng)
        missing = tmp_path / "nowhere.txt"
        return {"data_dir": data, "data_list": missing}, f"data list {missing} does not exist"
    raise ValueError(case)


BAD_INPUTS = ["missing data dir", "empty test split", "train without test", "groups too small for a test split",
              "group without an image", "unreadable image", "truncated png", "truncated jpeg", "mixed sizes",
              "list line with one column", "list line with four columns", "list names a missing file",
              "list repeats a path", "list split word", "list without lines", "missing list",
              "split list without a path"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line_naming_the_file_or_folder(tmp_path, capsys, case):
    options, expected = bad_input(tmp_path, case)

    @reports_errors
    def main(argv):
        load(options.pop("data_dir"), tmp_path, **options)

    with pytest.raises(SystemExit) as exit:
        main(None)
    lines = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0]
    if case == "mixed sizes":
        assert "--image-size" in lines[0]
    if case.startswith("truncated"):
        assert "truncated" in lines[0]
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []
