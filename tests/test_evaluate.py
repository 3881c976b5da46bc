"""studies/evaluate.py on a tiny run: one JSON with every number, each from the shared recipe."""
import json

import pytest
import torch

import classifier
import data_loader
from conftest import ROOT
from evaluation import encode
from runs import load_models
from studies import evaluate

FAST = ["--iterations", "20", "--group-sizes", "1", "2", "--num-styles", "30", "--no-progress",
        "--data-dir", str(ROOT / "data"), "--pixel-classifier", str(ROOT / "checkpoints" / "pixel_classifier_mnist.pt")]


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval_tiny.json"
    results = evaluate.main(["--checkpoint-dir", str(tiny_run), "--json", str(path), *FAST])
    return results, json.loads(path.read_text())


def test_json_is_what_main_returns_and_records_the_run_and_the_command(evaluated, tiny_run):
    results, saved = evaluated
    assert saved == results
    assert saved["run"] == tiny_run.name
    assert (saved["model"]["style_dim"], saved["model"]["class_dim"], saved["model"]["eps_std"]) == (6, 4, 0.5)
    assert saved["training_args"]["seed"] == 0 and saved["epochs_trained"] == 1
    assert saved["evaluation"]["classifier_iterations"] == 20
    assert saved["command"].startswith("python -m studies.evaluate --checkpoint-dir ")
    assert "--iterations 20" in saved["command"] and saved["wall_time_s"] > 0


def test_every_protocol_has_train_and_test_accuracy_of_both_codes(evaluated):
    _, saved = evaluated
    keys = {"style_train", "style_test", "class_train", "class_test"}
    for protocol in ("sampled", "means", "sampled_batchnorm_batch_stats"):
        for evidence in ("no_evidence", "with_evidence"):
            assert set(saved["latent_classifier"][protocol][evidence]) == keys
    assert saved["group_size"]["group_sizes"] == [1, 2]
    assert set(saved["swap_score"]) >= {"no_evidence", "with_evidence"}


def test_accuracies_are_those_of_classifier_py_with_the_same_settings(evaluated, tiny_run):
    _, saved = evaluated
    for latents in ("sampled", "means"):
        rows = classifier.main(["--checkpoint-dir", str(tiny_run), "--both", "--latents", latents,
                                "--iterations", "20", "--no-progress", "--data-dir", str(ROOT / "data")])
        for row, evidence in zip(rows, ("no_evidence", "with_evidence")):
            expected = saved["latent_classifier"][latents][evidence]
            assert {key: row[key] for key in expected} == pytest.approx(expected)


def test_mlp_probe_at_k1_is_the_class_classifier_on_posterior_means(evaluated):
    _, saved = evaluated
    # The same model on the same codes; only the 16 test images left out of whole batches differ.
    assert saved["group_size"]["mlp"][0] == pytest.approx(
        saved["latent_classifier"]["means"]["no_evidence"]["class_test"], abs=0.2)


def test_reconstruction_from_posterior_means_is_the_squared_error_per_pixel(evaluated, tiny_run):
    _, saved = evaluated
    args = evaluate.build_parser().parse_args(["--checkpoint-dir", str(tiny_run)])
    encoder, decoder, _ = load_models(args, torch.device("cpu"))
    images, _ = data_loader.load_split(ROOT / "data", "test")
    style_mu, _, class_mu, _ = encode(encoder, images)
    with torch.no_grad():
        error = (decoder(style_mu, class_mu) - images).pow(2).mean().item()
    assert saved["test_loss"]["posterior_means"] == pytest.approx(error, rel=1e-4)

