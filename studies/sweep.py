"""Choose settings on a validation split, never on the test split.

Each configuration is trained on MNIST train images [0, 50000) (`training.py --num-train 50000`) and
measured on train images [50000, 60000) with the committed evaluation scripts: `classifier.py
--split validation --both` (the reference's latent-classifier protocol, sampled latents), the same on
posterior means (`--latents means`) and `studies.group_size
--split validation --group-sizes 1` (single-image class posterior means under logistic, kNN and MLP probes).
Runs go to sweeps/<name>/ (not committed) and their TensorBoard logs to sweeps/runs/<name>/ (`tensorboard
--logdir sweeps/runs`); a finished run or evaluation is not redone.

    python -m studies.sweep --epochs 30 --jobs 2 --out out/sweep_validation.md
    python -m studies.sweep --configs paper stylekl4 --epochs 5 --iterations 500    # a quick look
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_loader import VALIDATION_START
from networks import PIXELS
from runs import (POSITIVE_INT, UserError, check_writable, read_run_state, reports_errors, repository_path,
                  script_parser, stale_files, write_text_atomic)

# name -> training.py flags on top of the defaults (paper-correct ML-VAE, eps std 0.1, mse).
CONFIGS = {
    "paper": [],
    "bernoulli": ["--likelihood", "bernoulli"],
    "gaussian": ["--likelihood", "gaussian"],
    "group2": ["--group-size", "2"],
    "stylekl2": ["--style-kl-coef", "2"],
    "stylekl4": ["--style-kl-coef", "4"],
    "stylekl16": ["--style-kl-coef", "16"],
    "stylekl4_group2": ["--style-kl-coef", "4", "--group-size", "2"],
    "dims16": ["--style-dim", "16", "--class-dim", "16"],
    "conv16": ["--arch", "conv", "--style-dim", "16", "--class-dim", "16"],
    "conv16_stylekl4": ["--arch", "conv", "--style-dim", "16", "--class-dim", "16", "--style-kl-coef", "4"],
    **{f"conv16_stylekl{weight}": ["--arch", "conv", "--style-dim", "16", "--class-dim", "16",
                                   "--style-kl-coef", weight] for weight in ("1.5", "2", "2.5", "3")},
}
COLUMNS = ("config", "flags", "reconstruction", "style KL (nats/image)", "style val", "style val (means)",
           "class val", "class val (means)", "class val (evidence)", "K=1 logistic", "K=1 kNN", "K=1 MLP")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--configs", nargs="+", choices=sorted(CONFIGS), default=[name for name in CONFIGS if not name.startswith("conv")],
        help="configurations to run (the conv ones are slow and run only when named)")
    add("--epochs", type=POSITIVE_INT, default=30, help="training epochs of each configuration")
    add("--num-train", type=int, default=VALIDATION_START,
        help=f"train on train images [0, N); at most {VALIDATION_START}, so the validation images stay unseen")
    add("--iterations", type=POSITIVE_INT, default=5000, help="classifier.py steps of each latent classifier")
    add("--jobs", type=POSITIVE_INT, default=2, help="configurations run at once, one CPU thread each")
    add("--sweep-dir", type=Path, default=repository_path("sweeps"),
        help="runs are saved in <sweep-dir>/<config>/, their TensorBoard logs in <sweep-dir>/runs/<config>/")
    add("--out", type=Path, default=None, help="also write the Markdown table here (and a .json beside it)")
    return parser


def run_config(name: str, args: argparse.Namespace) -> dict:
    """Train one configuration and evaluate it on the validation split; returns its table row."""
    run_dir = args.sweep_dir / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    commands = []
    state = read_run_state(run_dir)
    stopped = state is not None and (state["epoch"] < args.epochs or bool(stale_files(run_dir, state)))
    if stopped or state is None and not (run_dir / "encoder.pt").is_file():
        commands.append(["training.py", "--num-train", str(args.num_train), "--epochs", str(args.epochs),
                         "--no-progress", "--checkpoint-dir", str(args.sweep_dir), "--run-name", name,
                         "--log-dir", str(args.sweep_dir / "runs"),
                         "--save-every", str(args.epochs), *CONFIGS[name], *["--resume"] * stopped])
    evaluation = ["--checkpoint-dir", str(run_dir), "--split", "validation"]
    if not (run_dir / "classifier.json").is_file():
        commands.append(["classifier.py", *evaluation, "--both", "--iterations", str(args.iterations),
                         "--no-progress", "--json", str(run_dir / "classifier.json")])
    if not (run_dir / "classifier_means.json").is_file():
        commands.append(["classifier.py", *evaluation, "--latents", "means", "--iterations", str(args.iterations),
                         "--no-progress", "--json", str(run_dir / "classifier_means.json")])
    if not (run_dir / "group_size.json").is_file():
        commands.append(["-m", "studies.group_size", *evaluation, "--group-sizes", "1",
                         "--json", str(run_dir / "group_size.json")])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "sweep.log", "a") as log:
        for command in commands:
            print(f"[{name}] python {' '.join(command)}", flush=True)
            done = subprocess.run([sys.executable, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
            if done.returncode:
                raise UserError(f"[{name}] `python {' '.join(command)}` failed (exit status {done.returncode}); "
                                f"its output is at the end of {run_dir / 'sweep.log'}")
    without, with_evidence = json.loads((run_dir / "classifier.json").read_text())
    means = json.loads((run_dir / "classifier_means.json").read_text())
    probes = json.loads((run_dir / "group_size.json").read_text())
    with open(run_dir / "log.csv") as file:
        last_epoch = list(csv.DictReader(file))[-1]
    # log.csv divides each term by 784 pixels; times 784 is the style code's information per image.
    return {"config": name, "flags": " ".join(CONFIGS[name]) or "(defaults)",
            "reconstruction": float(last_epoch["reconstruction"]),
            "style KL (nats/image)": PIXELS * float(last_epoch["style_kl"]),
            "style val": without["style_test"], "style val (means)": means["style_test"],
            "class val": without["class_test"], "class val (means)": means["class_test"],
            "class val (evidence)": with_evidence["class_test"], "K=1 logistic": probes["logistic"][0],
            "K=1 kNN": probes["knn"][0], "K=1 MLP": probes["mlp"][0]}


def markdown_table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Validation split (train images {VALIDATION_START}-59999), {args.epochs}-epoch runs on train "
             f"images 0-{args.num_train - 1}. "
             "reconstruction: the last epoch's mean per-pixel loss term (its scale depends on the likelihood).",
             "", "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [row["config"], f"`{row['flags']}`", f"{row['reconstruction']:.5f}",
                 f"{row['style KL (nats/image)']:.2f}",
                 *(f"{row[key]:.2f}" for key in COLUMNS[4:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@reports_errors
def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.configs = list(dict.fromkeys(args.configs))  # a configuration named twice runs once
    if not 256 <= args.num_train <= VALIDATION_START:
        parser.error(f"--num-train must lie in [256, {VALIDATION_START}]: the validation images must stay unseen")
    check_writable(args.sweep_dir, "--sweep-dir", folder=True)
    if args.out:
        check_writable(args.out, "--out")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda name: run_config(name, args), args.configs))
    table = markdown_table(rows, args)
    print(table)
    if args.out:
        write_text_atomic(args.out, table)
        write_text_atomic(args.out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
