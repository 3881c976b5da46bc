"""runs.py: atomic files and loading a trained model from its run folder."""
import argparse

import pytest
import torch

from runs import ModelLoadError, add_model_arguments, atomic_save, load_models


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.load(tmp_path / "x.pt", weights_only=True)["a"].sum() == 2


def model_args(*flags):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(list(flags))


def test_load_models_takes_the_settings_from_args_json(tiny_run):
    _, decoder, settings = load_models(model_args("--checkpoint-dir", str(tiny_run)), torch.device("cpu"))
    assert (settings.style_dim, settings.class_dim, settings.eps_std) == (6, 4, 0.5)
    assert settings.name == "tiny" and not decoder.training


def test_load_models_lets_a_flag_override_args_json(tiny_run):
    _, _, settings = load_models(model_args("--checkpoint-dir", str(tiny_run), "--eps-std", "1"), torch.device("cpu"))
    assert settings.eps_std == 1


def test_load_models_names_the_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "e.pt")):
        load_models(model_args("--encoder", str(tmp_path / "e.pt")), torch.device("cpu"))


def test_load_models_reports_the_dims_a_mismatched_file_holds(tiny_run):
    with pytest.raises(ModelLoadError, match="style dim 6, class dim 4"):
        load_models(model_args("--checkpoint-dir", str(tiny_run), "--style-dim", "3"), torch.device("cpu"))


def test_reference_weights_load_strict(reference_checkpoints):
    args = model_args("--encoder", str(reference_checkpoints / "encoder_1_var_reparam"),
                      "--decoder", str(reference_checkpoints / "decoder_1_var_reparam"))
    _, _, settings = load_models(args, torch.device("cpu"))
    assert settings.name == "encoder_1_var_reparam"
