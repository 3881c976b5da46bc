"""studies/identities.py: the layout, factors.csv and info.json it writes on a tiny size, its determinism, its
refusal to replace folders, and the rendering (where the ink goes, which colours it gets)."""
import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data_loader
from studies import identities
from studies.identities import BASE_MAGNIFICATION, FACTORS, RANGES

TRAIN, TEST, MEMBERS = 6, 4, 3


def generate(out: Path, data_dir: Path, *flags) -> Path:
    return identities.main(["--train-identities", str(TRAIN), "--test-identities", str(TEST), "--members",
                            str(MEMBERS), "--data-dir", str(data_dir), "--out", str(out), "--workers", "2",
                            "--no-progress", *flags])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_data) -> Path:
    return generate(tmp_path_factory.mktemp("identities") / "set", tiny_data)


@pytest.fixture(scope="module")
def rows(dataset) -> list[dict]:
    with open(dataset / "factors.csv", newline="") as file:
        return list(csv.DictReader(file))


def read_png(path: Path) -> torch.Tensor:
    """A PNG file's pixels, [3, H, W] uint8; RGB files only."""
    with Image.open(path) as image:
        assert image.mode == "RGB", path
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def png_files(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.png"))


def folder_reader_order(split_dir: Path) -> list[str]:
    """The files of a split folder as a folder reader loads them: by group name, then by file path."""
    return [str(path.relative_to(split_dir.parent)) for group in sorted(os.listdir(split_dir))
            for path in sorted((split_dir / group).iterdir())]


def centroid(ink: torch.Tensor) -> torch.Tensor:
    """(x, y) ink centroids [N, 2] of ink [N, 1, H, W], in pixels."""
    y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in ink.shape[-2:]), indexing="ij")
    mass = ink.sum((1, 2, 3))
    return torch.stack([(ink[:, 0] * x).sum((1, 2)) / mass, (ink[:, 0] * y).sum((1, 2)) / mass], dim=1)


def factors_of(count: int, **values) -> dict[str, torch.Tensor]:
    """`count` renderings at magnification 1, no rotation or translation, unless `values` says otherwise."""
    base = {"rotation_deg": 0.0, "scale": 1 / BASE_MAGNIFICATION, "translate_x": 0.0, "translate_y": 0.0,
            "stroke_hue_deg": 0.0, "background_hue_deg": 180.0, **values}
    return {name: torch.full((count,), float(base[name]), dtype=torch.float64) for name in FACTORS}


@pytest.fixture(scope="module")
def glyphs(tiny_data) -> torch.Tensor:
    return data_loader.load_split(tiny_data, "test")[0][:16]


def test_layout_is_one_folder_per_identity_holding_its_members(dataset):
    assert sorted(path.name for path in dataset.iterdir()) == ["factors.csv", "info.json", "test", "train"]
    for split, count in (("train", TRAIN), ("test", TEST)):
        folders = sorted((dataset / split).iterdir())
        assert len(folders) == count and all(folder.name.startswith(f"{split}_") for folder in folders)
        for folder in folders:
            assert sorted(path.name for path in folder.iterdir()) == ["00.png", "01.png", "02.png"]
    assert not [path for path in dataset.parent.iterdir() if path.name.endswith(".tmp")]


def test_images_are_rgb_32x32(dataset):
    shapes = {tuple(read_png(path).shape) for path in dataset.rglob("*.png")}
    assert shapes == {(3, 32, 32)}


def test_factors_csv_has_one_row_per_image_with_every_column(dataset, rows):
    assert list(rows[0]) == list(identities.COLUMNS)
    assert sorted(row["file"] for row in rows) == png_files(dataset)
    for row in rows:
        split, identity, member = row["file"].split("/")
        assert (split, identity, member) == (row["split"], row["identity"], f"{int(row['member']):02d}.png")


def test_identities_come_from_their_own_mnist_split(tiny_data, rows):
    for split, count in (("train", TRAIN), ("test", TEST)):
        labels = data_loader.load_split(tiny_data, split)[1]
        split_rows = [row for row in rows if row["split"] == split]
        assert len({row["identity"] for row in split_rows}) == count
        assert len({row["mnist_index"] for row in split_rows}) == count
        for row in split_rows:
            assert int(row["digit"]) == labels[int(row["mnist_index"])].item()
            assert row["identity"] == f"{split}_{int(row['mnist_index']):05d}_d{row['digit']}"


