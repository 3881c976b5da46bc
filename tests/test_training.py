"""training.py end to end on small subsets: outputs, resume, interruption, bad flags."""
import csv
import json
import os
import re
import shlex
import shutil
import signal
import time

import pytest
import torch

import training
from networks import Decoder, Encoder
from runs import RUN_FILES, STATE_FILE, read_run_state, set_float32_precision, stale_files, write_run

SMALL = ["--num-train", "512", "--batch-size", "64", "--no-progress"]


def run(tmp_path, *flags):
    return training.main([*SMALL, "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
                          *flags])


def read_rows(run_dir):
    with (run_dir / "log.csv").open() as f:
        return list(csv.DictReader(f))


def weights(run_dir):
    return {name: torch.load(run_dir / name, weights_only=True) for name in ("encoder.pt", "decoder.pt")}


def assert_same_weights(a, b):
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=0)


def test_short_run_lowers_the_loss_and_writes_every_output(tmp_path):
    run_dir = run(tmp_path, "--epochs", "6", "--run-name", "r")
    assert {p.name for p in run_dir.iterdir()} == {"encoder.pt", "decoder.pt", "training_state.pt", "log.csv", "args.json"}
    rows = read_rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert int(rows[-1]["iteration"]) == 6 * 8
    assert float(rows[-1]["reconstruction"]) < 0.7 * float(rows[0]["reconstruction"])
    Encoder(10, 10).load_state_dict(weights(run_dir)["encoder.pt"])
    Decoder(10, 10).load_state_dict(weights(run_dir)["decoder.pt"])
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    assert state["epoch"] == 6 and state["args"]["eps_std"] == 0.1
    assert any((tmp_path / "runs" / "r").iterdir())  # tensorboard events


@pytest.mark.parametrize("flags", [["--likelihood", "bernoulli"], ["--likelihood", "gaussian"],
                                   ["--detach-class-posterior", "--class-kl-per-sample"],
                                   ["--precision", "bf16"], ["--group-size", "3", "--style-kl-coef", "4"]])
def test_other_objectives_train(tmp_path, flags):
    rows = read_rows(run(tmp_path, "--epochs", "2", "--run-name", "r", *flags))
    assert all(torch.isfinite(torch.tensor([float(r["reconstruction"]) for r in rows])))


def test_detach_flag_leaves_the_class_heads_untrained(tmp_path):
    run_dir = run(tmp_path, "--epochs", "1", "--run-name", "r", "--detach-class-posterior")
    trained = weights(run_dir)["encoder.pt"]
    torch.manual_seed(0)
    initial = Encoder(10, 10).state_dict()
    torch.testing.assert_close(trained["class_mu.weight"], initial["class_mu.weight"])
    assert not torch.equal(trained["style_mu.weight"], initial["style_mu.weight"])


def test_with_detached_heads_the_form_of_the_class_kl_changes_no_weight(tmp_path):
    # The ablation's "detach only" run and the reference's objective (detach + per-member KL) are one
    # and the same training: once detached, the class KL reaches no trainable parameter.
    detach_only = run(tmp_path, "--epochs", "2", "--run-name", "a", "--detach-class-posterior")
    both = run(tmp_path, "--epochs", "2", "--run-name", "b", "--detach-class-posterior", "--class-kl-per-sample")
    assert_same_weights(weights(detach_only), weights(both))


def test_resume_after_epochs_matches_an_uninterrupted_run(tmp_path):
    straight = run(tmp_path, "--epochs", "4", "--run-name", "straight", "--save-every", "1")
    run(tmp_path, "--epochs", "2", "--run-name", "split", "--save-every", "1")
    resumed = run(tmp_path, "--epochs", "4", "--run-name", "split", "--save-every", "1", "--resume")
    assert_same_weights(weights(straight), weights(resumed))
    assert [r["epoch"] for r in read_rows(resumed)] == ["1", "2", "3", "4"]


@pytest.fixture(scope="module")
def ctrl_c_runs(tmp_path_factory):
    """A 3-epoch run, and the same run stopped by Ctrl-C in the middle of epoch 2 (its saved state is
    returned too) and resumed: (straight run folder, resumed run folder, state saved at the Ctrl-C)."""
    tmp_path = tmp_path_factory.mktemp("ctrl_c")
    straight = run(tmp_path, "--epochs", "3", "--run-name", "straight")
    calls = {"n": 0}
    original_step = training.train_step

    def interrupting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # in the middle of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(SystemExit) as exit_info:
        monkeypatch.setattr(training, "train_step", interrupting_step)
        run(tmp_path, "--epochs", "3", "--run-name", "split")
    assert exit_info.value.code == 128 + signal.SIGINT
    interrupted = tmp_path / "ck" / "split"
    state = torch.load(interrupted / "training_state.pt", weights_only=True)
    run(tmp_path, "--epochs", "3", "--run-name", "split", "--resume")
    return straight, interrupted, state


