"""Every number of one trained run, each question asked the same way for every run, in one JSON file.

On the test split, with the run's own eps std:
- latent classifier, the reference's protocol (evaluation.classifier_protocol: its MLP, Adam lr 1e-4,
  train batches of 128, BatchNorm in eval mode), for the style and the class code, on sampled latents
  and on posterior means, each without and with evidence (test batches grouped by the true label, as
  the reference does); train and test accuracy. The sampled protocols are also measured the
  reference's way, BatchNorm normalising each batch by its own statistics;
- the class code fused over K images of the digit, no label-sorted batch (studies.group_size:
  logistic, kNN, and the MLP trained on posterior means above);
- swap score without and with evidence (studies.swap_score);
- the loss terms on the test split, per pixel as training.py logs them: reconstruction from the
  posterior means, and the training step's own loss (training.compute_losses, with the run's batches
  and objective flags): reconstruction from the sampled latent layer, style and class KL;
- the run's training arguments, the evaluation's settings, the command and its wall time.

    python -m studies.evaluate --checkpoint-dir checkpoints/mlvae_eps0.1 --json out/eval_mlvae_eps0.1.json
    python -m studies.evaluate --eps-std 0.1 --name reference_eps0.1 \\
        --encoder $MLVAE_REFERENCE_DIR/encoder_0.1_var_reparam \\
        --decoder $MLVAE_REFERENCE_DIR/decoder_0.1_var_reparam --json out/eval_reference_eps0.1.json

About 3 minutes per run on one idle CPU core (most of it the four classifier trainings of 20000 steps,
classifier.py's default; 5000 steps take 1 minute but leave the style code's posterior-means accuracy
about 6 points short). `python -m studies.aggregate` turns the files into the headline tables.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data_loader
import training
from evaluation import (Posteriors, classifier_protocol, default_judge_path, encode, latent_accuracies,
                        load_pixel_classifier)
from runs import (ModelSettings, add_model_arguments, check_writable, device_and_models, read_log, reports_errors,
                  script_parser, write_text_atomic)
from studies.group_size import GROUP_SIZES, accuracy_by_group_size
from studies.swap_score import swap_scores
from utils import accumulate_group_evidence, reconstruction_loss

ITERATIONS = 20000  # classifier steps, the same for every run (classifier.py's default; the reference: 100000)
PROTOCOLS = [(latents, evidence) for latents in ("sampled", "means") for evidence in ("no_evidence", "with_evidence")]


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    add = parser.add_argument
    add("--name", default=None, help="the run's name in the JSON (default: the run folder's name)")
    add("--iterations", type=int, default=ITERATIONS, help="training steps of each latent classifier")
    add("--batch-size", type=int, default=128, help="images per classifier batch")
    add("--lr", type=float, default=1e-4, help="Adam learning rate of the classifiers")
    add("--group-sizes", type=int, nargs="+", default=list(GROUP_SIZES), help="values of K for the fused class code")
    add("--pixel-classifier", default=None,
        help="CNN of the swap score (default: checkpoints/pixel_classifier_<dataset>.pt)")
    add("--num-styles", type=int, default=1000, help="style sources of the swap score")
    add("--evidence-size", type=int, default=25, help="images fused per class code in the swap score with evidence")
    add("--seed", type=int, default=0, help="seed of the classifiers, the batches, the noise and the draws")
    add("--json", default=None, help="write every number here")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_arguments(settings: ModelSettings) -> argparse.Namespace:
    """training.py's flags of the run: its args.json over training.py's defaults, with the model
    settings resolved for this evaluation (weights without args.json train nothing else)."""
    args = training.build_parser().parse_args([])
    vars(args).update(settings.trained)
    args.eps_std, args.likelihood = settings.eps_std, settings.likelihood
    return args


@torch.no_grad()
def loss_terms(encoder: torch.nn.Module, decoder: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               run: argparse.Namespace, generator: torch.Generator) -> dict[str, float | None]:
    """The loss terms on a split, per value of an image (784 on MNIST) as training.py logs them.

    posterior_means: reconstruction from the style mean and the image's own class mean, over the split.
    sampled: training.compute_losses, the training step's own loss with the run's objective flags, on
    the run's batches of the split (data_loader.Batches: random batches grouped by label, or
    group-balanced ones); style_kl and class_kl come from the same pass.
    means_with_evidence: the same batches, from the style mean and the group's fused class mean.
    The noise is drawn once for the whole pass, style rows then one class row per (batch, group)
    present, and handed to each batch; None where the split cannot fill one batch.
    """
    x = images.reshape(len(images), -1)
    style_mu, style_logvar, class_mu, class_logvar = encode(encoder, x)
    logits, pixel_logvar = decoder.logits(style_mu, class_mu)
    losses = {"posterior_means": reconstruction_loss(x, logits, pixel_logvar, run.likelihood).item() / x.numel(),
              "batch_size": run.batch_size}
    batches = data_loader.Batches(data_loader.ImageSplit(images, labels, [""] * (int(labels.max()) + 1)),
                                  run.batch_size, images.device, run.groups_per_batch, run.images_per_group,
                                  run.group_size)
    if batches.steps_per_epoch == 0:
        return {**losses, "sampled": None, "means_with_evidence": None, "style_kl": None, "class_kl": None}
    order = batches.epoch_order(generator)[: batches.steps_per_epoch * run.batch_size]
    steps = [batches.batch(order, step) for step in range(batches.steps_per_epoch)]
    style_eps = torch.randn(len(order), run.style_dim, generator=generator, device=x.device)
    present = torch.cat([step * batches.num_groups + groups for step, (_, groups) in enumerate(steps)]).unique()
    class_eps = torch.zeros(batches.steps_per_epoch * batches.num_groups, run.class_dim, device=x.device)
    class_eps[present] = torch.randn(len(present), run.class_dim, generator=generator, device=x.device)
    terms, fused = torch.zeros(3, device=x.device), 0.0
    for step, (batch_x, groups) in enumerate(steps):
        rows = slice(step * run.batch_size, (step + 1) * run.batch_size)
        noise = (style_eps[rows], class_eps[step * batches.num_groups:(step + 1) * batches.num_groups])
        terms += training.compute_losses(encoder, decoder, batch_x, groups, noise, run)
        group_mu, _ = accumulate_group_evidence(class_mu[order[rows]], class_logvar[order[rows]], groups)
        logits, pixel_logvar = decoder.logits(style_mu[order[rows]], group_mu)
        fused += reconstruction_loss(batch_x.reshape(len(batch_x), -1), logits, pixel_logvar, run.likelihood).item()
    sampled, style_kl, class_kl = (terms / len(steps)).tolist()
    return {**losses, "sampled": sampled, "means_with_evidence": fused / order.numel() / x.shape[1],
            "style_kl": style_kl, "class_kl": class_kl}


def latent_classifier_results(train: tuple[Posteriors, torch.Tensor], test: tuple[Posteriors, torch.Tensor],
                              args: argparse.Namespace, eps_std: float, bar: tqdm) -> tuple[dict, torch.nn.Module]:
    """The four protocols (sampled or means, without or with evidence), plus the sampled ones measured
    with BatchNorm on each batch's statistics. Returns (results, the class classifier on means)."""
    results = {"sampled": {}, "means": {}, "sampled_batchnorm_batch_stats": {}}
    for latents, evidence in PROTOCOLS:
        bar.set_description(f"classifiers, {latents}, {evidence.replace('_', ' ')}")
        protocol = dict(sampled=latents == "sampled", evidence=evidence == "with_evidence", eps_std=eps_std)
        results[latents][evidence], models = classifier_protocol(
            train, test, **protocol, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
            seed=args.seed, progress=not bar.disable)
        if latents == "sampled":
            # The reference's measurement: its classifiers were left in training mode.
            generator = torch.Generator(device=train[1].device).manual_seed(args.seed)
            measured = {split: latent_accuracies(models, *data, batch_size=args.batch_size, generator=generator,
                                                 batch_stats=True, **protocol)
                        for split, data in (("train", train), ("test", test))}
            results["sampled_batchnorm_batch_stats"][evidence] = {
                f"{code}_{split}": measured[split][i] for i, code in enumerate(("style", "class"))
                for split in ("train", "test")}
        if (latents, evidence) == ("means", "no_evidence"):
            class_on_means = models[1]
        bar.update()
    return results, class_on_means


