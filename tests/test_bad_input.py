"""Every script, fed a bad flag, file or value, ends with one `error:` line that names it, a non-zero
exit status and no traceback, before it writes anything.

Each case runs as its own process (conftest.start_script) on tiny data, all of them at once.
"""
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch

TRAIN = ["--checkpoint-dir", "{tmp}/ck", "--log-dir", "{tmp}/runs", "--data-dir", "{data}", "--epochs", "1",
         "--no-progress"]
MODEL = ["--checkpoint-dir", "{run}", "--data-dir", "{data}"]


def read_cases(path: Path) -> list[tuple[str, list[str], str]]:
    """(script, flags, what the error line must name) of each line `script | flags | text` of the table."""
    cases = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            script, flags, expected = (part.strip() for part in line.split("|"))
            flags = shlex.split(flags)
            cases.append((script, MODEL + flags[1:] if flags[:1] == ["{model}"] else flags, expected))
    return cases


CASES = read_cases(Path(__file__).with_name("bad_input_cases.txt"))


def case_id(case):
    script, flags, _ = case
    return f"{script} {' '.join(flags[len(MODEL):] if flags[:len(MODEL)] == MODEL else flags)}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_run, tiny_data):
    """Paths the cases name: tiny data and a damaged copy, a file, and run folders good and broken."""
    tmp = tmp_path_factory.mktemp("bad_input")
    damaged = tmp / "damaged"
    shutil.copytree(tiny_data, damaged)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        path = damaged / "MNIST" / "raw" / name
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    file = tmp / "a_file"
    file.write_text("not json, not weights\n")
    runs = tmp / "runs_in"
    shutil.copytree(tiny_run, runs / "good")
    for name, broken in (("stateless", None), ("bad_args", "args.json"), ("bad_encoder", "encoder.pt"),
                         ("bad_state", "training_state.pt"), ("bad_log", "log.csv")):
        shutil.copytree(tiny_run, runs / name)
        if name != "bad_state":
            (runs / name / "training_state.pt").unlink()  # a run as shipped: weights, args and log only
        if broken:
            (runs / name / broken).write_text("epoch,iteration\n1,x,garbage\n")
    return {"tmp": tmp, "data": tiny_data, "damaged": damaged, "file": file, "runs": runs, "run": runs / "good"}


@pytest.fixture(scope="module")
def outcomes(workspace, start_script):
    """(exit status, stderr, seconds) of every case by its index in CASES, run a few at a time."""
    results = {}
    pending = list(enumerate(CASES))
    while pending:
        wave, pending = pending[:6], pending[6:]
        started = []
        for number, (script, flags, _) in wave:
            argv = [flag.format(**workspace) for flag in (TRAIN if script == "training" else []) + flags]
            started.append((number, start_script(script, *argv), time.monotonic()))
        for number, process, start in started:
            results[number] = (process.wait(120), process.stderr, time.monotonic() - start)
    return results


@pytest.mark.parametrize("number", range(len(CASES)), ids=[case_id(case) for case in CASES])
def test_bad_input_ends_in_one_error_line_naming_it(number, outcomes):
    code, stderr, _ = outcomes[number]
    case = CASES[number]
    lines = stderr.strip().splitlines()
    assert code not in (0, None) and "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: ") and case[2] in lines[-1], stderr
    assert sum(line.startswith("error:") for line in lines) == 1, stderr


def test_bad_input_writes_nothing(outcomes, workspace):
    tmp = workspace["tmp"]
    assert not list(tmp.rglob("*.tmp"))
    assert not (tmp / "ck").exists()  # no run folder, not even an empty one
    assert not list(tmp.glob("*.png")) and not list(tmp.glob("*.json"))


def test_resume_of_a_finished_run_says_so(tmp_path, tiny_run, start_script):
    run_dir = tmp_path / "ck" / "tiny"
    shutil.copytree(tiny_run, run_dir)
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    process = start_script("training", "--checkpoint-dir", tmp_path / "ck", "--run-name", "tiny", "--resume",
                           "--no-progress")
    assert process.wait() == 0
    out = process.stdout_path.read_text()
    assert "already finished (1 epochs, --epochs 1)" in out and "Saved to" not in out
    assert state["epoch"] == torch.load(run_dir / "training_state.pt", weights_only=True)["epoch"]