def test_the_command_advised_after_ctrl_c_in_an_overwrite_run_resumes_it(tmp_path, monkeypatch, capsys):
    run(tmp_path, "--epochs", "1", "--run-name", "r")
    original_step = training.train_step

    def interrupting_step(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", interrupting_step)
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "2", "--run-name", "r", "--overwrite", "--seed", "1")
    monkeypatch.undo()
    advice = capsys.readouterr().err.strip().splitlines()[-1]
    command = shlex.split(re.search("continue with `(.*)`$", advice).group(1))
    assert command[:2] == ["python", "training.py"] and "--overwrite" not in command
    run_dir = training.main(command[2:])
    assert [row["epoch"] for row in read_rows(run_dir)] == ["1", "2"]
    assert json.loads((run_dir / "args.json").read_text())["seed"] == 1


def test_ctrl_c_saves_in_the_middle_of_the_epoch(ctrl_c_runs):
    _, _, state = ctrl_c_runs
    assert (state["epoch"], state["step"], len(state["log"])) == (1, 5, 1)


def test_ctrl_c_and_resume_match_an_uninterrupted_run(ctrl_c_runs):
    straight, resumed, _ = ctrl_c_runs
    assert_same_weights(weights(straight), weights(resumed))


def test_log_row_of_an_epoch_interrupted_and_resumed_equals_the_uninterrupted_one(ctrl_c_runs):
    straight, resumed, _ = ctrl_c_runs
    losses = [[{key: row[key] for key in row if key != "images_per_s"} for row in read_rows(folder)]
              for folder in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def nan_losses(*args):
    return torch.full((3,), float("nan"), requires_grad=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = run(tmp_path, "--epochs", "1", "--run-name", "r")
    good = weights(run_dir)
    monkeypatch.setattr(training, "compute_losses", nan_losses)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "2", "--run-name", "r", "--resume")
    assert exit_info.value.code == 1
    assert f"nan, nan, nan] at epoch 2, step 8; {run_dir} keeps its last save (epoch 1" in capsys.readouterr().err
    assert_same_weights(good, weights(run_dir))


def test_nan_loss_in_a_new_run_says_nothing_was_saved_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "compute_losses", nan_losses)
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "2", "--run-name", "r")
    assert "nothing was saved" in capsys.readouterr().err
    assert not (tmp_path / "ck" / "r").exists()


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--help"])
    assert exit_info.value.code == 0
    assert "--eps-std" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "1"], "batch-size"),
    (["--style-dim", "0"], "style-dim"),
    (["--class-dim", "-3"], "class-dim"),
    (["--eps-std", "0"], "eps-std"),
    (["--device", "tpu"], "device"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
    (["--likelihood", "poisson"], "likelihood"),
    (["--group-size", "0"], "group-size"),
])
def test_bad_flags_are_rejected(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_with_other_dims_is_rejected(tmp_path, capsys):
    run(tmp_path, "--epochs", "1", "--run-name", "r")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "2", "--run-name", "r", "--resume", "--class-dim", "4")
    assert exit_info.value.code == 2 and "class-dim" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    run(tmp_path, "--epochs", "1", "--run-name", "r")
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "1", "--run-name", "r")
    assert "--resume" in capsys.readouterr().err


def test_a_run_without_training_state_is_replaced_only_with_overwrite(tmp_path, capsys):
    run_dir = run(tmp_path, "--epochs", "1", "--run-name", "r")
    (run_dir / "training_state.pt").unlink()  # as the shipped runs: weights, args.json and log.csv only
    shipped = weights(run_dir)
    for flags in ([], ["--resume"]):
        with pytest.raises(SystemExit):
            run(tmp_path, "--epochs", "2", "--run-name", "r", *flags)
        assert "--run-name" in capsys.readouterr().err
    assert_same_weights(shipped, weights(run_dir))
    run(tmp_path, "--epochs", "2", "--run-name", "r", "--overwrite")
    assert [row["epoch"] for row in read_rows(run_dir)] == ["1", "2"]


