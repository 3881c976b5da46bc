"""t-SNE maps of the style latents and of the class latents (without and with evidence), coloured by group.

On MNIST the groups are the digits; on folder data, the test split's groups (with a legend up to
LEGEND_GROUPS of them, beyond that colours only).

Each point is one test image's posterior mean. In the third panel the class code of an image is the
mean of the accumulated posterior of the images of its digit within its random batch (as in the
classifier's "with evidence" rows), so the members of a group share one point.

    python tsne.py                                       # writes out/tsne_mlvae_eps0.1.png
    python tsne.py --eps-std 0.1 --out out/reference_tsne_eps0.1.png \\
        --encoder $MLVAE_REFERENCE_DIR/encoder_0.1_var_reparam \\
        --decoder $MLVAE_REFERENCE_DIR/decoder_0.1_var_reparam
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.manifold import TSNE

import data_loader
from evaluation import encode
from runs import (PLOT_SUFFIXES, POSITIVE, POSITIVE_INT, Bounded, UserError, add_model_arguments, check_writable,
                  device_and_models, reports_errors, repository_path, save_figure, script_parser)
from utils import accumulate_group_evidence, training_groups

LEGEND_GROUPS = 20  # more groups than this are coloured without a legend


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    add = parser.add_argument
    add("--num-samples", type=Bounded(int, 3), default=2500,
        help="random test images to map (each t-SNE takes about a minute for 2500 on a busy core)")
    add("--evidence-batch", type=POSITIVE_INT, default=256, help="batch size within which a digit's images form a group")
    add("--perplexity", type=POSITIVE, default=30.0, help="t-SNE perplexity (below --num-samples)")
    add("--seed", type=int, default=0, help="seed of the image subset, the batches and t-SNE")
    add("--out", default=None, help="PNG path (default: out/tsne_<run>.png in the repository)")
    return parser


def latent_panels(encoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  evidence_batch: int) -> dict[str, torch.Tensor]:
    """The three point sets to map, keyed by panel title; rows follow `images`."""
    style_mu, _, class_mu, class_logvar = encode(encoder, images)
    group_mu, _ = accumulate_group_evidence(class_mu, class_logvar, training_groups(labels, batch_size=evidence_batch))
    return {"style": style_mu, "class, no evidence": class_mu, "class, with evidence": group_mu}


def plot(embeddings: dict[str, np.ndarray], labels: np.ndarray, names: list[str], title: str, out: Path) -> None:
    fig, axes = plt.subplots(1, len(embeddings), figsize=(5 * len(embeddings), 5.4))
    shown = np.unique(labels)
    colours = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20" if len(shown) <= 20 else "hsv")
    for ax, (name, points) in zip(axes, embeddings.items()):
        for rank, group in enumerate(shown):
            mine = labels == group
            ax.scatter(points[mine, 0], points[mine, 1], s=4, color=colours(rank / max(len(shown) - 1, 1)
                                                                            if len(shown) > 20 else rank),
                       label=names[group])
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(shown) <= LEGEND_GROUPS:
        handles, legend = axes[0].get_legend_handles_labels()
        fig.legend(handles, legend, loc="center right", title="group", markerscale=4, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.95, 1))
    save_figure(fig, out)


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.perplexity >= args.num_samples:
        parser.error(f"--perplexity {args.perplexity:g} must be smaller than --num-samples {args.num_samples}")
    device, encoder, _, settings = device_and_models(parser, args)
    out = check_writable(args.out or repository_path(f"out/tsne_{settings.name}.png"), "--out", PLOT_SUFFIXES)
    images, labels, names = data_loader.labelled_images(settings.data, "test", device)
    if args.num_samples > len(labels):
        raise UserError(f"--num-samples {args.num_samples} exceeds the {len(labels)} {settings.dataset} test images; "
                        f"pass at most {len(labels)}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    index = torch.randperm(len(labels), generator=generator, device=device)[: args.num_samples]
    panels = latent_panels(encoder, images[index], labels[index], args.evidence_batch)
    embeddings = {}
    for name, points in panels.items():
        tsne = TSNE(n_components=2, perplexity=args.perplexity, init="pca", random_state=args.seed)
        embeddings[name] = tsne.fit_transform(points.cpu().numpy())
        print(f"t-SNE of the {name} latents done")
    plot(embeddings, labels[index].cpu().numpy(), names,
         f"{settings.name}: posterior means of {args.num_samples} {settings.dataset} test images", out)
    print(f"Saved the t-SNE maps to {out}")
    return out


if __name__ == "__main__":
    main()
