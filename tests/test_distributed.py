"""training.py in several processes (distributed.py): two processes under torchrun train the weights of one
process, a run resumes on another number of processes, a killed process ends the other with one error line and
the last save whole, a SIGTERM to one process stops all at one step with a save, and a batch that the processes
cannot share is one error line.

Beside the torchrun test, the processes are forked from the test's preloaded server (start_script) with the
variables torchrun gives each process (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), which start in a
fraction of torchrun's seconds."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import distributed
import training
from conftest import ROOT
from runs import STATE_FILE, read_run_state, stale_files

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def flags(tiny_data, tmp_path, name, *more):
    # 512 images, 4 groups of 8 a batch: 15 steps an epoch.
    return [str(word) for word in ("--num-train", "512", "--groups-per-batch", "4", "--images-per-group", "8",
                                   "--style-dim", "4", "--class-dim", "4", "--data-dir", tiny_data, "--checkpoint-dir",
                                   tmp_path / "ck", "--log-dir", tmp_path / "runs", "--run-name", name, "--image-every",
                                   "0", "--no-progress", *more)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_processes(start_script, argv, size=2):
    """training.py in `size` processes of one process group, as torchrun --standalone starts them."""
    port = str(free_port())
    return [start_script("training", *argv, env={"RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
                                                 "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
                                                 "MASTER_PORT": port})
            for rank in range(size)]


def weights(run_dir):
    return {name: torch.load(run_dir / f"{name}.pt", weights_only=True) for name in ("encoder", "decoder")}


def assert_close_weights(expected, got):
    for name in expected:
        for key, value in expected[name].items():
            torch.testing.assert_close(got[name][key], value, rtol=0, atol=1e-5, msg=f"{name}.{key}")


def losses(run_dir):
    with open(run_dir / "log.csv") as handle:
        return torch.tensor([[float(row[key]) for key in ("reconstruction", "style_kl", "class_kl")]
                             for row in csv.DictReader(handle)], dtype=torch.float64)


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux: the SigCgt mask in /proc)."""
    status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return bool(int(status["SigCgt"], 16) >> (signum - 1) & 1)


