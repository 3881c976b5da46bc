"""Evaluation helpers shared by the scripts: encoding a split, drawing images per label, and the one
latent-classifier recipe (the reference's MLP and its training schedule) that every table uses.

The reference's protocol trains one classifier on style latents and one on class latents for
`iterations` Adam steps (lr 1e-4) on shuffled train batches of 128, drawing fresh latents every epoch,
and reports accuracy over whole batches of a split. Latents are either samples of the posteriors (the
reference) or the posterior means; with evidence, the class posteriors of each (batch, digit) group
are accumulated first (batches grouped by the true label, as the reference does).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_loader
from networks import Classifier, PixelClassifier, init_reference_
from runs import repository_path
from utils import accumulate_group_evidence, group_index, group_wise_reparameterize, reparameterize, training_groups

Posteriors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor, chunk: int = 2048) -> Posteriors:
    """Run the encoder once over a whole split in chunks: (style_mu, style_logvar, class_mu, class_logvar)."""
    parts = [encoder(batch) for batch in images.split(chunk)]
    return tuple(torch.cat(column) for column in zip(*parts))


def sample_per_label(labels: torch.Tensor, classes: list[int], count: int, trials: int = 1,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """[trials, len(classes), count] indices of `count` distinct images of each class per trial.

    Trials are independent draws; without a generator every trial holds the first `count` images of
    each class (the same on every machine). Raises ValueError when a class has too few images.
    """
    draws = []
    for label in classes:
        index = (labels == label).nonzero().squeeze(1).cpu()
        if count > len(index):
            raise ValueError(f"{count} images of label {label} asked for, but only {len(index)} exist")
        if generator is None:
            picks = torch.arange(count).expand(trials, count)
        else:
            scores = torch.rand(trials, len(index), generator=generator, device=generator.device)
            picks = scores.argsort(dim=1)[:, :count].cpu()
        draws.append(index[picks])
    return torch.stack(draws, dim=1).to(labels.device)


def draw_evidence_sets(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[N, k] indices: column 0 is each query itself, the rest k-1 distinct other images of its label."""
    members = torch.empty(len(labels), k, dtype=torch.long)
    for label in labels.unique():
        index = (labels == label).nonzero().squeeze(1).cpu()
        n = len(index)
        if k > n:
            raise ValueError(f"K={k} exceeds the {n} images of label {int(label)}")
        scores = torch.rand(n, n, generator=generator)
        scores.fill_diagonal_(2.0)  # the query itself sorts last, so it is never drawn as "other"
        others = scores.argsort(dim=1)[:, : k - 1]
        members[index] = index[torch.cat([torch.arange(n).unsqueeze(1), others], dim=1)]
    return members.to(labels.device)


