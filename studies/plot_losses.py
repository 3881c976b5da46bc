"""Draw the three loss curves (reconstruction, style KL, class KL) of one or more runs from their log.csv.

One panel per term, one line per run, against the epoch; the values are the per-epoch means that
training.py logs (each term divided by batch*784). No tensorboard needed.

    python -m studies.plot_losses --out out/losses.png          # default --out: <first run folder>/losses.png
    python -m studies.plot_losses --checkpoint-dir checkpoints/mlvae_eps0.1 checkpoints/mlvae_eps1 \\
        --out out/losses_eps.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt

from runs import (DEFAULT_RUN, PLOT_SUFFIXES, check_writable, read_log, reports_errors, repository_path, save_figure,
                  script_parser)

TERMS = {"reconstruction": "reconstruction", "style_kl": "style KL", "class_kl": "class KL"}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint-dir", nargs="+", default=[repository_path(DEFAULT_RUN)],
                        help="run folders, each holding a log.csv written by training.py")
    parser.add_argument("--out", default=None, help="PNG path (default: losses.png in the first run folder)")
    parser.add_argument("--log-scale", action="store_true", help="logarithmic loss axes")
    return parser


def plot_losses(logs: dict[str, list[dict]], out: Path, log_scale: bool = False) -> None:
    """One panel per loss term, one line per run (`logs` maps a run's name to its log rows)."""
    fig, axes = plt.subplots(1, len(TERMS), figsize=(5 * len(TERMS), 3.8))
    for ax, (field, title) in zip(axes, TERMS.items()):
        for name, rows in logs.items():
            ax.plot([int(r["epoch"]) for r in rows], [float(r[field]) for r in rows], label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_yscale("log" if log_scale else "linear")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per-epoch mean / (batch * 784)")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, out)


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = check_writable(args.out or Path(args.checkpoint_dir[0]) / "losses.png", "--out", PLOT_SUFFIXES)
    logs = {}
    for run_dir in map(Path, args.checkpoint_dir):
        path = run_dir / "log.csv"
        if not path.is_file():
            parser.error(f"no log at {path}; point --checkpoint-dir at a run folder written by training.py")
        rows = read_log(path)
        if not rows or not set(TERMS) <= set(rows[0]):
            parser.error(f"{path} holds no epochs with the columns {', '.join(TERMS)}")
        logs[run_dir.name] = rows
    plot_losses(logs, out, args.log_scale)
    print(f"Saved the loss curves of {', '.join(logs)} to {out}")
    return out


if __name__ == "__main__":
    main()
