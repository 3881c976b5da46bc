"""runs.py: atomic files, loading a trained model from its run folder, the choice of CPU threads."""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_loader import DataSpec
import runs
from runs import (BETA, LOG_FIELDS, NONNEGATIVE, POSITIVE, POSITIVE_INT, RUN_FILES, STATE_FILE, ModelLoadError,
                  ModelSettings, check_validation_unseen, training_selection,
                  UserError, add_model_arguments, atomic_save, check_writable, folder_name, load_models, read_log,
                  read_run_state, stale_files, write_run)


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


@pytest.mark.parametrize("idle,threads", [(0.0, 1), (0.3, 1), (1.1, 1), (1.7, 2), (2.0, 2)])
def test_threads_are_one_per_idle_cpu(monkeypatch, idle, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(runs, "idle_cpus", lambda: idle)
    assert runs.pick_threads()[0] == threads
    assert runs.pick_threads(3) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runs.pick_threads() == (3, "OMP_NUM_THREADS")


def test_a_busy_process_is_seen_as_a_cpu_that_is_not_idle():
    if runs.idle_cpus() is None:
        pytest.skip("no /proc/stat")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert runs.idle_cpus(0.5) <= len(os.sched_getaffinity(0)) - 0.7
    finally:
        busy.kill()
        busy.wait()


def test_load_models_takes_the_weights_of_the_last_save_when_a_save_was_cut_short(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "r"
    shutil.copytree(tiny_run, run_dir)
    state = read_run_state(run_dir)
    older = {key: value + 1 for key, value in state["encoder"].items()}
    atomic_save(older, run_dir / "encoder.pt")  # as if the process died before rewriting it
    encoder, _, _ = load_models(model_args("--checkpoint-dir", str(run_dir)), torch.device("cpu"))
    assert all(torch.equal(value, state["encoder"][key]) for key, value in encoder.state_dict().items())
    assert "encoder.pt are not from its last save" in capsys.readouterr().err


def test_write_run_writes_the_state_first_and_records_each_file(tmp_path):
    written = []
    state = {"encoder": {"w": torch.ones(2)}, "decoder": {"w": torch.zeros(2)}, "args": {"seed": 0},
             "log": [dict.fromkeys(LOG_FIELDS, "1")], "epoch": 1, "step": 0, "iteration": 8, "optimizer": {},
             "generator": torch.ones(1)}
    original = runs.write_bytes_atomic

    def recording_write(path, data):
        written.append(path.name)
        original(path, data)

    runs.write_bytes_atomic, saved = recording_write, runs.write_bytes_atomic
    try:
        write_run(tmp_path, state)
    finally:
        runs.write_bytes_atomic = saved
    assert written == [STATE_FILE, *RUN_FILES]
    assert stale_files(tmp_path, read_run_state(tmp_path)) == []
    (tmp_path / "args.json").write_text("{}\n")
    assert stale_files(tmp_path, read_run_state(tmp_path)) == ["args.json"]


def test_an_unreadable_training_state_is_named_with_the_way_out(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(UserError, match=f"{STATE_FILE} cannot be read.*move it away"):
        read_run_state(tmp_path)


def test_read_log_names_the_line_that_is_not_a_log_row(tmp_path):
    (tmp_path / "log.csv").write_text(",".join(LOG_FIELDS) + "\n1,8,0.1,0.01,0.001,900\n2,16,nan,0.01,0.001,900\n")
    with pytest.raises(UserError, match="log.csv line 3"):
        read_log(tmp_path / "log.csv")


@pytest.mark.parametrize("kind,text,ok", [(POSITIVE_INT, "1", True), (POSITIVE_INT, "0", False),
                                          (POSITIVE, "1e-9", True), (POSITIVE, "0", False),
                                          (NONNEGATIVE, "0", True), (NONNEGATIVE, "nan", False),
                                          (NONNEGATIVE, "inf", False), (BETA, "0", True), (BETA, "1", False),
                                          (POSITIVE_INT, "2.5", False)])
def test_bounded_flag_types_accept_only_finite_values_in_range(kind, text, ok):
    if ok:
        assert kind(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="expected"):
            kind(text)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ""])
def test_a_run_name_is_a_folder_name_not_a_path(name):
    with pytest.raises(argparse.ArgumentTypeError):
        folder_name(name)


def test_check_writable_refuses_a_folder_for_a_file_and_a_file_for_a_folder(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a folder"):
        check_writable(tmp_path, "--json")
    with pytest.raises(UserError, match="is a file"):
        check_writable(tmp_path / "f", "--log-dir", folder=True)
    with pytest.raises(UserError, match="is a file"):
        check_writable(tmp_path / "f" / "x.json", "--json")
    assert check_writable(tmp_path / "new" / "x.json", "--json") == tmp_path / "new" / "x.json"
    assert not (tmp_path / "new").exists()


TRAIN_LABELS = torch.arange(60000) % 10  # a train split of 60,000 images, labels cycling through 0-9


def settings_trained_with(trained: dict) -> ModelSettings:
    return ModelSettings("mlp", 10, 10, 0.1, "mse", [1, 28, 28], DataSpec(), Path("run/encoder.pt"),
                         Path("run/decoder.pt"), trained=trained)


@pytest.mark.parametrize("trained,unseen", [
    ({"num_train": 50000, "classes": None}, True),
    ({"num_train": 50001, "classes": None}, False),
    ({"num_train": None, "classes": [0, 1]}, False),
    ({"num_train": 50000, "classes": [0, 1, 2, 3, 4, 5, 6, 7, 8], "num_train_of": "split"}, True),
    # saved before args.json recorded num_train_of: 50,000 images of digits 0-8 reach index 55,554
    ({"num_train": 50000, "classes": [0, 1, 2, 3, 4, 5, 6, 7, 8]}, False),
    ({"num_train": 40000, "classes": [0, 1, 2, 3, 4, 5, 6, 7, 8]}, True),
    ({"num_train": None, "classes": None, "dataset": "fashion-mnist"}, True),  # saw no MNIST image
    ({}, False),  # weights without args.json: what they trained on is unknown
])
def test_validation_is_refused_unless_args_json_shows_the_validation_images_unseen(trained, unseen):
    settings = settings_trained_with(trained)
    if unseen:
        check_validation_unseen(settings, TRAIN_LABELS)
    else:
        with pytest.raises(UserError, match="--split validation: run .*--num-train 50000"):
            check_validation_unseen(settings, TRAIN_LABELS)


def test_num_train_counts_the_images_of_the_train_split_before_classes_picks_its_labels():
    index = torch.arange(60000)
    chosen, labels = training_selection(index, TRAIN_LABELS, 100, [3, 4])
    assert chosen.tolist() == [i for i in range(100) if i % 10 in (3, 4)]
    before, _ = training_selection(index, TRAIN_LABELS, 100, [3, 4], "classes")  # as runs saved before counted
    assert len(before) == 100 and before.max() == 494
