"""Time the default eager training step (fp32, batch 256, MNIST) of two checkouts side by side.

Each checkout's own `training.train_step` runs in a process of its own (two versions of the same
modules cannot share one), started from that checkout's folder; the processes alternate, `--runs`
times each, and each process keeps the fastest of its rounds, as timeit does. The ratio of the two
checkouts' fastest steps is printed, with the spread over the runs.

    git worktree add /tmp/before 2aeec6e          # the code before the hand-written autograd Functions went
    python studies/compare_eager.py /tmp/before . --runs 6 --json out/eager_before_after.json

It imports nothing from the repository itself, so it runs from this folder on any checkout.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("before", type=Path, help="checkout whose step is the reference (e.g. a git worktree)")
    add("after", type=Path, help="checkout compared with it")
    add("--runs", type=int, default=6, help="processes per checkout, alternating")
    add("--rounds", type=int, default=10, help="rounds of --steps steps per process; the fastest counts")
    add("--steps", type=int, default=20, help="steps per round")
    add("--warmup", type=int, default=20, help="untimed steps first")
    add("--threads", type=int, default=2, help="CPU threads in both")
    add("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data",
        help="folder holding MNIST/raw/ IDX files (for both)")
    add("--json", type=Path, default=None, help="also write the results here")
    add("--time-here", action="store_true", help=argparse.SUPPRESS)  # one timing process, in a checkout's folder
    return parser


def time_this_checkout(options: argparse.Namespace) -> list[float]:
    """Seconds per step of each round, for the checkout in the working folder (its own modules)."""
    sys.path.insert(0, os.getcwd())
    import data_loader
    import training

    torch.set_num_threads(options.threads)
    args = training.build_parser().parse_args([])  # training.py's defaults: fp32, batch 256, eager
    args.device = torch.device("cpu")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = data_loader.load_split(options.data_dir, "train")
    images = images.reshape(len(images), -1)
    encoder, decoder = training.Encoder(args.style_dim, args.class_dim), training.Decoder(args.style_dim,
                                                                                          args.class_dim)
    optimizer = training.make_optimizer(encoder, decoder, args)
    perm = torch.randperm(len(images), generator=generator)
    batches = len(images) // args.batch_size
    position = 0

    def step() -> None:
        nonlocal position
        index = perm[position * args.batch_size:(position + 1) * args.batch_size]
        position = (position + 1) % batches
        groups = training.training_groups(labels.index_select(0, index), args.group_size)
        # Checkouts whose train_step takes the group index's size get MNIST's ten labels.
        size = (10,) * ("num_groups" in inspect.signature(training.train_step).parameters)
        training.train_step(encoder, decoder, optimizer, images.index_select(0, index), groups, *size, args, generator)

    for _ in range(options.warmup):
        step()
    rounds = []
    for _ in range(options.rounds):
        start = time.perf_counter()
        for _ in range(options.steps):
            step()
        rounds.append((time.perf_counter() - start) / options.steps)
    return rounds


def describe_checkout(folder: Path) -> str:
    """The checkout's commit, marked when its working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "not a git checkout"
    return commit + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main(argv: list[str] | None = None) -> dict:
    options = build_parser().parse_args(argv)
    if options.time_here:
        print(json.dumps(time_this_checkout(options)))
        return {}
    data_dir = options.data_dir.resolve()
    flags = ["--time-here", "--rounds", str(options.rounds), "--steps", str(options.steps), "--warmup",
             str(options.warmup), "--threads", str(options.threads), "--data-dir", str(data_dir),
             "before", "after"]
    fastest = {"before": [], "after": []}
    load = os.getloadavg()
    for _ in range(options.runs):
        for name in ("before", "after"):
            folder = getattr(options, name).resolve()
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *flags], cwd=folder, check=True,
                                 capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(folder)})
            fastest[name].append(1e3 * min(json.loads(out.stdout.splitlines()[-1])))
    ratios = [after / before for before, after in zip(fastest["before"], fastest["after"])]
    results = {"before": describe_checkout(options.before), "after": describe_checkout(options.after),
               "threads": options.threads,
               "ms_per_step": fastest, "fastest_ms": {name: min(ms) for name, ms in fastest.items()},
               "after_over_before": min(fastest["after"]) / min(fastest["before"]),
               "after_over_before_per_run": ratios, "load_average_at_start": load,
               "load_average_at_end": os.getloadavg()}
    print(f"eager fp32 step, batch 256, {options.threads} threads, {options.runs} alternating runs each "
          f"(load average {load[0]:.2f} at start):")
    for name in ("before", "after"):
        print(f"  {name:6} {results[name]}: fastest {min(fastest[name]):.2f} ms/step, "
              f"runs {' '.join(f'{ms:.2f}' for ms in fastest[name])}")
    print(f"  after / before: {results['after_over_before']:.3f} (per run: median "
          f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f})")
    if options.json is not None:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