def test_factor_values_lie_in_their_ranges_and_vary(rows):
    values = {name: np.array([float(row[name]) for row in rows]) for name in FACTORS}
    for name in FACTORS[:5]:
        low, high = RANGES[name]
        assert values[name].min() >= low and values[name].max() <= high, name
        assert values[name].std() > 0.1 * (high - low), name  # drawn anew for every member
    assert values["background_hue_deg"].max() < 360
    offset = (values["background_hue_deg"] - values["stroke_hue_deg"]) % 360
    assert offset.min() >= RANGES["background_hue_offset_deg"][0] - 1e-6
    assert offset.max() <= RANGES["background_hue_offset_deg"][1] + 1e-6


def test_info_json_records_the_seed_sizes_ranges_and_command(dataset):
    info = json.loads((dataset / "info.json").read_text())
    assert (info["seed"], info["identities"], info["members"]) == (0, {"train": TRAIN, "test": TEST}, MEMBERS)
    assert info["images"] == {"train": TRAIN * MEMBERS, "test": TEST * MEMBERS}
    assert info["ranges"] == {name: list(bounds) for name, bounds in RANGES.items()}
    assert info["command"].startswith("python -m studies.identities --train-identities 6 ")


def test_the_same_seed_gives_byte_identical_files_and_another_seed_others(dataset, tiny_data, tmp_path):
    again = generate(tmp_path / "again", tiny_data, "--workers", "1")  # the data set was written by 2 processes
    other = generate(tmp_path / "other", tiny_data, "--seed", "1")
    names = png_files(dataset) + ["factors.csv"]
    assert png_files(again) == png_files(dataset)
    assert all((again / name).read_bytes() == (dataset / name).read_bytes() for name in names)
    info, info_again = (json.loads((root / "info.json").read_text()) for root in (dataset, again))
    assert {**info, "command": None} == {**info_again, "command": None}
    assert (other / "factors.csv").read_bytes() != (dataset / "factors.csv").read_bytes()


def test_the_csv_factors_re_render_every_image(dataset, tiny_data):
    for split in ("train", "test"):
        factors = identities.read_factors(dataset, split)
        images = data_loader.load_split(tiny_data, split)[0][torch.from_numpy(factors["mnist_index"])]
        rendered = identities.render(images, {name: torch.from_numpy(factors[name]) for name in FACTORS})
        written = torch.stack([read_png(dataset / name) for name in factors["file"]])
        assert torch.equal(rendered, written)


def test_read_factors_follows_the_folder_readers_order(dataset):
    for split in ("train", "test"):
        factors = identities.read_factors(dataset, split)
        assert list(factors["file"]) == folder_reader_order(dataset / split)
        assert set(factors["split"]) == {split} and factors["digit"].dtype == np.int64
    assert len(identities.read_factors(dataset)["file"]) == (TRAIN + TEST) * MEMBERS


def test_a_non_empty_out_is_refused_without_overwrite(dataset, tiny_data, capsys):
    before = {name: (dataset / name).read_bytes() for name in png_files(dataset)}
    with pytest.raises(SystemExit) as exit_info:
        generate(dataset, tiny_data, "--seed", "1")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --out") and "--overwrite" in lines[0]
    assert {name: (dataset / name).read_bytes() for name in png_files(dataset)} == before


def test_overwrite_replaces_a_data_set_but_no_other_folder(tiny_data, tmp_path, capsys):
    out = generate(tmp_path / "set", tiny_data, "--members", "2")
    generate(out, tiny_data, "--overwrite")
    assert len(png_files(out)) == (TRAIN + TEST) * MEMBERS
    assert sorted(path.name for path in tmp_path.iterdir()) == ["set"]  # no staging or old folder left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me\n")
    with pytest.raises(SystemExit):
        generate(foreign, tiny_data, "--overwrite")
    assert "did not write" in capsys.readouterr().err
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


