"""training.py end to end on small subsets: outputs, resume, interruption, bad flags."""
import csv
import os
import signal

import pytest
import torch

import training
from networks import Decoder, Encoder

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


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = run(tmp_path, "--epochs", "3", "--run-name", "straight")
    calls = {"n": 0}
    original_step = training.train_step

    def interrupting_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # in the middle of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", interrupting_step)
    interrupted = run(tmp_path, "--epochs", "3", "--run-name", "split")
    state = torch.load(interrupted / "training_state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 5)
    monkeypatch.setattr(training, "train_step", original_step)
    run(tmp_path, "--epochs", "3", "--run-name", "split", "--resume")
    assert_same_weights(weights(straight), weights(interrupted))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = run(tmp_path, "--epochs", "1", "--run-name", "r")
    good = weights(run_dir)
    monkeypatch.setattr(training, "compute_losses", lambda *a: torch.full((3,), float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="NaN|nan"):
        run(tmp_path, "--epochs", "2", "--run-name", "r", "--resume")
    assert_same_weights(good, weights(run_dir))


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
