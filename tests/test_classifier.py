"""classifier.py: the latent-classifier protocol end to end, its grouping, and the reference cross-check."""
import json

import pytest
import torch

import classifier
import data_loader
from conftest import ROOT
from evaluation import encode
from networks import Classifier, Encoder

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


def recorded_protocol_calls(monkeypatch, argv):
    """classifier.main(argv) with classifier_protocol replaced by a recorder: [(train, test, settings)]."""
    calls = []

    def recording_protocol(train, test, **settings):
        calls.append((train, test, settings))
        return dict.fromkeys(classifier.ACCURACY_KEYS, 50.0), None

    monkeypatch.setattr(classifier, "classifier_protocol", recording_protocol)
    classifier.main(argv)
    return calls


@pytest.mark.parametrize("flags,sampled,evidence", [([], True, [False]), (["--accumulate-evidence"], True, [True]),
                                                    (["--both", "--latents", "means"], False, [False, True])])
def test_the_protocol_gets_the_asked_latents_and_the_models_eps_std(tiny_run, monkeypatch, flags, sampled, evidence):
    calls = recorded_protocol_calls(monkeypatch, ["--checkpoint-dir", str(tiny_run), *flags, *FAST])
    assert [settings["evidence"] for _, _, settings in calls] == evidence
    assert all(settings["sampled"] == sampled and settings["eps_std"] == 0.5 for _, _, settings in calls)


def test_the_protocol_gets_the_posteriors_of_the_train_and_the_test_split(tiny_run, monkeypatch):
    (train, test, _), = recorded_protocol_calls(monkeypatch, ["--checkpoint-dir", str(tiny_run), *FAST])
    encoder = Encoder(6, 4)
    encoder.load_state_dict(torch.load(tiny_run / "encoder.pt", weights_only=True))
    for (posteriors, labels), split in ((train, "train"), (test, "test")):
        images, split_labels = data_loader.load_split(ROOT / "data", split)
        assert torch.equal(labels, split_labels)
        for got, want in zip(posteriors, encode(encoder, images[:100]), strict=True):
            torch.testing.assert_close(got[:100], want)
