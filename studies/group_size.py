"""Class-code accuracy on held-out images as a function of the number K of images whose evidence is fused.

For every test image (the query; with --split validation, every validation image), K-1 OTHER images
of its digit are drawn at random; the class posteriors of the query and those K-1 images are fused
by group evidence accumulation, and the fused posterior mean is classified. K = 1 is the query
alone. Three probes, all trained once on the single-image class posterior means of the training
images: logistic regression, 5-nearest neighbours and the reference's MLP. Nothing here groups a test
batch by label, so no probe can read the label off the batch layout.

    python -m studies.group_size --json out/group_size_mlvae_eps0.1.json
    python -m studies.group_size --encoder $MLVAE_REFERENCE_DIR/encoder_0.1_var_reparam \
        --decoder $MLVAE_REFERENCE_DIR/decoder_0.1_var_reparam --eps-std 0.1 \
        --json out/group_size_reference_eps0.1.json \
        --compare results/group_size_mlvae_eps0.1.json --out out/group_size.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

import data_loader
from evaluation import draw_evidence_sets, encode, predict, train_latent_classifiers
from runs import (PLOT_SUFFIXES, POSITIVE_INT, UserError, add_model_arguments, add_split_argument, check_finite,
                  check_label_counts, check_validation_unseen, check_writable, device_and_models, read_json,
                  reports_errors, save_figure, script_parser, write_text_atomic)
from utils import fused_means

GROUP_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
MLP_BATCH = 128  # the latent-classifier recipe's batch size
PROBES = ("logistic", "knn", "mlp")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    add_split_argument(parser)
    parser.add_argument("--group-sizes", type=POSITIVE_INT, nargs="+", default=list(GROUP_SIZES), help="values of K")
    parser.add_argument("--mlp-steps", type=POSITIVE_INT, default=3000, help="training steps of the MLP probe (the latent-classifier recipe of classifier.py, on posterior means)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evidence draws and the MLP probe")
    parser.add_argument("--label", default=None, help="name of this model in the figure (default: its path)")
    parser.add_argument("--json", default=None, help="write the accuracies here")
    parser.add_argument("--compare", nargs="*", default=[], help="JSON files of other models to draw too")
    parser.add_argument("--out", default=None, help="PNG of the accuracy-versus-K curves")
    return parser


def accuracy_by_group_size(train_mu: torch.Tensor, train_y: torch.Tensor, test_mu: torch.Tensor,
                           test_logvar: torch.Tensor, test_y: torch.Tensor, mlp: torch.nn.Module,
                           group_sizes: list[int], generator: torch.Generator) -> dict[str, list[float]]:
    """Test accuracy (percent) of each probe on the class posterior means fused over K images, one value
    per K of `group_sizes`: {"logistic": [...], "knn": [...], "mlp": [...]}.

    The logistic and kNN probes are fitted here on the single-image class means `train_mu`; `mlp` is a
    classifier already trained on them (evaluation.train_latent_classifiers on posterior means).
    """
    features, targets = train_mu.cpu().numpy(), train_y.cpu().numpy()
    sklearn_probes = {"logistic": LogisticRegression(max_iter=1000).fit(features, targets),
                      "knn": KNeighborsClassifier(n_neighbors=5).fit(features, targets)}
    results = {name: [] for name in PROBES}
    for k in group_sizes:
        z = fused_means(test_mu, test_logvar, draw_evidence_sets(test_y, k, generator))
        for name, probe in sklearn_probes.items():
            results[name].append(100.0 * probe.score(z.cpu().numpy(), test_y.cpu().numpy()))
        results["mlp"].append(100.0 * (predict(mlp, z) == test_y).float().mean().item())
    return results


def read_curves(path: str) -> dict:
    """The results of another model, as --json wrote them; UserError when the file is not such a result."""
    results = read_json(Path(path))
    if not {"label", "group_sizes", *PROBES} <= set(results):
        raise UserError(f"--compare {path} is not a result of studies.group_size --json (it lacks "
                        f"{sorted({'label', 'group_sizes', *PROBES} - set(results))})")
    return results


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for path, flag in ((args.json, "--json"), (args.out, "--out")):
        if path:
            check_writable(path, flag, PLOT_SUFFIXES if flag == "--out" else None)
    for path in args.compare:
        if not Path(path).is_file():
            raise UserError(f"--compare {path}: no such file; pass JSON files written by --json")
    compared = [read_curves(path) for path in args.compare]
    device, encoder, _, settings = device_and_models(parser, args)
    (train_x, train_y), (test_x, test_y), note = data_loader.evaluation_splits(settings.data, args.split, device)
    if args.split == "validation":
        check_validation_unseen(settings, torch.cat([train_y, test_y]))
    if note:
        print(note)
    # A set smaller than the recipe's batch (small folder data) trains the probe on batches of all of it.
    mlp_batch = min(MLP_BATCH, len(train_y))
    if mlp_batch < 2:
        raise UserError(f"the {len(train_y)} training images cannot fill one batch of 2 of the MLP probe (BatchNorm)")
    check_label_counts(test_y, sorted(set(test_y.tolist())), max(args.group_sizes), f"{settings.dataset} {args.split}",
                       "--group-sizes")
    train_posteriors = encode(encoder, train_x)
    _, _, test_mu, test_logvar = encode(encoder, test_x)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    _, mlp = train_latent_classifiers(train_posteriors, train_y, iterations=args.mlp_steps, batch_size=mlp_batch,
                                      lr=1e-4, evidence=False, eps_std=settings.eps_std, sampled=False,
                                      generator=generator, progress=False)
    accuracies = accuracy_by_group_size(train_posteriors[2], train_y, test_mu, test_logvar, test_y, mlp,
                                        args.group_sizes, torch.Generator().manual_seed(args.seed))
    results = {"label": args.label or str(settings.encoder_path), "split": args.split,
               "group_sizes": args.group_sizes, **accuracies}
    check_finite(results, "the group-size accuracies")
    for i, k in enumerate(args.group_sizes):
        print(f"K={k:4d}  " + "  ".join(f"{name} {results[name][i]:6.2f}" for name in PROBES))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    if args.out:
        plot_curves([results] + compared, args.out)
        print(f"wrote {args.out}")
    return results


def plot_curves(all_results: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = {"mlp": "-", "logistic": "--", "knn": ":"}
    for color, results in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], all_results):
        for name, style in styles.items():
            ax.plot(results["group_sizes"], results[name], style, marker="o", ms=3, color=color,
                    label=f"{results['label']} ({name})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K: test images whose class evidence is fused (the query + K-1 others of its digit)")
    ax.set_ylabel("class-code test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out, dpi=120)


if __name__ == "__main__":
    main()
