"""What each code holds, for a model trained on the identities data set (`python -m studies.identities`):
probes for every style factor and the digit, identity retrieval among the unseen test identities, the
same with K renderings fused by evidence accumulation, and a DCI-style importance matrix.

    python -m studies.factors --checkpoint-dir checkpoints/identities_mlvae --json out/factors_identities_mlvae.json

Every probe is fitted on the train identities' codes and scored on the test identities' codes (identities
never seen in training). Codes are the posterior means or one sample of each posterior (the image's own
posterior, noise std 1). The probes are independent MLPs (networks.ProbeBank), one per target:
- R^2 for rotation, scale and the two translations; for the two hues (angles) the probe predicts cos and
  sin, and R^2 pools both: 1 - (SSE_cos + SSE_sin) / (SST_cos + SST_sin).
- accuracy for the digit.
Identity is measured by retrieval: from a query's code, do the nearest (Euclidean) of all other test
renderings' codes include a rendering of the same identity (top-1, top-5)? With fusion the query is the
class posterior accumulated over K renderings of one identity (those K leave the gallery; sampled with the
run's --eps-std, as training samples a group), and the digit probe is fitted and scored on fused codes.
The importance matrix: probes on the joint code (style and class means side by side); the importance of
a code dimension for a factor is how much the factor's test score (R^2, or digit accuracy as a fraction)
drops when that dimension is shuffled across the test rows (permutation importance), floored at 0. From it,
the share of each factor's importance that lies in the style and in the class code, and DCI's
disentanglement and completeness (Eastwood and Williams, ICLR 2018).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from evaluation import draw_evidence_sets, encode
from networks import ProbeBank
from runs import (POSITIVE_INT, UserError, add_model_arguments, check_finite, check_writable, device_and_models,
                  reports_errors, script_parser, write_text_atomic)
from studies.identities import FACTORS, identities_root, read_factors
from utils import fused_posteriors, reparameterize

CIRCULAR = ("stroke_hue_deg", "background_hue_deg")  # angles: probed as cos and sin
CODES = ("style", "class")
PROTOCOLS = ("means", "sampled")
TOP = (1, 5)


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add_model_arguments(parser)
    parser.set_defaults(checkpoint_dir=None)
    parser.add_argument("--fusion", type=POSITIVE_INT, nargs="+", default=[2, 4],
                        help="K renderings fused for the fusion rows (K = 1, no fusion, is always measured)")
    parser.add_argument("--iterations", type=POSITIVE_INT, default=4000, help="Adam steps of each probe set")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=256, help="probe training batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes, the samples and the fused sets")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def regression_targets(factors: dict[str, np.ndarray]) -> tuple[torch.Tensor, list[str]]:
    """[N, T] float targets (each circular factor as cos and sin columns) and the factor of each column."""
    columns, owners = [], []
    for name in FACTORS:
        if name in CIRCULAR:
            angle = np.deg2rad(factors[name])
            columns += [np.cos(angle), np.sin(angle)]
            owners += [name, name]
        else:
            columns.append(factors[name])
            owners.append(name)
    return torch.tensor(np.stack(columns, axis=1), dtype=torch.float32), owners


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor centred and scaled column by column by the train tensor's mean and std."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return [(t - mean) / std for t in (train, *others)]


def fit_probes(z: torch.Tensor, targets: torch.Tensor | None, digits: torch.Tensor | None, *, iterations: int,
               batch_size: int, generator: torch.Generator, progress: bool, desc: str
               ) -> tuple[ProbeBank | None, ProbeBank | None]:
    """Regression probes (one per column of standardised `targets`, squared error) and a digit probe
    (cross-entropy) on codes `z` [N, D], trained together by one Adam, whose update is per parameter, so
    that each probe trains as it would alone."""
    torch.manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator)))
    regress = None if targets is None else ProbeBank(targets.shape[1], z.shape[1], 1).to(z.device)
    classify = None if digits is None else ProbeBank(1, z.shape[1], 10).to(z.device)
    banks = [bank for bank in (regress, classify) if bank is not None]
    optimizer = torch.optim.Adam([p for bank in banks for p in bank.parameters()], lr=1e-3)
    for _ in tqdm(range(iterations), desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True):
        rows = torch.randint(len(z), (batch_size,), generator=generator, device=generator.device).to(z.device)
        batch, loss = z[rows], 0.0
        if regress is not None:
            loss = loss + (regress(batch).squeeze(2) - targets[rows].T).pow(2).mean(1).sum()
        if classify is not None:
            loss = loss + F.cross_entropy(classify(batch)[0], digits[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return regress, classify


@torch.no_grad()
def factor_scores(regress: ProbeBank | None, classify: ProbeBank | None, z: torch.Tensor, targets: torch.Tensor,
                  owners: list[str], digits: torch.Tensor) -> dict[str, float]:
    """Test scores: R^2 of each factor (angles pooled over cos and sin) and digit accuracy (a fraction)."""
    predicted = None if regress is None else torch.cat([regress(chunk).squeeze(2).T for chunk in z.split(8192)])
    guessed = None if classify is None else torch.cat([classify(chunk)[0].argmax(1) for chunk in z.split(8192)])
    return prediction_scores(predicted, targets, owners, guessed, digits)


def prediction_scores(predicted: torch.Tensor | None, targets: torch.Tensor, owners: list[str],
                      guessed: torch.Tensor | None, digits: torch.Tensor) -> dict[str, float]:
    """R^2 of each factor from `predicted` [N, T] against `targets` (a factor's columns, as `owners` names
    them, pooled) and the accuracy of the digits `guessed` [N]; either may be None."""
    scores = {}
    if predicted is not None:
        sse = (predicted - targets).pow(2).sum(0)
        sst = (targets - targets.mean(0)).pow(2).sum(0)
        for name in dict.fromkeys(owners):
            columns = [i for i, owner in enumerate(owners) if owner == name]
            scores[name] = 1.0 - (sse[columns].sum() / sst[columns].sum()).item()
    if guessed is not None:
        scores["digit"] = (guessed == digits).float().mean().item()
    return scores


def sample(mu: torch.Tensor, logvar: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """One draw of each posterior with noise of std `std` (the generator may live on another device)."""
    eps = torch.randn(mu.shape, generator=generator, device=generator.device).to(mu.device)
    return reparameterize(mu, logvar, eps=std * eps)


def disjoint_sets(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] row indices: each group's rows, in row order, cut into as many disjoint sets of k as fit."""
    order = torch.argsort(labels, stable=True)
    rank = torch.arange(len(labels), device=labels.device) - torch.searchsorted(labels[order], labels[order])
    counts = torch.bincount(labels)[labels[order]]
    keep = rank < counts - counts % k
    return order[keep].view(-1, k)


