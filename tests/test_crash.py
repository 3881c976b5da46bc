"""training.py killed with SIGKILL at random instants: the run folder always holds one consistent save, and
resuming after every kill ends with the weights and the log of a run that was never interrupted."""
import argparse
import random
import time

import torch

from runs import RUN_FILES, STATE_FILE, add_model_arguments, load_models, read_log, read_run_state, stale_files

KILLS = 20
EPOCHS = 12


def flags(data, checkpoints, name):
    return ["--num-train", "512", "--batch-size", "64", "--save-every", "1", "--epochs", EPOCHS, "--style-dim", "4",
            "--class-dim", "4", "--data-dir", data, "--checkpoint-dir", checkpoints,
            "--log-dir", checkpoints.parent / "runs", "--run-name", name, "--no-progress"]


def assert_consistent(run_dir):
    """What a reader finds after a kill: no training state and no other file yet, or a training state that
    loads, whose log covers its epochs, and whose weights are what load_models reads (a file of an older
    save is noticed by its hash, never mixed in). Returns the state."""
    names = {path.name for path in run_dir.iterdir()} if run_dir.exists() else set()
    final = {STATE_FILE, *RUN_FILES}
    assert names <= final | {name + ".tmp" for name in final}, names
    state = read_run_state(run_dir)
    if state is None:
        assert not names & set(RUN_FILES), names  # the other files are written after the state only
        return None
    assert [int(row["epoch"]) for row in state["log"]] == list(range(1, state["epoch"] + 1))
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    encoder, decoder, _ = load_models(parser.parse_args(["--checkpoint-dir", str(run_dir)]), torch.device("cpu"))
    for network, name in ((encoder, "encoder"), (decoder, "decoder")):
        for key, value in network.state_dict().items():
            assert torch.equal(value, state[name][key]), (name, key)
    return state


def test_sigkill_at_random_instants_never_mixes_saves_and_resume_matches_an_uninterrupted_run(
        tmp_path, tiny_data, start_script):
    checkpoints = tmp_path / "ck"
    start = time.monotonic()
    straight = start_script("training", *flags(tiny_data, checkpoints, "straight"))
    while straight.process.is_alive() and not (checkpoints / "straight" / STATE_FILE).exists():
        time.sleep(0.01)
    first_save = time.monotonic()
    assert straight.wait() == 0, straight.stderr
    epoch = (time.monotonic() - first_save) / (EPOCHS - 1)  # seconds per epoch and save on this machine now
    startup = first_save - start - epoch
    # Kill instants spread over a process's start (and a resumed run's rewrite of its files) and its
    # first two epochs (steps and saves), so that a kill lands in each phase and the run moves on
    # about one epoch per start; once it is finished, kills land in the rewrite.
    run_dir = checkpoints / "killed"
    draw = random.Random(0)
    kills, epochs_at_kills = 0, []
    for _ in range(10 * KILLS):
        resume = ["--resume"] if (run_dir / STATE_FILE).is_file() else []
        process = start_script("training", *flags(tiny_data, checkpoints, "killed"), *resume)
        process.process.join(draw.uniform(0, startup + 2 * epoch))
        process.kill()
        assert process.process.exitcode in (0, -9), process.stderr
        state = assert_consistent(run_dir)
        if process.process.exitcode == -9:
            kills += 1
            epochs_at_kills.append(None if state is None else state["epoch"])
        if kills == KILLS:
            break
    assert kills == KILLS
    finish = start_script("training", *flags(tiny_data, checkpoints, "killed"), "--resume")
    assert finish.wait() == 0, finish.stderr
    state = assert_consistent(run_dir)
    assert state["epoch"] == EPOCHS and not stale_files(run_dir, state)
    assert not list(run_dir.glob("*.tmp"))
    for name in ("encoder.pt", "decoder.pt"):
        resumed, uninterrupted = (torch.load(folder / name, weights_only=True) for folder in (run_dir,
                                                                                              checkpoints / "straight"))
        for key in uninterrupted:
            assert torch.equal(resumed[key], uninterrupted[key]), (name, key, epochs_at_kills)
    losses = [[{key: row[key] for key in ("epoch", "iteration", "reconstruction", "style_kl", "class_kl")}
               for row in read_log(folder / "log.csv")] for folder in (run_dir, checkpoints / "straight")]
    assert losses[0] == losses[1]
