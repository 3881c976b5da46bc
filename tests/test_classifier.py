"""classifier.py: the latent-classifier protocol end to end, its grouping, and the reference cross-check."""
import json

import pytest
import torch

import classifier
from networks import Classifier

FAST = ["--iterations", "30", "--no-progress"]


def test_prints_and_writes_the_four_accuracies_in_percent(tiny_run, tmp_path, capsys):
    rows = classifier.main(["--checkpoint-dir", str(tiny_run), "--json", str(tmp_path / "acc.json"), *FAST])
    saved = json.loads((tmp_path / "acc.json").read_text())
    assert saved == rows[0]
    assert (saved["eps_std"], saved["style_dim"], saved["class_dim"], saved["evidence"]) == (0.5, 6, 4, False)
    out = capsys.readouterr().out
    assert "| latents | eps std | style dim | class dim | evidence |" in out
    assert f"| sampled | 0.5 | 6 | 4 | no | {saved['style_train']:.2f} |" in out


def test_both_gives_a_row_without_and_a_row_with_evidence(tiny_run, tmp_path):
    rows = classifier.main(["--checkpoint-dir", str(tiny_run), "--both", "--json", str(tmp_path / "a.json"),
                            "--split", "validation", *FAST])
    assert [row["evidence"] for row in rows] == [False, True]
    assert json.loads((tmp_path / "a.json").read_text()) == rows


def test_mismatched_checkpoint_gives_a_clear_error(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        classifier.main(["--checkpoint-dir", str(tiny_run), "--style-dim", "10", *FAST])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tiny_run / "encoder.pt") in err and "--style-dim 10" in err


def test_reference_weights_with_evidence_read_the_digit_far_above_chance(reference_checkpoints):
    rows = classifier.main(["--encoder", str(reference_checkpoints / "encoder_0.1_var_reparam"),
                            "--decoder", str(reference_checkpoints / "decoder_0.1_var_reparam"),
                            "--eps-std", "0.1", "--accumulate-evidence", "--iterations", "200", "--no-progress"])
    assert rows[0]["class_test"] > 80


def test_batchnorm_batch_stats_measures_with_each_batchs_own_statistics(tiny_run, monkeypatch):
    modes = []
    original_forward = Classifier.forward

    def recording_forward(self, z):
        modes.append(self.training)
        return original_forward(self, z)

    monkeypatch.setattr(Classifier, "forward", recording_forward)
    rows = classifier.main(["--checkpoint-dir", str(tiny_run), "--batchnorm-batch-stats", *FAST])
    assert modes and all(modes)  # training and measuring both ran BatchNorm in training mode


def test_means_protocol_is_recorded_and_differs_from_sampling(tiny_run):
    sampled = classifier.main(["--checkpoint-dir", str(tiny_run), *FAST])[0]
    means = classifier.main(["--checkpoint-dir", str(tiny_run), "--latents", "means", *FAST])[0]
    assert (sampled["latents"], means["latents"]) == ("sampled", "means")
    assert sampled["style_test"] != means["style_test"] or sampled["class_test"] != means["class_test"]


def test_validation_scores_of_a_model_that_trained_on_the_validation_images_are_refused(start_script):
    # The shipped model trained on all 60,000 train images (no --num-train).
    process = start_script("classifier", "--checkpoint-dir", "checkpoints/mlvae_eps0.1", "--split", "validation",
                           "--iterations", "3", "--no-progress")
    assert process.wait() == 2
    [line] = process.stderr.splitlines()
    assert line.startswith("error: --split validation: checkpoints/mlvae_eps0.1 trained on mnist train images up "
                           "to index 59999 (no --num-train in its args.json)") and "--num-train 50000" in line, line
    assert process.stdout_path.read_text() == ""
