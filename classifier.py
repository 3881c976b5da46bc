"""How much digit information each latent space holds: the reference's latent-classifier protocol.

One MLP classifier is trained on style latents and one on class latents, sampled from the encoder's
posteriors for MNIST train batches of 128 (Adam, lr 1e-4); their accuracies over train and test
batches of 128 are then printed as a Markdown table. With evidence, the class latent of an image is
a sample of the accumulated posterior of its batch's images of the same digit (grouped by the true
label, one noise vector per group, scaled by the model's eps std), as in the reference's table.

    python classifier.py --both                       # the shipped run (checkpoints/mlvae_eps0.1)
    python classifier.py --both --eps-std 0.1 \\
        --encoder ../shared/reference/checkpoints/encoder_0.1_var_reparam \\
        --decoder ../shared/reference/checkpoints/decoder_0.1_var_reparam

The encoder runs once over each split; the training loop only samples from the stored posteriors.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from networks import Classifier, init_reference_
from utils import (accumulate_group_evidence, add_model_arguments, add_split_argument, batch_groups,
                   device_and_models, encode, group_wise_reparameterize, reparameterize, script_parser,
                   write_text_atomic)

NUM_CLASSES = 10
COLUMNS = ("eps std", "style dim", "class dim", "evidence", "style train", "style test", "class train",
           "class test")
ACCURACY_KEYS = ("style_train", "style_test", "class_train", "class_test")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    add = parser.add_argument
    add("--accumulate-evidence", action="store_true",
        help="class latent = grouped posterior of the batch's images of the same digit")
    add("--both", action="store_true", help="run with and without evidence, one table row each")
    add_split_argument(parser)
    add("--iterations", type=int, default=20000, help="classifier training steps (the reference: 100000)")
    add("--batch-size", type=int, default=128, help="images per training and evaluation batch")
    add("--lr", type=float, default=1e-4, help="Adam learning rate of the classifiers")
    add("--seed", type=int, default=0, help="seed of the classifiers' weights, the batch order and the noise")
    add("--json", default=None, help="also write the numbers here (one object; a list of two with --both)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--batchnorm-batch-stats", action="store_true",
        help="reference behaviour: measure accuracy with BatchNorm normalising each batch by its own statistics")
    return parser


def sample_latents(posteriors: tuple[torch.Tensor, ...], labels: torch.Tensor, order: torch.Tensor,
                   batch_size: int, evidence: bool, eps_std: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Style and class latents for the rows `order`, read as consecutive batches of `batch_size`.

    Without evidence each class latent is a sample of the image's own posterior; with evidence the
    posteriors of each (batch, digit) group are accumulated and sampled with one shared noise vector
    of std `eps_std` (the grouped reparameterization in training mode).
    """
    style_mu, style_logvar, class_mu, class_logvar = (t[order] for t in posteriors)
    style = reparameterize(style_mu, style_logvar, generator=generator)
    if not evidence:
        return style, reparameterize(class_mu, class_logvar, generator=generator)
    groups = batch_groups(labels[order], batch_size)
    group_mu, group_logvar = accumulate_group_evidence(class_mu, class_logvar, groups)
    return style, group_wise_reparameterize(group_mu, group_logvar, groups, eps_std, generator=generator)


