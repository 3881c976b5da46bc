"""The commands the scripts' docstrings show leave every tracked file as it is (git status unchanged), and
training never writes into a folder that holds a shipped run."""
import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_python
from conftest import git as git_in

SCRIPTS = ["training", "inference", "classifier", "tsne", *(f"studies.{path.stem}" for path in
                                                            sorted((ROOT / "studies").glob("[!_]*.py")))]
# Without --out these write to a tracked default (images/, checkpoints/), so their examples pass --out.
WRITE_A_DEFAULT_OUT = {"studies.plot_losses", "studies.pixel_classifier", "studies.tensorboard_screenshot"}
TINY_TRAINING = ["--epochs", "1", "--num-train", "512", "--batch-size", "64", "--image-every", "0", "--no-progress"]


def git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def docstring_commands(module) -> list[list[str]]:
    """The `python ...` lines of a module's docstring (continuation lines joined), as argument lists."""
    commands, line_so_far = [], ""
    for line in module.__doc__.splitlines():
        line = line_so_far + line.strip()
        line_so_far = line[:-1] if line.endswith("\\") else ""
        if line.startswith("python ") and not line_so_far:
            commands.append(shlex.split(line, comments=True))
    return commands


def written_paths(name: str, module, argv: list[str]) -> list[Path]:
    """The files the command would write (a file in each folder it would write into)."""
    args = module.build_parser().parse_args(argv)
    if name == "training":
        run_name = args.run_name or module.default_run_name(args)
        return [Path(args.checkpoint_dir) / run_name / "encoder.pt", Path(args.log_dir) / run_name / "events"]
    if name in WRITE_A_DEFAULT_OUT:
        assert args.out is not None, f"{name} {shlex.join(argv)} writes to its tracked default --out"
    folder = getattr(args, "sweep_dir", None)
    paths = [getattr(args, "out", None), getattr(args, "json", None), folder and Path(folder) / "paper"]
    return [Path(path) for path in paths if path is not None]


@pytest.mark.parametrize("name", SCRIPTS)
def test_docstring_commands_write_only_ignored_paths(name):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    module = importlib.import_module(name)
    commands = docstring_commands(module)
    assert commands, f"{name}'s docstring shows no command"
    for command in commands:
        argv = command[2:] if command[1].endswith(".py") else command[3:]
        script = f"{name.replace('.', '/')}.py"
        assert command[:3] == ["python", "-m", name] or command[:2] == ["python", script], command
        for path in written_paths(name, module, argv):
            inside = (ROOT / path).resolve()
            if ROOT in inside.parents:
                assert git("check-ignore", "-q", str(inside)).returncode == 0, f"{shlex.join(command)} writes {path}"


def test_training_into_the_shipped_runs_is_refused_and_changes_no_file(start_script, tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    before = git("status", "--porcelain").stdout
    process = start_script("training", "--checkpoint-dir", "checkpoints", "--log-dir", tmp_path / "runs")
    assert process.wait() == 2
    assert process.stderr.startswith("error: checkpoints/mlvae_eps0.1 already holds a run")
    assert "--run-name" in process.stderr and "--overwrite" in process.stderr
    assert git("status", "--porcelain").stdout == before


def test_a_script_run_from_another_folder_reads_and_writes_the_repositorys_default_folders(new_checkout, tmp_path):
    checkout, elsewhere = new_checkout(), tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_python(checkout / "training.py", *TINY_TRAINING, "--run-name", "r", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert list(elsewhere.iterdir()) == []
    assert (checkout / "out" / "r" / "encoder.pt").is_file() and any((checkout / "runs" / "r").iterdir())
    assert git_in(checkout, "status", "--porcelain").stdout == ""


def test_a_missing_mnist_file_is_not_downloaded_and_the_advice_restores_it(new_checkout, tmp_path):
    checkout, elsewhere = new_checkout(), tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = checkout.resolve() / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    missing.unlink()
    done = run_python(checkout / "training.py", *TINY_TRAINING, cwd=elsewhere)
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: mnist file {missing}: it is missing."), line
    assert list(elsewhere.iterdir()) == [] and not (checkout / "out").exists()
    tracked = {Path(name).name for name in git_in(checkout, "ls-files", "data").stdout.split()}
    assert {path.name for path in missing.parent.iterdir()} == tracked - {missing.name}  # nothing downloaded
    assert list(checkout.joinpath("data").iterdir()) == [checkout / "data" / "MNIST"]
    advice = shlex.split(re.search(r"`(git -C .*)`", line).group(1))
    subprocess.run(advice, check=True, cwd=elsewhere)
    done = run_python(checkout / "training.py", *TINY_TRAINING, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_data_dir_without_mnist_gets_no_download_and_no_folder(new_checkout, tmp_path):
    checkout = new_checkout()
    done = run_python(checkout / "training.py", *TINY_TRAINING, "--data-dir", "nodata", cwd=tmp_path)
    [line] = done.stderr.splitlines()
    assert done.returncode == 2 and line.startswith(
        f"error: mnist file nodata/MNIST/raw/train-images-idx3-ubyte.gz: it is missing. To fix it, copy the four "
        "MNIST IDX files into nodata/MNIST/raw"), line
    assert not (tmp_path / "nodata").exists()