def evaluate(args: argparse.Namespace, device: torch.device, encoder: torch.nn.Module, decoder: torch.nn.Module,
             settings: ModelSettings) -> dict:
    """Every number of the run (see the module docstring) as one JSON-ready dict."""
    (train_x, train_y), (test_x, test_y), note = data_loader.evaluation_splits(settings.data, "test", device)
    if note:
        print(note)
    pixel_classifier = load_pixel_classifier(args.pixel_classifier or default_judge_path(settings.data), device,
                                             tuple(settings.image_shape))
    # K-image fusion draws K distinct images of a group: folder data's small groups bound K.
    smallest = int(torch.bincount(test_y)[test_y.unique()].min())
    group_sizes = [k for k in args.group_sizes if k <= smallest]
    evidence_size = min(args.evidence_size, smallest)
    if group_sizes != args.group_sizes or evidence_size != args.evidence_size:
        print(f"note: the smallest held-out group has {smallest} images: K = {group_sizes}, swap evidence "
              f"{evidence_size} images")
    train, test = (encode(encoder, train_x), train_y), (encode(encoder, test_x), test_y)
    bar = tqdm(total=len(PROTOCOLS) + 3, unit="stage", disable=args.no_progress, dynamic_ncols=True)
    classifiers, mlp = latent_classifier_results(train, test, args, settings.eps_std, bar)

    bar.set_description("class code, K images fused")
    group_size = {"group_sizes": group_sizes, **accuracy_by_group_size(
        train[0][2], train_y, test[0][2], test[0][3], test_y, mlp, group_sizes,
        torch.Generator().manual_seed(args.seed))}
    bar.update()

    bar.set_description("swap score")
    swap = swap_scores(encoder, decoder, pixel_classifier, test_x, test_y, min(args.num_styles, len(test_y)),
                       evidence_size, torch.Generator().manual_seed(args.seed))
    bar.update()

    bar.set_description("test loss")
    losses = loss_terms(encoder, decoder, test_x, test_y, run_arguments(settings),
                         torch.Generator(device=device).manual_seed(args.seed))
    bar.update()
    bar.close()

    args_path = settings.encoder_path.parent / "args.json"
    training_args = json.loads(args_path.read_text()) if settings.encoder_path.name == "encoder.pt" \
        and args_path.is_file() else None
    log = read_log(settings.encoder_path.parent / "log.csv") if training_args else []
    return {
        "run": args.name or settings.name,
        "model": {**settings.weights(), "style_dim": settings.style_dim, "class_dim": settings.class_dim,
                  "eps_std": settings.eps_std, "likelihood": settings.likelihood, "dataset": settings.dataset,
                  **({"data": vars(settings.data), "image_shape": settings.image_shape}
                     if settings.dataset == data_loader.FOLDER else {})},
        "training_args": training_args,
        "epochs_trained": int(log[-1]["epoch"]) if log else None,
        "evaluation": {"split": "test", "classifier_iterations": args.iterations,
                       "classifier_batch_size": args.batch_size, "classifier_lr": args.lr, "seed": args.seed,
                       "group_sizes": group_sizes, "swap_num_styles": min(args.num_styles, len(test_y)),
                       "swap_evidence_size": evidence_size, "loss_batch_size": losses.pop("batch_size")},
        "latent_classifier": classifiers,
        "group_size": group_size,
        "swap_score": swap,
        "test_loss": losses,
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def summary(results: dict) -> str:
    """A few lines of the headline numbers, for the terminal."""
    lines = [f"{results['run']}: {results['evaluation']['classifier_iterations']} classifier steps, "
             f"{results['wall_time_s']:.0f} s ({results['cpu_time_s']:.0f} s of CPU)",
             "| latents | evidence | style train | style test | class train | class test |",
             "| --- | --- | --- | --- | --- | --- |"]
    for latents, evidence in PROTOCOLS:
        row = results["latent_classifier"][latents][evidence]
        lines.append(f"| {latents} | {evidence.replace('_', ' ')} | " + " | ".join(
            f"{row[key]:.2f}" for key in ("style_train", "style_test", "class_train", "class_test")) + " |")
    group = results["group_size"]
    lines.append("class code, K images fused (MLP): " + ", ".join(
        f"K={k} {accuracy:.2f}" for k, accuracy in zip(group["group_sizes"], group["mlp"])))
    for name in ("no_evidence", "with_evidence"):
        swap = results["swap_score"][name]
        lines.append(f"swap, {name.replace('_', ' ')}: content transfer {swap['content_transfer']:.2f}, "
                     f"style leak {swap['style_leak']:.2f}, ceiling {swap['reconstruction_ceiling']:.2f}")
    loss = results["test_loss"]
    lines.append(f"test reconstruction per pixel: posterior means {loss['posterior_means']:.5f}, with evidence "
                 f"{loss['means_with_evidence']:.5f}, sampled {loss['sampled']:.5f}")
    return "\n".join(lines)


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (BatchNorm needs two rows)")
    if min(args.group_sizes) < 1:
        parser.error("--group-sizes must be at least 1")
    if args.json:
        check_writable(args.json, "--json")
    device, encoder, decoder, settings = device_and_models(parser, args)
    try:
        results = evaluate(args, device, encoder, decoder, settings)
    except (data_loader.DatasetFileError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    results["command"] = shlex.join(["python", "-m", "studies.evaluate",
                                     *(sys.argv[1:] if argv is None else argv)])
    results["wall_time_s"] = round(time.perf_counter() - start, 1)
    results["cpu_time_s"] = round(time.process_time() - cpu_start, 1)  # all threads; below wall time when shared
    print(summary(results))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
        print(f"Wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
