"""How much group (digit) information each latent space holds: the reference's latent-classifier protocol.

One MLP classifier is trained on style latents and one on class latents, sampled from the encoder's
posteriors (or, with --latents means, their means) for MNIST train batches of 128 (Adam, lr 1e-4);
their accuracies over train and test batches of 128 are then printed as a Markdown table. With evidence, the class latent of an image is
a sample of the accumulated posterior of its batch's images of the same digit (grouped by the true
label, one noise vector per group, scaled by the model's eps std), as in the reference's table.

    python classifier.py --both                       # the shipped run (checkpoints/mlvae_eps0.1)
    python classifier.py --both --latents means       # the same protocol on posterior means
    python classifier.py --both --eps-std 0.1 \\
        --encoder $MLVAE_REFERENCE_DIR/encoder_0.1_var_reparam \\
        --decoder $MLVAE_REFERENCE_DIR/decoder_0.1_var_reparam

On folder data the label is the image's group. Where the test groups are not training groups (unseen
identities), both classifiers are fitted on the first half of each test group's images and scored on
the second half; the output says so.

The encoder runs once over each split; the training loop only samples from the stored posteriors.
"""
from __future__ import annotations

import argparse
import json

import torch

import data_loader
from evaluation import classifier_protocol, encode
from runs import (POSITIVE, POSITIVE_INT, Bounded, UserError, add_model_arguments, add_split_argument, check_finite,
                  check_validation_unseen, check_writable, device_and_models, reports_errors, script_parser,
                  write_text_atomic)

COLUMNS = ("latents", "eps std", "style dim", "class dim", "evidence", "style train", "style test", "class train",
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
    add("--latents", choices=("sampled", "means"), default="sampled",
        help="sampled: latents drawn from the posteriors (the reference); means: the posterior means")
    add("--iterations", type=POSITIVE_INT, default=20000, help="classifier training steps (the reference: 100000)")
    add("--batch-size", type=Bounded(int, 2), default=128,
        help="images per training and evaluation batch (at least 2: BatchNorm)")
    add("--lr", type=POSITIVE, default=1e-4, help="Adam learning rate of the classifiers")
    add("--seed", type=int, default=0, help="seed of the classifiers' weights, the batch order and the noise")
    add("--json", default=None, help="also write the numbers here (one object; a list of two with --both)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--batchnorm-batch-stats", action="store_true",
        help="reference behaviour: measure accuracy with BatchNorm normalising each batch by its own statistics")
    return parser


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        cells = [row["latents"], f"{row['eps_std']:g}", str(row["style_dim"]), str(row["class_dim"]),
                 "yes" if row["evidence"] else "no", *(f"{row[key]:.2f}" for key in ACCURACY_KEYS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@reports_errors
def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")
    device, encoder, _, settings = device_and_models(parser, args)
    (train_images, train_labels), (test_images, test_labels), note = data_loader.evaluation_splits(
        settings.data, args.split, device, progress=not args.no_progress)
    if args.split == "validation":
        check_validation_unseen(settings, torch.cat([train_labels, test_labels]))
    if note:
        print(note)
    smallest = min(len(train_labels), len(test_labels))
    if args.batch_size > smallest:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {smallest} images of a split (accuracy "
                        f"is measured over whole batches); pass at most {smallest}")
    # The posteriors of every image, computed once; the classifiers then only sample from them.
    train = encode(encoder, train_images), train_labels
    test = encode(encoder, test_images), test_labels
    rows = []
    for evidence in ((False, True) if args.both else (args.accumulate_evidence,)):
        # The reference left BatchNorm in training mode, so each batch was normalised by its own statistics.
        accuracies, _ = classifier_protocol(train, test, sampled=args.latents == "sampled", evidence=evidence,
                                            eps_std=settings.eps_std, iterations=args.iterations,
                                            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                            batch_stats=args.batchnorm_batch_stats, progress=not args.no_progress)
        rows.append({"latents": args.latents, "eps_std": settings.eps_std, "style_dim": settings.style_dim,
                     "class_dim": settings.class_dim, "evidence": evidence, **accuracies})
    check_finite(rows, "the classifier accuracies")
    print(f"encoder {settings.encoder_path}, {settings.dataset}, split {args.split}, "
          f"{args.iterations} classifier steps, eps std {settings.eps_std:g}")
    print(markdown_table(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows if args.both else rows[0], indent=1) + "\n")
        print(f"Wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
