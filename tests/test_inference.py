"""inference.py end to end on a tiny trained model: the grid's layout (grids.py), fixed references, the
evidence codes and their draws, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
import grids
import inference
from conftest import ROOT, git, naive_product_of_gaussians, run_python
from evaluation import encode
from networks import Encoder

CELL = 28  # MNIST
GRID_PIXELS = 11 * CELL + 9 * grids.GAP + grids.SEPARATOR


def run(tiny_run, tmp_path, *flags):
    return inference.main(["--checkpoint-dir", str(tiny_run), "--out", str(tmp_path / "grid.png"), *flags])


def pixels(path):
    return torch.from_numpy(np.array(Image.open(path).convert("L"))).float() / 255


def test_grid_png_has_the_expected_size_and_a_blank_corner(tiny_run, tmp_path, capsys):
    out = run(tiny_run, tmp_path)
    assert Image.open(out).size == (GRID_PIXELS, GRID_PIXELS)
    image = pixels(out)
    assert (image[: CELL, : CELL] == 1).all()  # the white background, no image
    assert image[CELL + 2: CELL + 4].eq(1).all()  # the separator below the top row
    assert str(out) in capsys.readouterr().out


def test_diagonal_is_a_reconstruction_of_its_source(tiny_run, tmp_path):
    image = pixels(run(tiny_run, tmp_path))
    top, left = grids.cell_offset(3, CELL), grids.cell_offset(0, CELL)
    source = image[top:top + 28, left:left + 28]
    diagonal = image[top:top + 28, top:top + 28]
    off_diagonal_source = image[grids.cell_offset(0, CELL):grids.cell_offset(0, CELL) + 28, top:top + 28]
    torch.testing.assert_close(source, off_diagonal_source)  # row 3's style image heads column 3
    assert not torch.equal(diagonal, source)  # a generation, not a copy


def test_fixed_references_are_the_same_on_two_calls(tiny_run, tmp_path):
    first = run(tiny_run, tmp_path / "a").read_bytes()
    assert run(tiny_run, tmp_path / "b").read_bytes() == first


def test_random_references_follow_the_seed(tiny_run, tmp_path):
    a = run(tiny_run, tmp_path / "a", "--reference", "random", "--seed", "1").read_bytes()
    b = run(tiny_run, tmp_path / "b", "--reference", "random", "--seed", "1").read_bytes()
    c = run(tiny_run, tmp_path / "c", "--reference", "random", "--seed", "2").read_bytes()
    assert a == b != c


def test_fixed_references_are_the_first_test_image_of_each_digit():
    labels = torch.tensor([7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4, 8])
    chosen = grids.reference_indices(labels, list(range(10)), "fixed", torch.Generator())
    assert chosen.tolist() == [3, 2, 1, 18, 4, 8, 11, 0, 20, 7]


@pytest.mark.parametrize("flags", [[], ["--evidence-size", "5"]])
def test_evidence_changes_the_generations_but_not_the_sources(tiny_run, tmp_path, flags):
    plain = pixels(run(tiny_run, tmp_path / "a"))
    evidence = pixels(run(tiny_run, tmp_path / "b", "--accumulate-evidence", *flags))
    sources = grids.cell_offset(1, CELL)
    torch.testing.assert_close(plain[:sources], evidence[:sources])
    assert not torch.equal(plain[sources:, sources:], evidence[sources:, sources:])


def test_missing_checkpoint_gives_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--checkpoint-dir", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert f"no weights at {tmp_path / 'nowhere' / 'encoder.pt'}" in capsys.readouterr().err


def test_mismatched_dims_give_a_clear_error(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_run, tmp_path, "--class-dim", "10")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tiny_run / "encoder.pt") in err and "--class-dim 10" in err and "class dim 4" in err


def test_inference_without_flags_writes_into_out_and_leaves_git_status_clean(new_checkout):
    checkout = new_checkout()
    done = run_python(checkout / "inference.py", cwd=checkout)
    assert done.returncode == 0, done.stderr
    assert (checkout / "out" / "swap_mlvae_eps0.1_no_evidence.png").is_file()
    assert git(checkout, "status", "--porcelain").stdout == ""  # images/ untouched, out/ ignored


@pytest.mark.parametrize("flags", [[], ["--evidence-size", "5"]])
def test_evidence_class_code_of_each_column_fuses_the_evidence_images_of_its_digit(tiny_run, tmp_path, monkeypatch,
                                                                                   flags):
    drawn, codes = [], []
    draw, cells = inference.evidence_indices, inference.swap_cells

    def recording_draw(*args):
        drawn.append(draw(*args))
        return drawn[-1]

    def recording_cells(decoder, style, class_codes):
        codes.append(class_codes)
        return cells(decoder, style, class_codes)

    monkeypatch.setattr(inference, "evidence_indices", recording_draw)
    monkeypatch.setattr(inference, "swap_cells", recording_cells)
    run(tiny_run, tmp_path, "--accumulate-evidence", *flags)
    images, labels = data_loader.load_split(ROOT / "data", "test")
    encoder = Encoder(6, 4)
    encoder.load_state_dict(torch.load(tiny_run / "encoder.pt", weights_only=True))
    index, = drawn
    _, _, mu, logvar = encode(encoder, images[index])
    for digit in range(10):
        members = labels[index] == digit
        assert members.sum() == 5 if flags else members.sum() >= 1
        want, _ = naive_product_of_gaussians(mu[members], logvar[members], torch.zeros(int(members.sum())))
        torch.testing.assert_close(codes[0][digit].double(), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("evidence_size", [None, 5])
def test_evidence_images_follow_the_seed(evidence_size):
    labels = torch.arange(10).repeat(40)
    draws = [inference.evidence_indices(labels, list(range(10)), evidence_size, torch.Generator().manual_seed(seed))
             for seed in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
