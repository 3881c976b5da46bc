"""Measure what training.py's tensorboard logging costs: time each logging helper inside a real training
run and compare it with the run's wall time.

The run logs images every --image-every epochs (default 1, to time several calls); the cost at training.py's
defaults is then estimated from the steady per-call times: the step losses every epoch, the images every
5th epoch.

    python -m studies.tensorboard_overhead                  # full MNIST, 3 epochs
    python -m studies.tensorboard_overhead --epochs 1 --num-train 10000
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from unittest import mock

import training
from runs import POSITIVE_INT, script_parser

HELPERS = ("tensorboard_sources", "write_step_losses", "log_images")  # the tensorboard work of training.train


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--epochs", type=POSITIVE_INT, default=3, help="epochs of the timed run")
    add("--num-train", type=POSITIVE_INT, default=None, help="training images (default: all)")
    add("--image-every", type=POSITIVE_INT, default=1, help="epochs between image logs in the timed run")
    add("--log-every", type=POSITIVE_INT, default=50, help="steps between logged loss means in the timed run")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    return parser


def timed(fn, calls: list[float]):
    """`fn`, appending the seconds of each call to `calls`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)
    return wrapper


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = build_parser().parse_args(argv)
    spent = {name: [] for name in HELPERS}
    patches = [mock.patch.object(training, name, timed(getattr(training, name), spent[name])) for name in HELPERS]
    flags = ["--epochs", str(args.epochs), "--image-every", str(args.image_every), "--log-every",
             str(args.log_every), "--device", args.device, "--run-name", "timed", "--no-progress"]
    if args.num_train is not None:
        flags += ["--num-train", str(args.num_train)]
    with tempfile.TemporaryDirectory() as scratch, patches[0], patches[1], patches[2]:
        start = time.perf_counter()
        training.main([*flags, "--checkpoint-dir", f"{scratch}/checkpoints", "--log-dir", f"{scratch}/runs"])
        total = time.perf_counter() - start
    print(f"{args.epochs} epochs in {total:.2f} s ({total / args.epochs:.2f} s/epoch)")
    print(f"{'helper':<20} {'calls':>5} {'first ms':>9} {'later ms':>9} {'total s':>8} {'of run':>7}")
    for name, calls in spent.items():
        later = f"{1000 * sum(calls[1:]) / (len(calls) - 1):.1f}" if len(calls) > 1 else "-"
        print(f"{name:<20} {len(calls):>5} {1000 * calls[0]:>9.1f} {later:>9} {sum(calls):>8.3f} "
              f"{100 * sum(calls) / total:>6.2f}%")
    epoch = total / args.epochs
    steps = sum(spent["write_step_losses"]) / args.epochs
    images = spent["log_images"] or [0.0]
    image = sum(images[1:]) / max(len(images) - 1, 1)
    print(f"steady cost at the defaults (images every 5 epochs): {100 * (steps + image / 5) / epoch:.2f}% of "
          f"training time, plus {sum(spent['tensorboard_sources']) + images[0] - image:.2f} s once at the start")
    return spent


if __name__ == "__main__":
    main()
