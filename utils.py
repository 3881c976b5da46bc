"""The ML-VAE math as pure tensor functions (Bouchacourt, Tomioka, Nowozin, AAAI-18, arXiv 1705.08841).

Group evidence accumulation, the grouped and per-sample reparameterizations, the KL to N(0, I) and the
reconstruction losses. Nothing here owns state: devices and random generators are passed in.
Also the loading of a trained model shared by the evaluation scripts (`add_model_arguments`,
`load_models`) and the one-pass encoding of a split (`encode`).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from data_loader import DATASETS, EVALUATION_SPLITS, VALIDATION_START
from networks import LIKELIHOODS, Decoder, Encoder

LOG_2PI = math.log(2.0 * math.pi)


def group_index(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary integer group ids [B] to (compact ids in [0, G) [B], group sizes [G]).

    The grouped functions below take its result as `index=`, so a training step runs torch.unique once.
    """
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    return inverse, counts


def training_groups(labels: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Group ids [B] of a training batch: one group per label (the paper), or with `group_size`, each
    label's images split in batch order into groups of at most `group_size`."""
    if group_size is None:
        return labels
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    return labels * len(labels) + rank // group_size


def _group_precisions(log_precision: torch.Tensor, inverse: torch.Tensor, num_groups: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift [G, D], weight [B, D], precision [G, D]) with weight_i = exp(log_precision_i - shift_g(i))
    and precision_g = sum of its members' weights, where shift_g is the group's largest log-precision.

    Relative to the largest, the precisions stay finite for any log-variance; the shift is exact and
    carries no gradient, so precision_g exp(shift_g) is the group's true precision.
    """
    rows = inverse.unsqueeze(1).expand_as(log_precision)
    shift = torch.full((num_groups, log_precision.shape[1]), -math.inf, dtype=log_precision.dtype,
                       device=log_precision.device)
    shift = shift.scatter_reduce(0, rows, log_precision.detach(), reduce="amax", include_self=True)
    # index_select rather than [inverse]: the same rows, and its backward is an index_add, not an index_put.
    weight = torch.exp(log_precision - shift.index_select(0, inverse))
    return shift, weight, torch.zeros_like(shift).index_add(0, inverse, weight)


def accumulate_group_evidence(class_mu: torch.Tensor, class_logvar: torch.Tensor, groups: torch.Tensor,
                              index: tuple[torch.Tensor, torch.Tensor] | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse the class posteriors of each group into one Gaussian (a product of Gaussians, paper eq. 7).

    For a group g with members i: precision_g = sum_i exp(-logvar_i) and
    mu_g = sum_i mu_i exp(-logvar_i) / precision_g. Returns per-sample rows [B, D] holding the posterior
    (mean, log-variance) of each sample's group.

    The precisions are computed relative to the largest one in each group (a log-sum-exp), so the
    result stays finite for any log-variance.
    """
    inverse, counts = group_index(groups) if index is None else index
    shift, weight, precision = _group_precisions(-class_logvar, inverse, counts.numel())
    weighted_mu = torch.zeros_like(shift).index_add(0, inverse, weight * class_mu)
    group_mu = weighted_mu / precision
    group_logvar = -(torch.log(precision) + shift)
    return group_mu.index_select(0, inverse), group_logvar.index_select(0, inverse)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, training: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + std * eps with one eps ~ N(0, I) per sample (Kingma & Welling 2014); `mu` in eval."""
    if not training:
        return mu
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps * torch.exp(0.5 * logvar)


def group_wise_reparameterize(mu: torch.Tensor, logvar: torch.Tensor, groups: torch.Tensor,
                              eps_std: float, training: bool = True,
                              generator: torch.Generator | None = None,
                              index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """z_i = mu_i + std_i * eps_g(i) with one eps_g ~ N(0, eps_std^2 I) per group, shared by its members.

    eps_std = 1 is the textbook sample; the reference found the decoder ignores the class code unless
    eps_std is small (0.1). Returns `mu` when not training.
    """
    if not training:
        return mu
    inverse, counts = group_index(groups) if index is None else index
    eps = torch.randn((counts.numel(), mu.shape[1]), generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + eps_std * eps.index_select(0, inverse) * torch.exp(0.5 * logvar)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row [B] (Kingma & Welling 2014, appendix B):
    -1/2 * sum_d (1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def class_kl_divergence(group_mu: torch.Tensor, group_logvar: torch.Tensor, groups: torch.Tensor,
                        per_sample: bool = False,
                        index: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Summed KL of the accumulated class posteriors, given as per-sample rows [B, D].

    The paper counts it once per group (each row weighted by 1/group size); the reference counts it
    once per member (`per_sample=True`), which pulls large groups harder towards the prior.
    """
    kl = kl_divergence(group_mu, group_logvar)
    if per_sample:
        return kl.sum()
    inverse, counts = group_index(groups) if index is None else index
    return (kl / counts.index_select(0, inverse).to(kl.dtype)).sum()


class _FusedLatentLayer(torch.autograd.Function):
    """`latent_layer(fused=True)`: its gradient written out, computed once per group, not per sample.

    For group g with members i: alpha_i = exp(-logvar_i) / sum_j exp(-logvar_j) is member i's share of
    the group's precision, mu_g = sum_i alpha_i mu_i and logvar_g = -log sum_i exp(-logvar_i), so
    d mu_g / d mu_i = alpha_i, d logvar_g / d logvar_i = alpha_i and
    d mu_g / d logvar_i = -alpha_i (mu_i - mu_g).
    """

    @staticmethod
    def forward(ctx, style_mu, style_logvar, class_mu, class_logvar, inverse, style_eps, group_eps, class_kl_weight):
        shift, weight, precision = _group_precisions(-class_logvar, inverse, group_eps.shape[0])
        alpha = weight.div_(precision.index_select(0, inverse))
        group_mu = torch.zeros_like(group_eps).index_add_(0, inverse, alpha * class_mu)
        group_logvar = precision.log_().add_(shift).neg_()
        style_std, group_std = torch.exp(0.5 * style_logvar), torch.exp(0.5 * group_logvar)
        style_noise, group_noise = style_eps * style_std, group_eps * group_std
        style_kl = kl_divergence(style_mu, style_logvar).sum()
        group_kl = kl_divergence(group_mu, group_logvar)
        ctx.save_for_backward(class_mu, inverse, alpha, style_mu, style_std, style_noise, group_mu, group_std,
                              group_noise, class_kl_weight)
        class_z = (group_mu + group_noise).index_select(0, inverse)
        return style_mu + style_noise, class_z, style_kl, (group_kl * class_kl_weight).sum()

    @staticmethod
    def backward(ctx, grad_style_z, grad_class_z, grad_style_kl, grad_class_kl):
        (class_mu, inverse, alpha, style_mu, style_std, style_noise, group_mu, group_std, group_noise,
         class_kl_weight) = ctx.saved_tensors
        grad_style_mu = grad_style_z + grad_style_kl * style_mu
        grad_style_logvar = 0.5 * (grad_style_z * style_noise + grad_style_kl * (style_std.square() - 1.0))
        grad_group_z = torch.zeros_like(group_mu).index_add_(0, inverse, grad_class_z)
        grad_group_kl = grad_class_kl * class_kl_weight.unsqueeze(1)
        grad_group_mu = grad_group_z + grad_group_kl * group_mu
        grad_group_logvar = 0.5 * (grad_group_z * group_noise + grad_group_kl * (group_std.square() - 1.0))
        grad_class_mu = grad_class_logvar = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            member_grad_mu = grad_group_mu.index_select(0, inverse)
            grad_class_mu = alpha * member_grad_mu
            grad_class_logvar = alpha * (grad_group_logvar.index_select(0, inverse)
                                         - member_grad_mu * (class_mu - group_mu.index_select(0, inverse)))
        return grad_style_mu, grad_style_logvar, grad_class_mu, grad_class_logvar, None, None, None, None


def latent_layer(style_mu: torch.Tensor, style_logvar: torch.Tensor, class_mu: torch.Tensor,
                 class_logvar: torch.Tensor, groups: torch.Tensor, eps_std: float,
                 class_kl_per_sample: bool = False, detach_class_posterior: bool = False,
                 generator: torch.Generator | None = None,
                 index: tuple[torch.Tensor, torch.Tensor] | None = None, fused: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latent layer of one training batch, from the encoder's posteriors to the decoder's codes:
    (style sample [B, S], its group's class sample [B, C], summed style KL, summed class KL).

    `fused=False` composes the functions above, step by step. `fused=True` (for training) gives the
    same values, gradients and noise draws in one autograd node with the gradient written out: 78
    tensor operations instead of 115, each of which costs microseconds on a small batch.
    `detach_class_posterior` is the reference's departure from the paper: no gradient reaches the
    class heads.
    """
    index = group_index(groups) if index is None else index
    if detach_class_posterior:
        class_mu, class_logvar = class_mu.detach(), class_logvar.detach()
    if fused:
        inverse, counts = index
        # The noise is drawn in the composed order: the style eps, then one eps per group.
        style_eps = torch.randn(style_mu.shape, generator=generator, device=style_mu.device, dtype=style_mu.dtype)
        group_eps = eps_std * torch.randn((counts.numel(), class_mu.shape[1]), generator=generator,
                                          device=class_mu.device, dtype=class_mu.dtype)
        # The paper counts the class KL once per group; the reference once per member.
        class_kl_weight = counts.to(class_mu.dtype)
        if not class_kl_per_sample:
            class_kl_weight = torch.ones_like(class_kl_weight)
        return _FusedLatentLayer.apply(style_mu, style_logvar, class_mu, class_logvar, inverse, style_eps, group_eps,
                                       class_kl_weight)
    group_mu, group_logvar = accumulate_group_evidence(class_mu, class_logvar, groups, index)
    style_z = reparameterize(style_mu, style_logvar, generator=generator)
    class_z = group_wise_reparameterize(group_mu, group_logvar, groups, eps_std, generator=generator, index=index)
    style_kl = kl_divergence(style_mu, style_logvar).sum()
    class_kl = class_kl_divergence(group_mu, group_logvar, groups, per_sample=class_kl_per_sample, index=index)
    return style_z, class_z, style_kl, class_kl


class _SigmoidSquaredError(torch.autograd.Function):
    """sum (sigmoid(logits) - x)^2 with its gradient 2 (s - x) s (1 - s) written out: two passes over the
    [B, 784] pixels backward instead of autograd's four. x is data and gets no gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        means = torch.sigmoid(logits)
        error = means - x
        ctx.save_for_backward(means, error)
        return torch.dot(error.view(-1), error.view(-1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        means, error = ctx.saved_tensors
        return torch.ops.aten.sigmoid_backward(error, means) * (2.0 * grad), None


def reconstruction_loss(x: torch.Tensor, logits: torch.Tensor, pixel_logvar: torch.Tensor | None,
                        likelihood: str) -> torch.Tensor:
    """Summed negative log-likelihood of images x [B, 784] in [0, 1] given decoder logits [B, 784].

    mse: sum (sigmoid(logits) - x)^2, the reference's fixed-variance loss.
    bernoulli: summed binary cross-entropy.
    gaussian: sum 1/2 (log 2 pi + logvar + (x - sigmoid(logits))^2 / exp(logvar)), with the decoder's
    learned per-pixel log-variance (the paper's first author's corrected fork).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    if likelihood == "mse":
        return _SigmoidSquaredError.apply(logits, x)
    if likelihood == "gaussian":
        squared_error = (torch.sigmoid(logits) - x).pow(2)
        return 0.5 * torch.sum(LOG_2PI + pixel_logvar + squared_error * torch.exp(-pixel_logvar))
    raise ValueError(f"unknown likelihood {likelihood!r}")


def atomic_save(obj: object, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash mid-save never leaves a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def pick_device(name: str = "auto") -> torch.device:
    """'auto' means CUDA when present, else the CPU; raises ValueError for a device that cannot be used."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(str(error)) from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{device}: CUDA is not available on this machine")
    return device


# ---- Loading a trained model, shared by the evaluation scripts ----------------------------------

MODEL_DEFAULTS = {"style_dim": 10, "class_dim": 10, "eps_std": 0.1, "likelihood": "mse", "dataset": "mnist"}
DEFAULT_RUN = "checkpoints/mlvae_eps0.1"


class ModelLoadError(RuntimeError):
    """A model file is missing, unreadable or of other shapes; the message names the file and the fix."""


@dataclass
class ModelSettings:
    """What an evaluation needs to know about a trained model, resolved from flags and args.json."""

    style_dim: int
    class_dim: int
    eps_std: float
    likelihood: str
    dataset: str
    encoder_path: Path
    decoder_path: Path

    @property
    def name(self) -> str:
        """A short name for output files: the run folder's name, or the encoder file's name."""
        path = self.encoder_path
        return path.parent.name if path.name == "encoder.pt" else path.name.removesuffix(".pt")


def script_parser(doc: str) -> argparse.ArgumentParser:
    """The parser each script starts from: its docstring's first paragraph, and defaults shown in --help."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def save_figure(fig, out: str | Path, dpi: int = 100) -> None:
    """Write a matplotlib figure to `out` (making its folder) and free it."""
    import matplotlib.pyplot as plt

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose a trained model, the data it is evaluated on and the device.

    The model settings default to None so that `load_models` can tell a flag the user gave apart
    from one to take from the run's args.json (and, failing that, from MODEL_DEFAULTS).
    """
    add = parser.add_argument
    add("--checkpoint-dir", default=DEFAULT_RUN, help="run folder holding encoder.pt, decoder.pt and args.json")
    add("--encoder", default=None, help="encoder state_dict (any file name; default: <checkpoint-dir>/encoder.pt)")
    add("--decoder", default=None, help="decoder state_dict (any file name; default: <checkpoint-dir>/decoder.pt)")
    add("--style-dim", type=int, default=None,
        help=f"style dimension (default: from args.json beside the encoder, else {MODEL_DEFAULTS['style_dim']})")
    add("--class-dim", type=int, default=None,
        help=f"class dimension (default: from args.json, else {MODEL_DEFAULTS['class_dim']})")
    add("--eps-std", type=float, default=None,
        help=f"std of the per-group noise the model was trained with (default: from args.json, "
             f"else {MODEL_DEFAULTS['eps_std']}); pass it for weights without args.json")
    add("--likelihood", choices=LIKELIHOODS, default=None,
        help=f"the decoder's likelihood (default: from args.json, else {MODEL_DEFAULTS['likelihood']})")
    add("--dataset", choices=sorted(DATASETS), default=None,
        help=f"evaluation data (default: the model's training data from args.json, else {MODEL_DEFAULTS['dataset']})")
    add("--data-dir", default="data", help="folder holding <Dataset>/raw/ IDX files")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def add_split_argument(parser: argparse.ArgumentParser) -> None:
    start = VALIDATION_START
    parser.add_argument("--split", choices=EVALUATION_SPLITS, default="test",
                        help=f"test: fit on the train split, report the test split; validation: fit on train "
                             f"images [0, {start}), report train images [{start}, end) as 'test' (for "
                             f"choosing settings; train the model with --num-train {start})")


def resolve_settings(args: argparse.Namespace) -> ModelSettings:
    """Each setting from its flag when given, else from args.json beside the encoder, else the default."""
    encoder_path = Path(args.encoder or Path(args.checkpoint_dir) / "encoder.pt")
    decoder_path = Path(args.decoder or Path(args.checkpoint_dir) / "decoder.pt")
    saved_path = encoder_path.parent / "args.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    values = {}
    for key, default in MODEL_DEFAULTS.items():
        given = getattr(args, key)
        values[key] = given if given is not None else saved.get(key, default)
    return ModelSettings(**values, encoder_path=encoder_path, decoder_path=decoder_path)


def _load_state_dict(module: torch.nn.Module, path: Path, device: torch.device, expected: str,
                     held: Callable[[dict], str]) -> None:
    """load_state_dict(strict) from `path`, with every failure turned into a ModelLoadError."""
    if not path.is_file():
        raise ModelLoadError(f"no weights at {path}; train a model with `python training.py`, or point "
                             "--checkpoint-dir at a run folder (or --encoder/--decoder at the files)")
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as error:  # pickle, zip and torch errors all mean the same thing here
        raise ModelLoadError(f"{path} cannot be read as a state_dict ({error})") from error
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state_dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ModelLoadError(f"{path} does not fit the expected {expected}: {held(state)}; pass the "
                             "model's --style-dim/--class-dim/--likelihood") from error


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[Encoder, Decoder, ModelSettings]:
    """Build the encoder and decoder the flags describe and load their weights (strict, weights_only).

    Returns (encoder, decoder, settings), both networks in eval mode on `device`. Raises
    ModelLoadError with a message naming the file for missing, unreadable or mismatched weights.
    """
    settings = resolve_settings(args)
    dims = f"--style-dim {settings.style_dim} --class-dim {settings.class_dim}"

    def encoder_holds(state: dict) -> str:
        if "style_mu.weight" in state and "class_mu.weight" in state:
            return (f"the file holds style dim {state['style_mu.weight'].shape[0]}, "
                    f"class dim {state['class_mu.weight'].shape[0]}")
        return f"the file holds the keys {sorted(state)[:4]}..."

    def decoder_holds(state: dict) -> str:
        first = state.get("linear_model.linear_1.weight")
        inputs = f"style + class dim {first.shape[1]}" if first is not None else f"keys {sorted(state)[:4]}..."
        kind = "gaussian" if "pixel_logvar.weight" in state else "mse or bernoulli"
        return f"the file holds {inputs}, a {kind} likelihood head"

    encoder = Encoder(settings.style_dim, settings.class_dim).to(device)
    _load_state_dict(encoder, settings.encoder_path, device, f"encoder with {dims}", encoder_holds)
    decoder = Decoder(settings.style_dim, settings.class_dim, settings.likelihood).to(device)
    _load_state_dict(decoder, settings.decoder_path, device,
                     f"decoder with {dims} --likelihood {settings.likelihood}", decoder_holds)
    return encoder.eval(), decoder.eval(), settings


def device_and_models(parser: argparse.ArgumentParser,
                      args: argparse.Namespace) -> tuple[torch.device, Encoder, Decoder, ModelSettings]:
    """The device and the trained model that the flags of `add_model_arguments` name; every problem
    (bad device, missing or mismatched weights) ends in an argparse-style error."""
    try:
        device = pick_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    try:
        encoder, decoder, settings = load_models(args, device)
    except ModelLoadError as error:
        parser.error(str(error))
    return device, encoder, decoder, settings


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: torch.Tensor,
           chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the encoder once over a whole split in chunks: (style_mu, style_logvar, class_mu, class_logvar)."""
    parts = [encoder(batch) for batch in images.split(chunk)]
    return tuple(torch.cat(column) for column in zip(*parts))


def batch_groups(labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Group ids for rows laid out as consecutive batches: one group per (batch, label).

    Evidence accumulated with these ids over a whole split equals accumulating batch by batch, grouped
    by label, which is how the reference forms groups, without a Python loop over batches.
    """
    batch = torch.arange(len(labels), device=labels.device) // batch_size
    return batch * (int(labels.max()) + 1) + labels


def draw_evidence_sets(labels: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[N, k] indices: column 0 is each query itself, the rest k-1 distinct other images of its label."""
    members = torch.empty(len(labels), k, dtype=torch.long)
    for label in labels.unique():
        index = (labels == label).nonzero().squeeze(1).cpu()
        n = len(index)
        if k > n:
            raise ValueError(f"K={k} exceeds the {n} test images of label {int(label)}")
        scores = torch.rand(n, n, generator=generator)
        scores.fill_diagonal_(2.0)  # the query itself sorts last, so it is never drawn as "other"
        others = scores.argsort(dim=1)[:, : k - 1]
        members[index] = index[torch.cat([torch.arange(n).unsqueeze(1), others], dim=1)]
    return members.to(labels.device)


def fused_means(mu: torch.Tensor, logvar: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Posterior mean [N, D] of the product of Gaussians over each row of `members` [N, K]."""
    n, k = members.shape
    groups = torch.arange(n, device=mu.device).repeat_interleave(k)
    flat = members.reshape(-1)
    group_mu, _ = accumulate_group_evidence(mu[flat], logvar[flat], groups)
    return group_mu.view(n, k, -1)[:, 0]
