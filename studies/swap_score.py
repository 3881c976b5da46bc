"""Swap score: does a generation follow its class source and ignore its style source?

For `--num-styles` test images (style sources) and each of the ten labels, a class source is drawn at
random among the test images of that label; the decoder renders the style source's style with the
class source's code (posterior means), and a pixel-space CNN (studies/pixel_classifier.py) labels the result.

- content transfer: share of generations labelled as their class source's label (chance: 10%);
- style leak: share labelled as their style source's label, over pairs whose labels differ;
- ceiling: the CNN's accuracy on plain reconstructions (style and class code of the same image).

"with evidence" replaces a class source's code by the posterior fused over it and `--evidence-size`-1
other test images of its label.

On folder data the labels are the groups, the judge is trained on them (`python -m
studies.pixel_classifier --dataset folder ...`), and the class sources come from `--max-groups` random
groups; where the test groups are not training groups, the sources are the second half of each test
group's images, the half the judge did not learn from.

    python -m studies.swap_score --json out/swap_score_mlvae_eps0.1.json
"""
from __future__ import annotations

import argparse
import json

import torch

import data_loader
from evaluation import default_judge_path, draw_evidence_sets, encode, load_pixel_classifier, predict, sample_per_label
from runs import (POSITIVE_INT, UserError, add_model_arguments, check_finite, check_label_counts, check_writable,
                  device_and_models, reports_errors, script_parser, write_text_atomic)
from utils import fused_means


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--pixel-classifier", default=None,
                        help="CNN weights (default: checkpoints/pixel_classifier_<dataset>.pt)")
    parser.add_argument("--num-styles", type=POSITIVE_INT, default=1000, help="test images used as style sources")
    parser.add_argument("--evidence-size", type=POSITIVE_INT, default=25,
                        help="images fused per class code with evidence (a batch of 256 holds ~25 per digit)")
    parser.add_argument("--max-groups", type=POSITIVE_INT, default=10,
                        help="class sources come from at most this many random groups (MNIST: all ten)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the source draws")
    parser.add_argument("--json", default=None, help="write the scores here")
    return parser


@torch.no_grad()
def swap_scores(encoder: torch.nn.Module, decoder: torch.nn.Module, classifier: torch.nn.Module,
                images: torch.Tensor, labels: torch.Tensor, num_styles: int, evidence_size: int,
                generator: torch.Generator, max_groups: int = 10) -> dict:
    """Content transfer, style leak and reconstruction ceiling (percent), without and with evidence;
    the class sources come from at most `max_groups` random labels."""
    style_mu, _, class_mu, class_logvar = encode(encoder, images)
    classes = labels.unique()
    if len(classes) > max_groups:
        picked = torch.randperm(len(classes), generator=generator)[:max_groups].sort().values
        classes = classes[picked.to(classes.device)]
    styles = torch.randperm(len(images), generator=generator)[:num_styles].to(images.device)
    # For every (style source, label): a random test image of that label as the class source.
    sources = sample_per_label(labels, classes.tolist(), 1, len(styles), generator).squeeze(2)  # [S, C]
    codes = {"no_evidence": class_mu,
             "with_evidence": fused_means(class_mu, class_logvar,
                                          draw_evidence_sets(labels, evidence_size, generator))}
    style_labels = labels[styles].unsqueeze(1)
    differ = style_labels != classes.unsqueeze(0)
    results = {}
    for name, code in codes.items():
        generated = decoder(style_mu[styles].repeat_interleave(len(classes), 0), code[sources.reshape(-1)])
        predicted = predict(classifier, generated).view(len(styles), len(classes))
        reconstructed = predict(classifier, decoder(style_mu[styles], code[styles]))
        results[name] = {
            "content_transfer": 100.0 * (predicted == classes.unsqueeze(0)).float().mean().item(),
            "style_leak": 100.0 * (predicted == style_labels)[differ].float().mean().item(),
            "reconstruction_ceiling": 100.0 * (reconstructed == labels[styles]).float().mean().item(),
        }
    results["classifier_on_real_images"] = 100.0 * (predict(classifier, images[styles]) == labels[styles]).float().mean().item()
    return results


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")
    device, encoder, decoder, settings = device_and_models(parser, args)
    path = args.pixel_classifier or default_judge_path(settings.data)
    try:
        classifier = load_pixel_classifier(path, device, tuple(settings.image_shape))
    except FileNotFoundError as error:
        parser.error(str(error))
    except Exception as error:  # pickle, zip and torch errors, or other shapes: all mean the same here
        raise UserError(f"--pixel-classifier {path} cannot be read as the pixel classifier's weights "
                        f"({type(error).__name__}); retrain it with `python -m studies.pixel_classifier`") from error
    if settings.dataset == data_loader.FOLDER:  # the held-out half the judge did not learn from, if unseen
        _, (images, labels), note = data_loader.evaluation_splits(settings.data, "test", device)
        if note:
            print(note)
    else:
        images, labels, _ = data_loader.labelled_images(settings.data, "test", device)
    if args.num_styles > len(labels):
        raise UserError(f"--num-styles {args.num_styles} exceeds the {len(labels)} {settings.dataset} test images; "
                        f"pass at most {len(labels)}")
    check_label_counts(labels, sorted(set(labels.tolist())), args.evidence_size, f"{settings.dataset} test",
                       "--evidence-size")
    results = swap_scores(encoder, decoder, classifier, images, labels, args.num_styles, args.evidence_size,
                          torch.Generator().manual_seed(args.seed), args.max_groups)
    check_finite(results, "the swap scores")
    print(f"encoder {settings.encoder_path}; pixel classifier on the real style images: "
          f"{results['classifier_on_real_images']:.2f}%")
    print("| class code | content transfer | style leak | reconstruction ceiling |")
    print("| --- | --- | --- | --- |")
    for name in ("no_evidence", "with_evidence"):
        r = results[name]
        print(f"| {name.replace('_', ' ')} | {r['content_transfer']:.2f} | {r['style_leak']:.2f} | "
              f"{r['reconstruction_ceiling']:.2f} |")
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