def batch_order(num_rows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation cut to whole batches, as a shuffled DataLoader with drop_last gives."""
    return torch.cat(data_loader.epoch_batches(num_rows, batch_size, generator))


def train_classifiers(train: tuple[tuple[torch.Tensor, ...], torch.Tensor], args: argparse.Namespace,
                      evidence: bool, eps_std: float, generator: torch.Generator,
                      device: torch.device) -> tuple[Classifier, Classifier]:
    """Train the style and the class classifier for `args.iterations` steps on sampled latents."""
    posteriors, labels = train
    style_dim, class_dim = posteriors[0].shape[1], posteriors[2].shape[1]
    models = Classifier(style_dim, NUM_CLASSES).to(device), Classifier(class_dim, NUM_CLASSES).to(device)
    for model in models:
        init_reference_(model)  # the reference initialises its classifiers like its VAE
    # One Adam over both parameter sets equals one Adam each: its update is per parameter.
    optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=args.lr, betas=(0.9, 0.999),
                                 fused=True)
    steps_per_epoch = len(labels) // args.batch_size
    bar = tqdm(range(args.iterations), desc=f"classifiers ({'with' if evidence else 'no'} evidence)",
               unit="step", disable=args.no_progress, dynamic_ncols=True)
    for step in bar:
        if step % steps_per_epoch == 0:  # a fresh order and fresh latent samples every epoch
            order = batch_order(len(labels), args.batch_size, generator)
            style, class_ = sample_latents(posteriors, labels, order, args.batch_size, evidence, eps_std, generator)
            batches = zip(style.split(args.batch_size), class_.split(args.batch_size),
                          labels[order].split(args.batch_size))
        style_batch, class_batch, label_batch = next(batches)
        losses = [F.cross_entropy(model(z), label_batch) for model, z in zip(models, (style_batch, class_batch))]
        optimizer.zero_grad(set_to_none=True)
        sum(losses).backward()
        optimizer.step()
        if step % 500 == 0:
            bar.set_postfix(style_loss=f"{losses[0].item():.3f}", class_loss=f"{losses[1].item():.3f}")
    return models


@torch.no_grad()
def accuracies(models: tuple[Classifier, Classifier], split: tuple[tuple[torch.Tensor, ...], torch.Tensor],
               args: argparse.Namespace, evidence: bool, eps_std: float,
               generator: torch.Generator) -> tuple[float, float]:
    """Style and class accuracy in percent over one pass of whole batches of a split.

    The batches have equal sizes, so the mean over all rows equals the reference's mean of per-batch
    accuracies. The classifiers run in eval mode (BatchNorm with its running statistics) unless
    --batchnorm-batch-stats asks for the reference's per-batch statistics.
    """
    posteriors, labels = split
    order = batch_order(len(labels), args.batch_size, generator)
    latents = sample_latents(posteriors, labels, order, args.batch_size, evidence, eps_std, generator)
    result = []
    for model, z in zip(models, latents):
        # The reference left BatchNorm in training mode, so each batch was normalised by its own statistics.
        model.train(args.batchnorm_batch_stats)
        with torch.no_grad():
            predicted = torch.cat([model(chunk).argmax(1) for chunk in z.split(args.batch_size)])
        result.append(100.0 * (predicted == labels[order]).float().mean().item())
    return result[0], result[1]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row['eps_std']:g}", str(row["style_dim"]), str(row["class_dim"]),
                 "yes" if row["evidence"] else "no", *(f"{row[key]:.2f}" for key in ACCURACY_KEYS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (BatchNorm needs two rows)")
    device, encoder, _, settings = device_and_models(parser, args)
    try:
        (train_images, train_labels), (test_images, test_labels) = data_loader.evaluation_splits(
            args.data_dir, settings.dataset, args.split, device)
    except data_loader.DatasetFileError as error:
        sys.exit(f"error: {error}")
    if len(train_labels) < args.batch_size:
        parser.error(f"--batch-size {args.batch_size} is larger than the {len(train_labels)} training images")
    # The posteriors of every image, computed once; the classifiers then only sample from them.
    train = encode(encoder, train_images), train_labels
    test = encode(encoder, test_images), test_labels
    rows = []
    for evidence in ((False, True) if args.both else (args.accumulate_evidence,)):
        torch.manual_seed(args.seed)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        models = train_classifiers(train, args, evidence, settings.eps_std, generator, device)
        style_train, class_train = accuracies(models, train, args, evidence, settings.eps_std, generator)
        style_test, class_test = accuracies(models, test, args, evidence, settings.eps_std, generator)
        rows.append({"eps_std": settings.eps_std, "style_dim": settings.style_dim, "class_dim": settings.class_dim,
                     "evidence": evidence, "style_train": style_train, "style_test": style_test,
                     "class_train": class_train, "class_test": class_test})
    print(f"encoder {settings.encoder_path}, {settings.dataset}, split {args.split}, "
          f"{args.iterations} classifier steps, eps std {settings.eps_std:g}")
    print(markdown_table(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows if args.both else rows[0], indent=1) + "\n")
        print(f"Wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