def test_resume_takes_the_settings_it_is_not_given_from_the_saved_run(tmp_path):
    run(tmp_path, "--epochs", "1", "--run-name", "r", "--style-dim", "6", "--eps-std", "0.5")
    run_dir = run(tmp_path, "--epochs", "2", "--run-name", "r", "--resume")
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["style_dim"], saved["eps_std"], saved["epochs"]) == (6, 0.5, 2)
    assert len(read_rows(run_dir)) == 2


def test_resume_rewrites_the_files_of_a_save_cut_short(tmp_path, capsys):
    run_dir = run(tmp_path, "--epochs", "1", "--run-name", "r")
    state = torch.load(run_dir / STATE_FILE, weights_only=True)
    (run_dir / "decoder.pt").unlink()
    (run_dir / "log.csv").write_text("epoch\n")
    (run_dir / "encoder.pt.tmp").write_bytes(b"half a file")
    assert stale_files(run_dir, state) == ["decoder.pt", "log.csv"]
    run(tmp_path, "--epochs", "1", "--run-name", "r", "--resume")
    assert "already finished" in capsys.readouterr().out
    assert not stale_files(run_dir, torch.load(run_dir / STATE_FILE, weights_only=True))
    assert sorted(path.name for path in run_dir.iterdir()) == sorted([STATE_FILE, *RUN_FILES])
    assert [row["epoch"] for row in read_rows(run_dir)] == ["1"]


