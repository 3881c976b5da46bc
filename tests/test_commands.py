"""The commands the scripts' docstrings show leave every tracked file as it is (git status unchanged), and
training never writes into a folder that holds a shipped run."""
import importlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = ["training", "inference", "classifier", "tsne", *(f"studies.{path.stem}" for path in
                                                            sorted((ROOT / "studies").glob("[!_]*.py")))]
# Without --out these write to a tracked default (images/, checkpoints/), so their examples pass --out.
WRITE_A_DEFAULT_OUT = {"inference", "tsne", "studies.plot_losses", "studies.pixel_classifier",
                       "studies.tensorboard_screenshot"}


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