def classifier_latents(posteriors: Posteriors, labels: torch.Tensor, order: torch.Tensor, batch_size: int,
                       evidence: bool, eps_std: float, sampled: bool,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Style and class latents for the rows `order`, read as consecutive batches of `batch_size`.

    Without evidence each class latent comes from the image's own posterior; with evidence from the
    posterior accumulated over its (batch, digit) group, sampled with one shared noise vector of std
    `eps_std` (the grouped reparameterization in training mode). `sampled=False` gives the means.
    """
    style_mu, style_logvar, class_mu, class_logvar = (t[order] for t in posteriors)
    if evidence:
        groups = training_groups(labels[order], batch_size=batch_size)
        index = group_index(groups)
        class_mu, class_logvar = accumulate_group_evidence(class_mu, class_logvar, groups, index)
    if not sampled:
        return style_mu, class_mu
    style = reparameterize(style_mu, style_logvar, generator=generator)
    if evidence:
        return style, group_wise_reparameterize(class_mu, class_logvar, groups, eps_std, generator=generator,
                                                index=index)
    return style, reparameterize(class_mu, class_logvar, generator=generator)


def batch_order(num_rows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation cut to whole batches, as a shuffled DataLoader with drop_last gives."""
    return torch.cat(data_loader.epoch_batches(num_rows, batch_size, generator))


def train_latent_classifiers(posteriors: Posteriors, labels: torch.Tensor, *, iterations: int, batch_size: int,
                             lr: float, evidence: bool, eps_std: float, sampled: bool,
                             generator: torch.Generator, progress: bool = True) -> tuple[Classifier, Classifier]:
    """The style and the class classifier (the reference's MLP and initialisation), trained for
    `iterations` Adam steps on shuffled batches, with fresh latents every epoch."""
    num_classes = int(labels.max()) + 1
    style_dim, class_dim = posteriors[0].shape[1], posteriors[2].shape[1]
    device = labels.device
    models = Classifier(style_dim, num_classes).to(device), Classifier(class_dim, num_classes).to(device)
    for model in models:
        init_reference_(model)
    # One Adam over both parameter sets equals one Adam each: its update is per parameter.
    optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=lr, fused=True)
    steps_per_epoch = len(labels) // batch_size
    kind = "sampled" if sampled else "means"
    bar = tqdm(range(iterations), desc=f"classifiers ({kind}, {'with' if evidence else 'no'} evidence)",
               unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        if step % steps_per_epoch == 0:
            order = batch_order(len(labels), batch_size, generator)
            latents = classifier_latents(posteriors, labels, order, batch_size, evidence, eps_std, sampled,
                                         generator)
            batches = zip(*(t.split(batch_size) for t in (*latents, labels[order])))
        style_batch, class_batch, label_batch = next(batches)
        losses = [F.cross_entropy(model(z), label_batch) for model, z in zip(models, (style_batch, class_batch))]
        optimizer.zero_grad(set_to_none=True)
        sum(losses).backward()
        optimizer.step()
        if step % 500 == 0:
            bar.set_postfix(style_loss=f"{losses[0].item():.3f}", class_loss=f"{losses[1].item():.3f}")
    return models[0].eval(), models[1].eval()


@torch.no_grad()
def predict(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 1000,
            batch_stats: bool = False) -> torch.Tensor:
    """Predicted labels [N] in eval mode; `batch_stats` normalises BatchNorm by each batch's own
    statistics instead, as the reference's classifiers (left in training mode) did."""
    was_training = model.training
    model.train(batch_stats)
    predicted = torch.cat([model(chunk).argmax(1) for chunk in inputs.split(batch_size)])
    model.train(was_training)
    return predicted


def latent_accuracies(models: tuple[Classifier, Classifier], posteriors: Posteriors, labels: torch.Tensor, *,
                      batch_size: int, evidence: bool, eps_std: float, sampled: bool, generator: torch.Generator,
                      batch_stats: bool = False) -> tuple[float, float]:
    """Style and class accuracy in percent over one pass of whole batches of a split.

    The batches have equal sizes, so the mean over all rows equals the reference's mean of per-batch
    accuracies.
    """
    order = batch_order(len(labels), batch_size, generator)
    latents = classifier_latents(posteriors, labels, order, batch_size, evidence, eps_std, sampled, generator)
    return tuple(100.0 * (predict(model, z, batch_size, batch_stats) == labels[order]).float().mean().item()
                 for model, z in zip(models, latents))


def classifier_protocol(train: tuple[Posteriors, torch.Tensor], test: tuple[Posteriors, torch.Tensor], *,
                        sampled: bool, evidence: bool, eps_std: float, iterations: int, batch_size: int = 128,
                        lr: float = 1e-4, seed: int = 0, batch_stats: bool = False, progress: bool = True
                        ) -> tuple[dict[str, float], tuple[Classifier, Classifier]]:
    """The whole latent-classifier protocol on (posteriors, labels) of a train and a test split: train
    the style and class classifiers on the train split, then measure both on both splits.

    Returns ({"style_train", "style_test", "class_train", "class_test"} in percent, the two models).
    `seed` seeds the classifiers' initialisation (the global RNG) and the batches and noise.
    """
    torch.manual_seed(seed)
    generator = torch.Generator(device=train[1].device).manual_seed(seed)
    protocol = dict(batch_size=batch_size, evidence=evidence, eps_std=eps_std, sampled=sampled, generator=generator)
    models = train_latent_classifiers(*train, iterations=iterations, lr=lr, progress=progress, **protocol)
    style_train, class_train = latent_accuracies(models, *train, batch_stats=batch_stats, **protocol)
    style_test, class_test = latent_accuracies(models, *test, batch_stats=batch_stats, **protocol)
    return ({"style_train": style_train, "style_test": style_test, "class_train": class_train,
             "class_test": class_test}, models)


def default_judge_path(spec: data_loader.DataSpec) -> str:
    """Where the pixel classifier of a data set lives unless --out / --pixel-classifier say otherwise, in
    the repository wherever a script runs from."""
    if spec.dataset == data_loader.FOLDER:
        return repository_path(f"out/pixel_classifier_folder_{Path(spec.data_dir).expanduser().resolve().name}.pt")
    return repository_path(f"checkpoints/pixel_classifier_{spec.dataset}.pt")


def load_pixel_classifier(path: str | Path, device: torch.device, shape: tuple[int, int, int] = (1, 28, 28)
                          ) -> PixelClassifier:
    """The pixel-space CNN of pixel_classifier.py for images of `shape`, its label count read off the
    weights; FileNotFoundError names the command that trains one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pixel classifier at {path}; train one with "
                                "`python -m studies.pixel_classifier`")
    state = torch.load(path, weights_only=True, map_location=device)
    model = PixelClassifier(len(state["head.5.bias"]), shape).to(device)
    model.load_state_dict(state)
    return model.eval()
