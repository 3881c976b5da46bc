"""Shared test fixtures: the repository root on sys.path, the reference's published weights
($MLVAE_REFERENCE_DIR, default ../shared/reference/checkpoints; tests that need them skip without them),
tiny runs and data, scripts as processes, fresh git checkouts for commands run with their defaults,
and the textbook formulas (product of Gaussians, KL to the prior) that tests compare the code with."""
import itertools
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
REFERENCE_CHECKPOINTS = Path(os.environ.get("MLVAE_REFERENCE_DIR", SHARED / "reference" / "checkpoints"))


def naive_product_of_gaussians(mu, logvar, groups):
    """Per-sample rows (mean, log-variance) of each group's product of Gaussians: a loop over the groups
    with the textbook formula, in float64, the tests' reference for utils.accumulate_group_evidence."""
    mu, var = mu.double(), logvar.double().exp()
    out_mu, out_logvar = torch.empty_like(mu), torch.empty_like(mu)
    for g in groups.unique():
        members = groups == g
        precision = (1.0 / var[members]).sum(0)
        out_mu[members] = (mu[members] / var[members]).sum(0) / precision
        out_logvar[members] = -precision.log()
    return out_mu, out_logvar


def prior_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, from torch.distributions."""
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    return torch.distributions.kl_divergence(posterior, prior).sum(1)


@pytest.fixture
def reference_checkpoints() -> Path:
    if not (REFERENCE_CHECKPOINTS / "encoder_0.1_var_reparam").is_file():
        pytest.skip(f"the reference's published weights are not at {REFERENCE_CHECKPOINTS}")
    return REFERENCE_CHECKPOINTS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder (encoder.pt, decoder.pt, log.csv, args.json) trained for one short epoch, shared by
    the tests of the evaluation scripts."""
    import training

    root = tmp_path_factory.mktemp("tiny")
    return training.main(["--num-train", "512", "--batch-size", "64", "--epochs", "1", "--style-dim", "6",
                          "--class-dim", "4", "--eps-std", "0.5", "--checkpoint-dir", str(root / "ck"),
                          "--log-dir", str(root / "runs"), "--run-name", "tiny", "--no-progress"])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A --data-dir with the first 512 MNIST train and 256 test images as uncompressed IDX files: loads in
    milliseconds."""
    import data_loader

    root = tmp_path_factory.mktemp("tiny_data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, count in (("train", 512), ("test", 256)):
        images, labels = data_loader.load_split(ROOT / "data", split)
        prefix = data_loader.SPLIT_PREFIX[split]
        header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
        pixels = (images[:count] * 255).round().byte().numpy().tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + pixels)
        header = (2049).to_bytes(4, "big") + count.to_bytes(4, "big")
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels[:count].byte().numpy().tobytes())
    return root


# What a user's checkout needs for the default commands: the code, MNIST, the figures and the default model.
CHECKOUT_FILES = ("*.py", "studies/*.py", ".gitignore", "data/MNIST/raw/*", "images/*", "checkpoints/mlvae_eps0.1/*")


def git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(folder), "-c", "user.name=test", "-c", "user.email=test@invalid", *args],
                          capture_output=True, text=True, check=True)


@pytest.fixture(scope="session")
def new_checkout(tmp_path_factory):
    """new_checkout() clones a git repository of this working tree's code, MNIST, figures and default model
    (CHECKOUT_FILES) into a temporary folder, for the commands a user runs there as they stand (defaults
    included) without writing into this checkout. Returns the clone's folder."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path_factory.mktemp("checkouts")
    template = root / "template"
    for pattern in CHECKOUT_FILES:
        for path in ROOT.glob(pattern):
            target = template / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    git(template, "init", "-q")
    git(template, "add", "-A")
    git(template, "commit", "-qm", "the files a user's checkout holds")
    numbers = itertools.count()

    def clone() -> Path:
        folder = root / f"clone{next(numbers)}"
        git(root, "clone", "-q", str(template), str(folder))
        return folder

    return clone


def run_python(script: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """`python <script> <args>` in a fresh interpreter run in `cwd`, importing the modules beside the script."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)


# Imported once by the fork server, so that a script process starts in milliseconds, not seconds.
PRELOADED = ["torch", "torchvision", "numpy", "matplotlib.pyplot", "sklearn.linear_model", "sklearn.neighbors",
             "sklearn.manifold", "tqdm", "tensorboardX", "data_loader", "networks", "utils", "runs", "evaluation",
             "conftest"]


def run_as_main(module: str, argv: list[str], cwd: str, stdout: str, stderr: str, env: dict[str, str]) -> None:
    """The body of a script process: `python -m <module> <argv>` run in `cwd` with `env` added to its
    environment, its output to two files."""
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


@dataclass
class ScriptProcess:
    """A running script: wait for it, kill it, read what it wrote."""

    process: multiprocessing.Process
    stdout_path: Path
    stderr_path: Path

    def wait(self, timeout: float = 120) -> int:
        """The exit status (negative: the signal that ended it); a process still running is killed."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
            raise TimeoutError(f"{self.stderr_path}: still running after {timeout} s")
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()  # SIGKILL
        self.process.join()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


@pytest.fixture(scope="session")
def start_script(tmp_path_factory):
    """start_script(module, *args, cwd=ROOT, env={}) runs `python -m <module> <args>` as its own process: forked
    from a server that imported torch and the project's modules once (multiprocessing's forkserver),
    it behaves as a fresh interpreter would (exit status, stderr, a traceback for an uncaught error),
    without the seconds of imports."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOADED)
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "MPLBACKEND")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [saved["PYTHONPATH"]])])
    os.environ["MPLBACKEND"] = "Agg"  # the scripts' own choice, so that pyplot can be imported in advance
    try:
        warm_up = context.Process(target=os.getpid)  # waits for the server's imports
        warm_up.start()
        warm_up.join()
    finally:
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    logs = tmp_path_factory.mktemp("script_output")
    numbers = itertools.count()

    def start(module: str, *args, cwd: Path = ROOT, env: dict[str, str] | None = None) -> ScriptProcess:
        number = next(numbers)
        out, err = logs / f"{number}.out", logs / f"{number}.err"
        process = context.Process(target=run_as_main, args=(module, [str(a) for a in args], str(cwd), str(out),
                                                            str(err), env or {}))
        process.start()
        return ScriptProcess(process, out, err)

    return start