def test_a_failed_run_leaves_out_as_it_was_and_no_partial_folder(dataset, tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "set"
    shutil.copytree(dataset, out)
    before = {name: (out / name).read_bytes() for name in png_files(out) + ["factors.csv"]}

    def disk_full(images, paths):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(identities, "write_pngs", disk_full)
    with pytest.raises(SystemExit):
        generate(out, tiny_data, "--overwrite", "--seed", "1", "--workers", "1")
    assert "No space left on device" in capsys.readouterr().err
    assert {name: (out / name).read_bytes() for name in png_files(out) + ["factors.csv"]} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["set"]


def test_a_folder_filled_while_generating_is_not_replaced(tiny_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "set"
    write_pngs = identities.write_pngs

    def another_process_writes_out(images, paths):
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("keep me\n")
        return write_pngs(images, paths)

    monkeypatch.setattr(identities, "write_pngs", another_process_writes_out)
    with pytest.raises(SystemExit):
        generate(out, tiny_data, "--workers", "1")
    assert "--overwrite" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["set"]


def test_unit_magnification_without_rotation_or_translation_leaves_the_ink_in_place(glyphs):
    ink = identities.transform_glyphs(glyphs, factors_of(len(glyphs)))
    assert torch.allclose(ink, F.pad(glyphs, (2, 2, 2, 2)), atol=1e-4)


def test_translation_moves_the_ink_centroid_by_the_given_pixels(glyphs):
    still = centroid(identities.transform_glyphs(glyphs, factors_of(len(glyphs))))
    moved = centroid(identities.transform_glyphs(glyphs, factors_of(len(glyphs), translate_x=3.0, translate_y=-2.5)))
    assert torch.allclose(moved - still, torch.tensor([3.0, -2.5]).expand_as(moved), atol=0.01)


def test_rotation_turns_the_glyph_counter_clockwise():
    blob = torch.zeros(1, 1, 28, 28)
    blob[..., 4:8, 12:16] = 1.0  # above the centre
    x, y = centroid(identities.transform_glyphs(blob, factors_of(1, rotation_deg=90.0)))[0] - 15.5
    assert abs(x + 8) < 0.05 and abs(y) < 0.05  # 8 pixels above the centre, then 8 pixels left of it


def test_scale_multiplies_the_ink_spread(glyphs):
    def spread(scale: float) -> torch.Tensor:
        ink = identities.transform_glyphs(glyphs, factors_of(len(glyphs), scale=scale))
        y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        c = centroid(ink)
        squared = (x - c[:, 0, None, None]) ** 2 + (y - c[:, 1, None, None]) ** 2
        return ((ink[:, 0] * squared).sum((1, 2)) / ink.sum((1, 2, 3))).sqrt()

    ratio = spread(1.2) / spread(0.8)
    assert torch.allclose(ratio, torch.full_like(ratio, 1.5), rtol=0.03)


def test_ink_takes_the_stroke_colour_and_the_rest_the_background(glyphs):
    images = identities.render(glyphs, factors_of(len(glyphs), stroke_hue_deg=120.0, background_hue_deg=240.0))
    ink = F.pad(glyphs, (2, 2, 2, 2))[:, 0]
    assert (images.permute(0, 2, 3, 1)[ink == 1.0] == torch.tensor([0, 255, 0], dtype=torch.uint8)).all()
    assert (images.permute(0, 2, 3, 1)[ink == 0.0] == torch.tensor([0, 0, 255], dtype=torch.uint8)).all()


def test_hsv_to_rgb_gives_the_primaries_and_their_mixtures():
    hues = torch.tensor([0.0, 60.0, 120.0, 180.0, 240.0, 300.0])
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    assert torch.allclose(identities.hsv_to_rgb(hues, 1.0, 1.0), expected)
    assert torch.allclose(identities.hsv_to_rgb(hues, 0.0, 0.5), torch.full((6, 3), 0.5))  # no saturation: grey


def test_every_allowed_colour_pair_keeps_its_contrast():
    stroke, offset = torch.meshgrid(torch.linspace(0, 360, 721, dtype=torch.float64),
                                    torch.linspace(*RANGES["background_hue_offset_deg"], 241, dtype=torch.float64),
                                    indexing="ij")
    colours = [identities.hsv_to_rgb(hue.flatten() % 360, identities.SATURATION, identities.VALUE)
               for hue in (stroke, stroke + offset)]
    # Hues 120 degrees apart at full saturation and value, e.g. (1, 0.5, 0) and (0, 1, 0.5), are sqrt(3/2) apart.
    assert torch.linalg.norm(colours[0] - colours[1], dim=1).min() >= math.sqrt(1.5) - 1e-9


def test_ink_outside_counts_the_ink_moved_out_of_the_frame(glyphs):
    inside = identities.ink_outside(glyphs, factors_of(len(glyphs)))
    gone = identities.ink_outside(glyphs, factors_of(len(glyphs), translate_x=40.0))
    assert torch.equal(inside, torch.zeros(len(glyphs))) and torch.allclose(gone, torch.ones(len(glyphs)))