def test_num_train_beyond_the_data_is_refused_not_recorded(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--epochs", "1", "--run-name", "r", "--num-train", "100000")
    assert "--num-train 100000 exceeds the 60000" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()


def test_classes_flag_trains_only_on_those_labels(tmp_path, monkeypatch):
    seen = []
    original_step = training.train_step

    def recording_step(encoder, decoder, optimizer, x, groups, *rest):
        seen.append(groups.unique())
        return original_step(encoder, decoder, optimizer, x, groups, *rest)

    monkeypatch.setattr(training, "train_step", recording_step)
    run_dir = run(tmp_path, "--epochs", "1", "--classes", "0", "1", "7")
    assert run_dir.name == "mlvae_eps0.1_classes017"
    assert set(torch.cat(seen).tolist()) == {0, 1, 7}


def test_resume_on_a_device_whose_generator_cannot_take_the_saved_random_state_is_refused(tiny_run, tmp_path,
                                                                                       start_script):
    # A CUDA generator's state is 16 bytes (seed and offset), a CPU generator's 5056: a run saved on a GPU.
    run_dir = tmp_path / "ck" / "tiny"
    shutil.copytree(tiny_run, run_dir)
    write_run(run_dir, {**read_run_state(run_dir), "generator": torch.zeros(16, dtype=torch.uint8)})
    saved = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    process = start_script("training", "--checkpoint-dir", tmp_path / "ck", "--run-name", "tiny", "--resume",
                           "--epochs", "2", "--device", "cpu", "--log-dir", tmp_path / "runs", "--no-progress")
    assert process.wait() == 2
    [line] = process.stderr.splitlines()
    assert line.startswith(f"error: --resume: {run_dir} was saved on cuda") and line.endswith("--device cuda" + (
        "" if torch.cuda.is_available() else " on a machine with CUDA")), line
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == saved
    assert not (tmp_path / "runs").exists()


def recorded_batches(monkeypatch) -> list[torch.Tensor]:
    """The images of every training step from now on (train_step wrapped)."""
    seen = []
    original_step = training.train_step

    def recording_step(encoder, decoder, optimizer, x, *rest):
        seen.append(x.flatten(1))
        return original_step(encoder, decoder, optimizer, x, *rest)

    monkeypatch.setattr(training, "train_step", recording_step)
    return seen


def test_num_train_takes_the_first_images_of_the_train_split_and_classes_picks_among_them(tmp_path, monkeypatch):
    images, labels = training.data_loader.load_split("data", "train")
    first = images[:1200].flatten(1)[torch.isin(labels[:1200], torch.tensor([0, 1]))]  # 255 images
    seen = recorded_batches(monkeypatch)
    run(tmp_path, "--epochs", "1", "--classes", "0", "1", "--num-train", "1200", "--run-name", "r")
    assert len(seen) == len(first) // 64  # not the 1200 // 64 of the first 1200 images of digits 0 and 1
    trained = torch.cat(seen)
    assert (trained.unsqueeze(1) == first.unsqueeze(0)).all(2).any(1).all()


def test_resume_of_a_run_saved_before_num_train_of_was_recorded_keeps_counting_among_its_classes(tmp_path,
                                                                                               monkeypatch):
    run_dir = run(tmp_path, "--epochs", "1", "--classes", "0", "1", "--num-train", "1200", "--run-name", "r")
    state = read_run_state(run_dir)
    old_args = {key: value for key, value in state["args"].items() if key != "num_train_of"}
    write_run(run_dir, {**state, "args": old_args})  # as saved when --num-train counted images of --classes
    seen = recorded_batches(monkeypatch)
    training.main(["--epochs", "2", "--run-name", "r", "--resume", "--checkpoint-dir", str(tmp_path / "ck"),
                   "--log-dir", str(tmp_path / "runs"), "--no-progress"])
    assert len(seen) == 1200 // 64
    assert json.loads((run_dir / "args.json").read_text())["num_train_of"] == "classes"


@pytest.mark.parametrize("flags", [["--classes", "0", "1"], ["--group-size", "5"]])
def test_a_run_with_empty_group_slots_trains_under_anomaly_detection(tmp_path, flags):
    # Both leave slots of the fixed-size group index empty at every step.
    with torch.autograd.detect_anomaly():
        run_dir = run(tmp_path, "--epochs", "1", "--num-train", "1200", "--run-name", "r", *flags)
    assert [row["epoch"] for row in read_rows(run_dir)] == ["1"]


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: the SigCgt mask in /proc)."""
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return bool(int(status["SigCgt"], 16) >> (signum - 1) & 1)


def test_sigterm_saves_and_exits_143_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_data, start_script):
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc to see when the run's signal handler is installed")
    common = ["--num-train", "512", "--batch-size", "64", "--data-dir", tiny_data, "--checkpoint-dir", tmp_path / "ck",
              "--log-dir", tmp_path / "runs", "--image-every", "0", "--no-progress"]
    process = start_script("training", *common, "--run-name", "term", "--epochs", "1000", "--save-every", "1000")
    while process.process.is_alive() and not catches(process.process.pid, signal.SIGTERM):
        time.sleep(0.01)
    time.sleep(0.5)  # some steps
    os.kill(process.process.pid, signal.SIGTERM)
    assert process.wait() == 143, process.stderr
    state = read_run_state(tmp_path / "ck" / "term")
    assert f"Stopped by SIGTERM: saved {tmp_path / 'ck' / 'term'} " in process.stderr
    assert 0 < state["iteration"] and state["epoch"] < 1000
    epochs = str(state["epoch"] + 1)
    resumed = start_script("training", *common, "--run-name", "term", "--resume", "--epochs", epochs)
    straight = start_script("training", *common, "--run-name", "straight", "--epochs", epochs)
    assert resumed.wait() == 0 and straight.wait() == 0, resumed.stderr + straight.stderr
    assert_same_weights(weights(tmp_path / "ck" / "straight"), weights(tmp_path / "ck" / "term"))


def test_ctrl_c_right_after_a_nan_loss_keeps_the_last_good_save(tmp_path, monkeypatch, capsys):
    # The loss is checked every PROGRESS_EVERY (25) steps; this NaN and the Ctrl-C fall in between.
    run_dir = run(tmp_path, "--epochs", "1", "--run-name", "r")
    good = weights(run_dir)
    calls = {"n": 0}

    def nan_then_ctrl_c(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return nan_losses() if calls["n"] >= 3 else original(*args)

    original = training.compute_losses
    monkeypatch.setattr(training, "compute_losses", nan_then_ctrl_c)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--epochs", "2", "--run-name", "r", "--resume")
    assert exit_info.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the loss or the weights became NaN or Inf before the save after epoch 2, step 3")
    assert f"{run_dir} keeps its last save (epoch 1, step 0)" in line
    state = read_run_state(run_dir)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert_same_weights(good, weights(run_dir))


def test_resume_takes_classes_as_a_set(tmp_path):
    run_dir = run(tmp_path, "--epochs", "1", "--classes", "8", "9")
    assert run(tmp_path, "--epochs", "2", "--classes", "9", "8", "8", "--resume") == run_dir
    assert json.loads((run_dir / "args.json").read_text())["classes"] == [8, 9]
    assert [row["epoch"] for row in read_rows(run_dir)] == ["1", "2"]


@pytest.mark.parametrize("precision,other,state", [("fp32", "tf32", ("highest", False)),
                                                   ("tf32", "fp32", ("high", True))])
def test_precision_says_whether_float32_matmuls_and_convolutions_may_run_in_tf32(tmp_path, precision, other, state):
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    set_float32_precision(other)  # the state the run must change
    try:
        run_dir = run(tmp_path, "--epochs", "1", "--run-name", "r", "--precision", precision)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == state
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    assert json.loads((run_dir / "args.json").read_text())["precision"] == precision