def test_two_processes_under_torchrun_train_the_weights_and_the_log_of_one_process(tmp_path, tiny_data):
    one = training.main(flags(tiny_data, tmp_path, "one", "--epochs", "2"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*TORCHRUN, "training.py", *flags(tiny_data, tmp_path, "two", "--epochs", "2")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("Saved to") == 1  # rank 0 alone prints
    assert_close_weights(weights(one), weights(tmp_path / "ck" / "two"))
    torch.testing.assert_close(losses(tmp_path / "ck" / "two"), losses(one), rtol=1e-4, atol=0)
    assert read_run_state(tmp_path / "ck" / "two")["iteration"] == read_run_state(one)["iteration"] >= 20
    # Every process drew the noise one process draws: the saved generator continues one process's stream.
    assert torch.equal(read_run_state(tmp_path / "ck" / "two")["generator"], read_run_state(one)["generator"])
    assert len(list((tmp_path / "runs" / "two").glob("events.out.tfevents.*"))) == 1


def test_a_run_resumes_on_another_number_of_processes(tmp_path, tiny_data, start_script):
    straight = training.main(flags(tiny_data, tmp_path, "straight", "--epochs", "3"))
    # Two processes, then one; one, then two.
    for rank_process in start_processes(start_script, flags(tiny_data, tmp_path, "two_one", "--epochs", "1")):
        assert rank_process.wait() == 0, rank_process.stderr
    training.main(flags(tiny_data, tmp_path, "two_one", "--epochs", "3", "--resume"))
    training.main(flags(tiny_data, tmp_path, "one_two", "--epochs", "1"))
    for rank_process in start_processes(start_script, flags(tiny_data, tmp_path, "one_two", "--epochs", "3",
                                                            "--resume")):
        assert rank_process.wait() == 0, rank_process.stderr
    for name in ("two_one", "one_two"):
        assert_close_weights(weights(straight), weights(tmp_path / "ck" / name))
        torch.testing.assert_close(losses(tmp_path / "ck" / name), losses(straight), rtol=1e-4, atol=0)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc to see when the run's signal handler is set")
def test_sigterm_to_one_process_stops_all_after_the_same_step_with_a_save_and_exit_143(tmp_path, tiny_data,
                                                                                     start_script):
    run_dir = tmp_path / "ck" / "term"
    processes = start_processes(start_script, flags(tiny_data, tmp_path, "term", "--epochs", "1000",
                                                    "--save-every", "1000"))
    while processes[1].process.is_alive() and not catches(processes[1].process.pid, signal.SIGTERM):
        time.sleep(0.01)
    time.sleep(0.5)  # some steps
    os.kill(processes[1].process.pid, signal.SIGTERM)  # rank 0 learns of it from rank 1
    assert [process.wait(60) for process in processes] == [143, 143], processes[0].stderr + processes[1].stderr
    state = read_run_state(run_dir)
    assert 0 < state["iteration"] and state["epoch"] < 1000 and not stale_files(run_dir, state)
    assert f"Stopped by a signal to another process of the run: saved {run_dir} " in processes[0].stderr
    assert processes[1].stderr == ""  # rank 0 speaks for both


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc to see when the run has saved")
def test_sigkill_of_one_process_ends_the_other_with_one_error_line_and_keeps_the_last_save(tmp_path, tiny_data,
                                                                                          start_script):
    run_dir = tmp_path / "ck" / "kill"
    processes = start_processes(start_script, flags(tiny_data, tmp_path, "kill", "--epochs", "1000"))
    while processes[0].process.is_alive() and not (run_dir / STATE_FILE).exists():
        time.sleep(0.01)
    time.sleep(0.2)
    processes[1].kill()
    assert processes[0].wait(60) == 1, processes[0].stderr
    [line] = processes[0].stderr.strip().splitlines()
    state = read_run_state(run_dir)
    assert line.startswith("error: process 0 of 2: another process of the run ended (")
    assert f"{run_dir} keeps its last save (epoch {state['epoch']}, step 0); continue with `torchrun " in line
    assert 0 < state["epoch"] < 1000 and not stale_files(run_dir, state)
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.parametrize("batches, words", [
    (["--groups-per-batch", "5", "--images-per-group", "8"], "--groups-per-batch 5: 2 processes take whole groups"),
    (["--batch-size", "64"], "random batches group images by label inside a batch, which 2 processes cannot share"),
])
def test_a_batch_the_processes_cannot_share_is_one_error_line_of_rank_0(tmp_path, monkeypatch, capsys, batches,
                                                                         words):
    argv = ["--num-train", "512", "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs"),
            *batches]
    for rank, lines in ((0, 1), (1, 0)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit) as exit_info:
            training.main(argv)
        assert exit_info.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == lines and all(words in line for line in err), err


def test_the_world_comes_from_torchruns_variables():
    assert distributed.world_from_environment({}) == distributed.World(0, 1, 0, 1)
    world = distributed.world_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                "LOCAL_WORLD_SIZE": "2"})
    assert world == distributed.World(3, 4, 1, 2) and not world.leader


@pytest.mark.parametrize("sizes, launcher, rest", [
    (None, "`python training.py", "--resume`"),
    (("2", "2"), "`torchrun --nproc_per_node=2 training.py", "--resume`"),
    (("4", "2"), "`torchrun --nnodes=2 --nproc_per_node=2 training.py",
     "--resume` on every node, with the launch's rendezvous flags")])
def test_the_resume_command_names_the_launch(monkeypatch, sizes, launcher, rest):
    if sizes:
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", sizes[0])
        monkeypatch.setenv("LOCAL_WORLD_SIZE", sizes[1])
    else:
        monkeypatch.delenv("RANK", raising=False)
    args = training.build_parser().parse_args(["--run-name", "r", "--checkpoint-dir", "ck"])
    args.device = training.pick_device("auto")
    command = training.resume_command(args)
    assert command.startswith(launcher + " --checkpoint-dir ck --run-name r") and command.endswith(rest), command


def test_one_process_averages_nothing():
    tensors = [torch.randn(3, 2), torch.randn(4)]
    assert all(a is b for a, b in zip(distributed.average_over_processes(tensors), tensors))