@torch.no_grad()
def retrieval(queries: torch.Tensor, members: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor
              ) -> dict[str, float]:
    """Top-k identity retrieval: for each query [Q, D] built from the gallery rows `members` [Q, K], is a
    rendering of its identity among the k nearest of the other gallery rows [N, D]?"""
    hits = {k: 0 for k in TOP}
    own = labels[members[:, 0]]
    for start in range(0, len(queries), 1024):
        rows = slice(start, start + 1024)
        distance = torch.cdist(queries[rows], gallery)
        distance.scatter_(1, members[rows], math.inf)  # the query's own renderings are not retrieved
        nearest = labels[distance.topk(max(TOP), dim=1, largest=False).indices]
        for k in TOP:
            hits[k] += (nearest[:, :k] == own[rows].unsqueeze(1)).any(1).sum().item()
    return {f"top{k}": hits[k] / len(queries) for k in TOP}


def permutation_importance(regress: ProbeBank, classify: ProbeBank, z: torch.Tensor, targets: torch.Tensor,
                           owners: list[str], digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[D, F] drop of each factor's test score (FACTORS, then digit) when one code dimension is shuffled."""
    base = factor_scores(regress, classify, z, targets, owners, digits)
    rows = []
    for dim in range(z.shape[1]):
        shuffled = z.clone()
        shuffled[:, dim] = z[torch.randperm(len(z), generator=generator, device=generator.device).to(z.device), dim]
        scores = factor_scores(regress, classify, shuffled, targets, owners, digits)
        rows.append([max(0.0, base[name] - scores[name]) for name in base])
    return torch.tensor(rows, dtype=torch.float64)


def dci(importance: torch.Tensor) -> tuple[float, float]:
    """DCI disentanglement (each dimension's importance concentrated on few factors, weighted by its share)
    and completeness (each factor's importance concentrated on few dimensions), both in [0, 1]."""
    def concentration(p: torch.Tensor, base: int) -> torch.Tensor:  # 1 - entropy of each row, log base `base`
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        return 1.0 + (p * torch.log(p.clamp_min(1e-12))).sum(1) / math.log(base)

    dims, factors = importance.shape
    weight = importance.sum(1) / importance.sum().clamp_min(1e-12)
    disentanglement = (concentration(importance, factors) * weight).sum().item()
    completeness = concentration(importance.T, dims).mean().item()
    return disentanglement, completeness


def split_with_factors(spec: data_loader.DataSpec, root: Path, split: str, device: torch.device, progress: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """(float images, identity labels, factor columns) of one split, rows aligned; UserError if factors.csv
    does not describe the images loaded."""
    images, labels, names = data_loader.labelled_images(spec, split, device, progress)
    factors = read_factors(root, split)
    loaded = np.array(names)[labels.cpu().numpy()]
    if len(loaded) != len(factors["identity"]) or (loaded != factors["identity"]).any():
        raise UserError(f"{root}/factors.csv does not list the {split} images in the order they load; "
                        f"write the data set again with `python -m studies.identities --out {root} --overwrite`")
    return images, labels, factors


def factor_splits(spec: data_loader.DataSpec, root: Path, device: torch.device, progress: bool
                  ) -> tuple[dict, dict[str, torch.Tensor], list[str], dict[str, torch.Tensor]]:
    """The train and test splits (split_with_factors), their regression targets standardised by the train
    split's statistics, the factor of each target column, and the digits; tensors on `device`."""
    splits = {split: split_with_factors(spec, root, split, device, progress) for split in ("train", "test")}
    targets, owners = {}, None
    for split, (_, _, factors) in splits.items():
        targets[split], owners = regression_targets(factors)
    targets["train"], targets["test"] = (t.to(device) for t in standardise(targets["train"], targets["test"]))
    digits = {split: torch.tensor(factors["digit"], device=device) for split, (_, _, factors) in splits.items()}
    return splits, targets, owners, digits


def codes(posteriors, protocol: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    style_mu, style_logvar, class_mu, class_logvar = posteriors
    if protocol == "means":
        return {"style": style_mu, "class": class_mu}
    return {"style": sample(style_mu, style_logvar, 1.0, generator),
            "class": sample(class_mu, class_logvar, 1.0, generator)}


def evaluate(args: argparse.Namespace, device: torch.device, encoder: torch.nn.Module, settings) -> dict:
    root = identities_root(settings.data, f"the data of {settings.encoder_path.parent}", "studies.factors")
    progress = not args.no_progress
    splits, targets, owners, digits = factor_splits(settings.data, root, device, progress)
    posteriors = {split: encode(encoder, images) for split, (images, _, _) in splits.items()}
    test_labels = splits["test"][1]
    generator = torch.Generator().manual_seed(args.seed)
    fit = dict(iterations=args.iterations, batch_size=args.batch_size, generator=generator, progress=progress)
    results = {"probes": {}, "retrieval": {}, "fusion": {}}
    for protocol in PROTOCOLS:
        train_codes, test_codes = codes(posteriors["train"], protocol, generator), codes(posteriors["test"], protocol,
                                                                                         generator)
        for code in CODES:
            z_train, z_test = standardise(train_codes[code], test_codes[code])
            probes = fit_probes(z_train, targets["train"], digits["train"], desc=f"{code} {protocol}", **fit)
            results["probes"].setdefault(code, {})[protocol] = factor_scores(*probes, z_test, targets["test"], owners,
                                                                             digits["test"])
            singles = torch.arange(len(test_labels), device=device).unsqueeze(1)
            results["retrieval"].setdefault(code, {}).setdefault(protocol, {})["1"] = retrieval(
                test_codes[code], singles, test_codes[code], test_labels)
        for k in args.fusion:
            results["fusion"].setdefault(protocol, {})[str(k)] = fusion_scores(
                posteriors, splits, digits, test_codes["class"], k, protocol, settings.eps_std, fit)
    joint_train, joint_test = standardise(*(torch.cat([posteriors[split][0], posteriors[split][2]], 1)
                                            for split in ("train", "test")))
    probes = fit_probes(joint_train, targets["train"], digits["train"], desc="joint means", **fit)
    importance = permutation_importance(*probes, joint_test, targets["test"], owners, digits["test"], generator)
    results["importance"] = importance_summary(importance, settings.style_dim)
    return results


def fusion_scores(posteriors: dict, splits: dict, digits: dict, gallery: torch.Tensor, k: int, protocol: str,
                  eps_std: float, fit: dict) -> dict:
    """Digit accuracy of a probe fitted and scored on class codes fused over k renderings, and identity
    retrieval from fused queries (disjoint sets of k renderings of each test identity)."""
    generator = fit["generator"]
    fused = {}
    for split, (_, labels, _) in splits.items():
        members = draw_evidence_sets(labels.cpu(), k, generator).to(labels.device)
        mu, logvar = fused_posteriors(posteriors[split][2], posteriors[split][3], members)
        fused[split] = mu if protocol == "means" else sample(mu, logvar, eps_std, generator)
    z_train, z_test = standardise(fused["train"], fused["test"])
    _, classify = fit_probes(z_train, None, digits["train"], desc=f"class {protocol}, fused over {k}", **fit)
    scores = {"digit": factor_scores(None, classify, z_test, None, [], digits["test"])["digit"]}
    labels = splits["test"][1]
    sets = disjoint_sets(labels, k)
    mu, logvar = fused_posteriors(posteriors["test"][2], posteriors["test"][3], sets)
    queries = mu if protocol == "means" else sample(mu, logvar, eps_std, generator)
    scores.update(retrieval(queries, sets, gallery, labels))
    return scores


def importance_summary(importance: torch.Tensor, style_dim: int) -> dict:
    factors = [*FACTORS, "digit"]
    total = importance.sum(0).clamp_min(1e-12)
    disentanglement, completeness = dci(importance)
    return {"factors": factors, "matrix": importance.tolist(),
            "dims": [f"style{i}" for i in range(style_dim)]
            + [f"class{i}" for i in range(len(importance) - style_dim)],
            "style_share": dict(zip(factors, (importance[:style_dim].sum(0) / total).tolist())),
            "disentanglement": disentanglement, "completeness": completeness}


def summary(results: dict) -> str:
    """Markdown tables of one run: R^2 per factor and digit accuracy per code and protocol, then retrieval."""
    factors = [*FACTORS, "digit"]
    lines = ["| code | latents | " + " | ".join(factors) + " | identity top-1 | identity top-5 |",
             "| --- | --- |" + " --- |" * (len(factors) + 2)]
    for code in CODES:
        for protocol in PROTOCOLS:
            scores, found = results["probes"][code][protocol], results["retrieval"][code][protocol]["1"]
            cells = [f"{100 * scores[name]:.1f}" if name == "digit" else f"{scores[name]:.3f}" for name in factors]
            lines.append(f"| {code} | {protocol} | " + " | ".join(cells)
                         + f" | {100 * found['top1']:.1f} | {100 * found['top5']:.1f} |")
    lines += ["", "| class code fused over K | latents | digit | identity top-1 | identity top-5 |",
              "| --- | --- | --- | --- | --- |"]
    for protocol, by_k in results["fusion"].items():
        for k, scores in by_k.items():
            lines.append(f"| {k} | {protocol} | {100 * scores['digit']:.1f} | {100 * scores['top1']:.1f} | "
                         f"{100 * scores['top5']:.1f} |")
    share = results["importance"]["style_share"]
    lines += ["", "| importance in the style code | " + " | ".join(share) + " | disentanglement | completeness |",
              "| --- |" + " --- |" * (len(share) + 2),
              "| share | " + " | ".join(f"{value:.2f}" for value in share.values())
              + f" | {results['importance']['disentanglement']:.2f} | {results['importance']['completeness']:.2f} |"]
    return "\n".join(lines)


@reports_errors
def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint_dir is None and args.encoder is None:
        parser.error("--checkpoint-dir: name the run folder of a model trained on the identities data set")
    if args.json:
        check_writable(args.json, "--json")
    device, encoder, _, settings = device_and_models(parser, args)
    results = {"run": settings.name, "command": "python -m studies.factors " + " ".join(sys.argv[1:] if argv is None
                                                                                         else argv),
               "seed": args.seed, "iterations": args.iterations, "batch_size": args.batch_size,
               "eps_std": settings.eps_std, "model": settings.weights(), **evaluate(args, device, encoder, settings)}
    check_finite(results, "the scores")
    print(summary(results))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
