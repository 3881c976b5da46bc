"""sweep.py end to end on a tiny training set: trains, evaluates on the validation split, tabulates."""
import json

import pytest

from studies import sweep


def test_sweep_trains_evaluates_and_tabulates_without_redoing_work(tmp_path, capsys):
    argv = ["--configs", "paper", "stylekl4", "--epochs", "1", "--num-train", "512", "--iterations", "20",
            "--jobs", "2", "--sweep-dir", str(tmp_path / "sw"), "--out", str(tmp_path / "table.md")]
    rows = sweep.main(argv)
    assert [row["config"] for row in rows] == ["paper", "stylekl4"]
    for row in rows:  # each row is read from its run's own evaluation files
        without, with_evidence = json.loads((tmp_path / "sw" / row["config"] / "classifier.json").read_text())
        means = json.loads((tmp_path / "sw" / row["config"] / "classifier_means.json").read_text())
        probes = json.loads((tmp_path / "sw" / row["config"] / "group_size.json").read_text())
        assert (row["style val"], row["class val (evidence)"]) == (without["style_test"], with_evidence["class_test"])
        assert means["latents"] == "means" and not means["evidence"]
        assert (row["style val (means)"], row["class val (means)"]) == (means["style_test"], means["class_test"])
        assert row["K=1 logistic"] == probes["logistic"][0]
        assert row["style KL (nats/image)"] > 0
    table = (tmp_path / "table.md").read_text()
    assert "| stylekl4 | `--style-kl-coef 4` |" in table and "0-511" in table
    assert json.loads((tmp_path / "table.json").read_text()) == rows
    for config in ("paper", "stylekl4"):  # TensorBoard logs beside the runs, not in the checkout's runs/
        assert list((tmp_path / "sw" / "runs" / config).glob("events.out.tfevents.*"))
    log = (tmp_path / "sw" / "paper" / "sweep.log").stat().st_mtime
    assert sweep.main(argv) == rows  # everything cached: nothing is trained or evaluated again
    assert (tmp_path / "sw" / "paper" / "sweep.log").stat().st_mtime == log


def test_training_on_validation_images_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--num-train", "60000"])
    assert exit_info.value.code == 2
    assert "validation" in capsys.readouterr().err
