"""Every script on folder data (--dataset folder), as a user with their own grouped images runs them:
training (colour and grayscale, 32 and 64 px, group-balanced batches) that resumes exactly, the
evaluation scripts reading the data from the run's args.json, unseen test groups, and one `error:`
line for a batch the data cannot fill or a test group missing from train. All data lies in tmp_path."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import classifier
import inference
import training
import tsne
from studies import aggregate, evaluate, group_size, pixel_classifier, swap_score

GROUPS = ("ant", "bee", "cow", "doe")


def write_groups(root, groups, count, size, colour, rng, suffix=".png"):
    """`count` images per group under root/<group>/: each group a colour (or grey level) plus noise, so
    that a group can be told from its pixels."""
    for index, group in enumerate(groups):
        base = rng.integers(40, 215, 3 if colour else 1)
        (root / group).mkdir(parents=True, exist_ok=True)
        for member in range(count):
            pixels = np.clip(base + rng.normal(0, 25, (size, size, len(base))), 0, 255).astype(np.uint8)
            Image.fromarray(pixels if colour else pixels[..., 0]).save(root / group / f"{member:02d}{suffix}")


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """train/ and test/ of four colour groups of 32 px PNG and JPEG images (16 train, 6 test each)."""
    root = tmp_path_factory.mktemp("folder") / "shapes"
    rng = np.random.default_rng(0)
    write_groups(root / "train", GROUPS, 16, 32, True, rng)
    write_groups(root / "test", GROUPS, 6, 32, True, rng, suffix=".JPG")
    return root


def train(tmp_path, data, *flags):
    return training.main(["--dataset", "folder", "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"),
                          "--arch", "conv", "--style-dim", "4", "--class-dim", "4", "--groups-per-batch", "2",
                          "--images-per-group", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir",
                          str(tmp_path / "runs"), "--run-name", "run", "--no-progress", *flags])


@pytest.fixture(scope="module")
def folder_run(folder_data, tmp_path_factory):
    return train(tmp_path_factory.mktemp("run"), folder_data, "--epochs", "2", "--image-every", "1")


def test_a_folder_run_records_its_data_and_image_shape(folder_run, folder_data):
    saved = json.loads((folder_run / "args.json").read_text())
    assert saved["dataset"] == "folder" and saved["data_dir"] == str(folder_data)
    assert saved["image_shape"] == [3, 32, 32]
    assert (saved["groups_per_batch"], saved["images_per_group"], saved["batch_size"]) == (2, 4, 8)
    encoder = torch.load(folder_run / "encoder.pt", weights_only=True)
    assert encoder["conv_model.0.weight"].shape[1] == 3  # the first convolution reads three channels


def test_the_first_lines_say_how_the_data_was_split_and_how_groups_are_batched(tmp_path, folder_data, capsys):
    train(tmp_path, folder_data, "--epochs", "1", "--image-every", "0")
    lines = capsys.readouterr().out.splitlines()
    assert "train/ and test/" in lines[0]
    batched = next(line for line in lines if line.startswith("group-balanced batches of 2 groups x 4 images"))
    assert "fewer than 4 images" in batched


def test_group_folders_alone_are_split_and_the_first_line_says_so(tmp_path, capsys):
    rng = np.random.default_rng(1)
    write_groups(tmp_path / "flat", GROUPS, 10, 32, False, rng)
    run = train(tmp_path, tmp_path / "flat", "--epochs", "1", "--image-every", "0")
    assert "seed" in capsys.readouterr().out.splitlines()[0]
    assert json.loads((run / "args.json").read_text())["image_shape"] == [1, 32, 32]


def test_a_resumed_folder_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, folder_data):
    straight = train(tmp_path / "a", folder_data, "--epochs", "2", "--image-every", "0")
    train(tmp_path / "b", folder_data, "--epochs", "1", "--image-every", "0")
    resumed = train(tmp_path / "b", folder_data, "--epochs", "2", "--image-every", "0", "--resume")
    for name in ("encoder.pt", "decoder.pt"):
        a, b = (torch.load(run / name, weights_only=True) for run in (straight, resumed))
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert (straight / "log.csv").read_text().count("\n") == (resumed / "log.csv").read_text().count("\n")


def test_a_64_pixel_grayscale_run_builds_the_dcgan_stack_down_to_4x4(tmp_path):
    rng = np.random.default_rng(2)
    write_groups(tmp_path / "big" / "train", GROUPS[:3], 8, 64, False, rng)
    write_groups(tmp_path / "big" / "test", GROUPS[:3], 2, 64, False, rng)
    run = train(tmp_path, tmp_path / "big", "--epochs", "1", "--image-every", "0")
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    assert encoder["style_mu.weight"].shape[1] == 256 * 4 * 4  # 64 -> 32 -> 16 -> 8 -> 4 pixels, 256 channels


def test_the_swap_grid_is_in_colour_with_one_row_and_column_per_group(folder_run, tmp_path):
    out = inference.main(["--checkpoint-dir", str(folder_run), "--out", str(tmp_path / "grid.png")])
    image = Image.open(out)
    assert image.mode == "RGB"
    assert image.size == ((len(GROUPS) + 1) * 32 + (len(GROUPS) - 1) * 2 + 8,) * 2


def test_the_swap_grid_takes_groups_by_name(folder_run, tmp_path, capsys):
    inference.main(["--checkpoint-dir", str(folder_run), "--groups", "doe", "ant", "--out", str(tmp_path / "g.png")])
    assert "3x3 swap grid" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        inference.main(["--checkpoint-dir", str(folder_run), "--groups", "yak", "--out", str(tmp_path / "h.png")])
    assert "no group named 'yak'" in capsys.readouterr().err


def test_classifier_scores_the_groups_as_labels(folder_run, capsys):
    rows = classifier.main(["--checkpoint-dir", str(folder_run), "--both", "--iterations", "50", "--batch-size",
                            "8", "--no-progress"])
    assert len(rows) == 2 and all(0 <= row["class_test"] <= 100 for row in rows)
    assert "folder" in capsys.readouterr().out


def test_unseen_test_groups_are_probed_on_halves_of_each_test_group(tmp_path, capsys):
    rng = np.random.default_rng(3)
    write_groups(tmp_path / "ids" / "train", GROUPS, 8, 32, True, rng)
    write_groups(tmp_path / "ids" / "test", ("elk", "fox", "gnu"), 8, 32, True, rng)
    run = train(tmp_path, tmp_path / "ids", "--epochs", "1", "--image-every", "0")
    capsys.readouterr()
    classifier.main(["--checkpoint-dir", str(run), "--iterations", "20", "--batch-size", "4", "--no-progress"])
    assert "first half of each test group's images" in capsys.readouterr().out


def test_tsne_and_the_group_size_study_run(folder_run, tmp_path):
    assert tsne.main(["--checkpoint-dir", str(folder_run), "--num-samples", "20", "--perplexity", "5", "--out",
                      str(tmp_path / "tsne.png")]).is_file()
    results = group_size.main(["--checkpoint-dir", str(folder_run), "--group-sizes", "1", "2", "--mlp-steps", "20",
                               "--json", str(tmp_path / "k.json")])
    assert results["group_sizes"] == [1, 2]


def test_the_evaluation_judges_swaps_with_a_classifier_of_the_datas_groups(folder_run, folder_data, tmp_path):
    judge = tmp_path / "judge.pt"
    pixel_classifier.main(["--dataset", "folder", "--data-dir", str(folder_data), "--cache-dir",
                           str(tmp_path / "cache"), "--epochs", "1", "--batch-size", "16", "--out", str(judge),
                           "--no-progress"])
    scores = swap_score.main(["--checkpoint-dir", str(folder_run), "--pixel-classifier", str(judge),
                              "--num-styles", "8", "--evidence-size", "3"])
    assert 0 <= scores["no_evidence"]["content_transfer"] <= 100
    results = evaluate.main(["--checkpoint-dir", str(folder_run), "--pixel-classifier", str(judge), "--iterations",
                             "20", "--batch-size", "8", "--group-sizes", "1", "2", "16", "--no-progress",
                             "--json", str(tmp_path / "results" / "eval_run.json")])
    assert results["group_size"]["group_sizes"] == [1, 2]  # a test group holds 6 images: K = 16 is left out
    assert results["test_loss"]["sampled"] is not None and results["model"]["image_shape"] == [3, 32, 32]
    tables = aggregate.main(["--results-dir", str(tmp_path / "results"), "--tables-only"])
    assert "| `run` | 1 |" in tables and (tmp_path / "results" / "evaluations.md").is_file()


def test_data_that_cannot_fill_one_batch_is_one_error_line(tmp_path, folder_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, folder_data, "--groups-per-batch", "20", "--epochs", "1")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(folder_data) in err[0]


def test_a_test_group_missing_from_train_is_one_error_line(tmp_path, capsys):
    rng = np.random.default_rng(4)
    write_groups(tmp_path / "part" / "train", GROUPS, 8, 32, True, rng)
    write_groups(tmp_path / "part" / "test", ("ant", "yak"), 4, 32, True, rng)
    run = train(tmp_path, tmp_path / "part", "--epochs", "1", "--image-every", "0")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        classifier.main(["--checkpoint-dir", str(run), "--iterations", "20", "--batch-size", "4", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "yak" in err[0]


def test_validation_needs_a_run_that_held_the_validation_images_out(tmp_path, folder_data, capsys):
    seen = train(tmp_path / "a", folder_data, "--epochs", "1", "--image-every", "0")
    with pytest.raises(SystemExit):
        classifier.main(["--checkpoint-dir", str(seen), "--split", "validation", "--iterations", "20",
                         "--batch-size", "4", "--no-progress"])
    assert "--hold-out-validation" in capsys.readouterr().err
    held = train(tmp_path / "b", folder_data, "--epochs", "1", "--image-every", "0", "--hold-out-validation")
    capsys.readouterr()
    row = classifier.main(["--checkpoint-dir", str(held), "--split", "validation", "--iterations", "20",
                            "--batch-size", "4", "--no-progress"])
    assert 0 <= row[0]["class_test"] <= 100


def test_an_image_size_the_conv_stack_cannot_take_is_one_error_line(tmp_path, folder_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(tmp_path, folder_data, "--epochs", "1", "--image-size", "30")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--image-size" in err[0] and "30" in err[0]
