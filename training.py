"""Train the Multi-Level VAE on MNIST, grouping each minibatch by digit.

Each image gets a style posterior and a class posterior; the class posteriors of the images of one
digit in the batch are fused by group evidence accumulation, one class code is sampled per group, and
the decoder rebuilds every image from its own style sample and its group's class sample.

    python training.py                                   # paper-correct ML-VAE, eps std 0.1, 400 epochs
    python training.py --epochs 1 --num-train 2048       # a quick smoke run
    python training.py --detach-class-posterior --class-kl-per-sample   # the reference's objective
    tensorboard --logdir runs                            # watch the losses

Writes checkpoints/<run-name>/{encoder.pt, decoder.pt, training_state.pt, log.csv} and tensorboard
scalars under runs/<run-name>. `--resume` continues a stopped run; Ctrl-C saves and exits.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data_loader
from networks import LIKELIHOODS, PIXELS, Decoder, Encoder
from runs import LOG_FIELDS, atomic_save, pick_device, read_log, script_parser, write_log, write_text_atomic
from utils import group_index, latent_layer, reconstruction_loss, training_groups

# Settings that define the model and its objective: a resumed run must keep them.
RUN_SETTINGS = ("dataset", "style_dim", "class_dim", "likelihood", "eps_std", "detach_class_posterior",
                "class_kl_per_sample", "reconstruction_coef", "kl_coef", "style_kl_coef", "group_size",
                "batch_size", "lr", "beta1", "beta2", "num_train", "classes", "seed", "precision")
PROGRESS_EVERY = 25  # steps between progress-bar updates and NaN checks (each one syncs the device)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--epochs", type=int, default=400, help="total epochs (a resumed run continues up to this)")
    add("--batch-size", type=int, default=256, help="images per minibatch; a group = one digit in it")
    add("--lr", type=float, default=1e-3, help="Adam learning rate")
    add("--beta1", type=float, default=0.9, help="Adam beta1")
    add("--beta2", type=float, default=0.999, help="Adam beta2")
    add("--style-dim", type=int, default=10, help="dimension of the per-image style code")
    add("--class-dim", type=int, default=10, help="dimension of the per-group class code")
    add("--eps-std", type=float, default=0.1, help="std of the one noise vector drawn per group")
    add("--likelihood", choices=LIKELIHOODS, default="mse",
        help="mse: the reference's fixed variance; bernoulli: binary cross-entropy; "
             "gaussian: learned per-pixel variance")
    add("--reconstruction-coef", type=float, default=1.0, help="weight of the reconstruction term")
    add("--kl-coef", type=float, default=1.0, help="weight of the style and class KL terms")
    add("--style-kl-coef", type=float, default=1.0,
        help="extra weight of the style KL (a beta-VAE knob beyond the paper; 1 = the paper)")
    add("--group-size", type=int, default=None,
        help="split each digit's images in a batch into groups of at most this many (beyond the paper; "
             "default: one group per digit in the batch, the paper's setup)")
    add("--detach-class-posterior", action="store_true",
        help="reference behaviour: cut the class heads out of the gradient before accumulating evidence")
    add("--class-kl-per-sample", action="store_true",
        help="reference behaviour: count the group's class KL once per member instead of once per group")
    add("--dataset", choices=sorted(data_loader.DATASETS), default="mnist", help="training data")
    add("--data-dir", default="data", help="folder holding <Dataset>/raw/ IDX files")
    add("--num-train", type=int, default=None, help="use only the first N training images (default: all)")
    add("--classes", type=int, nargs="+", default=None,
        help="train only on images of these labels, e.g. 0 1 2 3 4 5 6 7 to hold digits 8 and 9 out")
    add("--seed", type=int, default=0, help="seed of the weights, the batch order and the noise")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 runs the networks under autocast")
    add("--compile", action="store_true", help="torch.compile the loss computation")
    add("--checkpoint-dir", default="checkpoints", help="runs are saved in <checkpoint-dir>/<run-name>/")
    add("--run-name", default=None, help="default: derived from the objective, e.g. mlvae_eps0.1")
    add("--save-every", type=int, default=5, help="epochs between checkpoints")
    add("--resume", action="store_true", help="continue the run saved under <checkpoint-dir>/<run-name>/")
    add("--log-dir", default="runs", help="tensorboard scalars go to <log-dir>/<run-name>/")
    add("--no-progress", action="store_true", help="no progress bars (for logs and tests)")
    return parser


def default_run_name(args: argparse.Namespace) -> str:
    if args.detach_class_posterior and args.class_kl_per_sample:
        name = "reference_objective"
    else:
        name = "mlvae" + "_detach" * args.detach_class_posterior + "_klpersample" * args.class_kl_per_sample
    name += f"_eps{args.eps_std:g}"
    if args.likelihood != "mse":
        name += f"_{args.likelihood}"
    if args.style_kl_coef != 1.0:
        name += f"_stylekl{args.style_kl_coef:g}"
    if args.group_size is not None:
        name += f"_group{args.group_size}"
    if args.dataset != "mnist":
        name += f"_{args.dataset}"
    if args.classes is not None:
        name += "_classes" + "".join(map(str, sorted(args.classes)))
    return name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags; every bad value ends in an argparse-style error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2 (groups are formed inside a batch)")
    for flag in ("epochs", "save_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("style_dim", "class_dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.group_size is not None and args.group_size < 1:
        parser.error("--group-size must be at least 1")
    for flag in ("eps_std", "lr"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.num_train is not None and args.num_train < args.batch_size:
        parser.error(f"--num-train ({args.num_train}) must be at least --batch-size ({args.batch_size})")
    try:
        args.device = pick_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")
    args.run_name = args.run_name or default_run_name(args)
    args.run_dir = Path(args.checkpoint_dir) / args.run_name
    state_path = args.run_dir / "training_state.pt"
    if args.resume:
        if not state_path.is_file():
            parser.error(f"--resume: no saved run at {state_path}")
        saved = torch.load(state_path, weights_only=True, map_location="cpu")["args"]
        # Runs saved before a setting existed ran with its default.
        saved = {key: saved.get(key, parser.get_default(key)) for key in RUN_SETTINGS}
        changed = [f"--{key.replace('_', '-')} (saved {saved[key]}, given {getattr(args, key)})"
                   for key in RUN_SETTINGS if saved[key] != getattr(args, key)]
        if changed:
            parser.error("--resume: the saved run used other settings: " + ", ".join(changed))
    elif state_path.exists():
        parser.error(f"a run already exists at {args.run_dir}; pass --resume to continue it "
                     "or choose another --run-name")
    return args


def compute_losses(encoder: Encoder, decoder: Decoder, x: torch.Tensor, groups: torch.Tensor,
                   args: argparse.Namespace, generator: torch.Generator | None = None) -> torch.Tensor:
    """The three ML-VAE loss terms [reconstruction, style KL, class KL] of one batch, each divided by
    batch*784 as the reference does, so that values compare with its logs."""
    x = x.reshape(x.shape[0], PIXELS)
    # One torch.unique per step: it syncs and, under --compile, splits the graph (its output size
    # depends on the data).
    index = group_index(groups)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        style_mu, style_logvar, class_mu, class_logvar = encoder(x)
    style_mu, style_logvar, class_mu, class_logvar = (
        t.float() for t in (style_mu, style_logvar, class_mu, class_logvar))
    style_z, class_z, style_kl, class_kl = latent_layer(
        style_mu, style_logvar, class_mu, class_logvar, groups, args.eps_std, args.class_kl_per_sample,
        args.detach_class_posterior, generator, index)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        logits, pixel_logvar = decoder.logits(style_z, class_z)
    logits = logits.float()
    pixel_logvar = None if pixel_logvar is None else pixel_logvar.float()
    terms = torch.stack([reconstruction_loss(x, logits, pixel_logvar, args.likelihood), style_kl, class_kl])
    return terms / (x.shape[0] * PIXELS)


def train_step(encoder: Encoder, decoder: Decoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               groups: torch.Tensor, args: argparse.Namespace, generator: torch.Generator | None = None,
               loss_fn=compute_losses) -> torch.Tensor:
    """One Adam step on one batch; returns the detached loss terms [3] without syncing the device."""
    terms = loss_fn(encoder, decoder, x, groups, args, generator)
    loss = args.reconstruction_coef * terms[0] + args.kl_coef * (args.style_kl_coef * terms[1] + terms[2])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return terms.detach()


def make_optimizer(encoder: Encoder, decoder: Decoder, args: argparse.Namespace) -> torch.optim.Adam:
    params = list(encoder.parameters()) + list(decoder.parameters())
    return torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, args.beta2), fused=True)


def save_run(args: argparse.Namespace, encoder: Encoder, decoder: Decoder, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, position: dict) -> None:
    """Save weights and the full training state; `position` says where in the schedule we stand."""
    saved_args = {key: (str(value) if isinstance(value, (Path, torch.device)) else value)
                  for key, value in vars(args).items()}
    atomic_save(encoder.state_dict(), args.run_dir / "encoder.pt")
    atomic_save(decoder.state_dict(), args.run_dir / "decoder.pt")
    atomic_save({"optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                 "args": saved_args, **position}, args.run_dir / "training_state.pt")
    write_text_atomic(args.run_dir / "args.json", json.dumps(saved_args, indent=1, sort_keys=True) + "\n")


class StopRequest:
    """Turns the first Ctrl-C into a flag checked between steps, so a step is never cut in half."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "StopRequest":
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C interrupts at once

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self.previous)


def train(args: argparse.Namespace) -> Path:
    """Run (or resume) the training described by parsed `args`; returns the run folder."""
    device = args.device
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images, labels = data_loader.load_split(args.data_dir, "train", args.dataset, device=device)
    if args.classes is not None:
        keep = torch.isin(labels, torch.tensor(args.classes, device=device))
        images, labels = images[keep], labels[keep]
    if args.num_train is not None:
        images, labels = images[: args.num_train], labels[: args.num_train]
    images = images.reshape(len(images), PIXELS)
    encoder = Encoder(args.style_dim, args.class_dim).to(device)
    decoder = Decoder(args.style_dim, args.class_dim, args.likelihood).to(device)
    optimizer = make_optimizer(encoder, decoder, args)
    loss_fn = torch.compile(compute_losses) if args.compile else compute_losses
    steps_per_epoch = len(images) // args.batch_size
    epoch, step, iteration, perm = 0, 0, 0, None
    if args.resume:
        encoder.load_state_dict(torch.load(args.run_dir / "encoder.pt", weights_only=True, map_location=device))
        decoder.load_state_dict(torch.load(args.run_dir / "decoder.pt", weights_only=True, map_location=device))
        state = torch.load(args.run_dir / "training_state.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        epoch, step, iteration = state["epoch"], state["step"], state["iteration"]
        perm = None if state["perm"] is None else state["perm"].to(device)
    log_path = args.run_dir / "log.csv"
    log_rows = read_log(log_path, epoch)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    from tensorboardX import SummaryWriter  # imported late: it is slow to import
    writer = SummaryWriter(str(Path(args.log_dir) / args.run_name))

    def save(at_epoch: int, at_step: int, at_perm: torch.Tensor | None) -> None:
        save_run(args, encoder, decoder, optimizer, generator,
                 {"epoch": at_epoch, "step": at_step, "iteration": iteration,
                  "perm": None if at_perm is None else at_perm.cpu()})

    epochs_bar = tqdm(range(epoch, args.epochs), initial=epoch, total=args.epochs, desc=args.run_name,
                      unit="epoch", disable=args.no_progress, dynamic_ncols=True)
    with StopRequest() as stop:
        for epoch in epochs_bar:
            if perm is None:
                perm = torch.randperm(len(images), generator=generator, device=device)
            totals = torch.zeros(3, device=device)
            start, start_step = time.perf_counter(), step
            steps_bar = tqdm(range(step, steps_per_epoch), initial=step, total=steps_per_epoch, leave=False,
                             unit="batch", disable=args.no_progress, dynamic_ncols=True)
            for step in steps_bar:
                index = perm[step * args.batch_size:(step + 1) * args.batch_size]
                # index_select gathers rows about twice as fast as images[index] on the CPU.
                groups = training_groups(labels.index_select(0, index), args.group_size)
                terms = train_step(encoder, decoder, optimizer, images.index_select(0, index), groups, args,
                                   generator, loss_fn)
                totals += terms
                iteration += 1
                if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == steps_per_epoch:
                    values = terms.tolist()
                    if not all(map(math.isfinite, values)):
                        raise TrainingDiverged(
                            f"loss became {values} at epoch {epoch + 1}, step {step + 1}; stopped without "
                            f"saving, so {args.run_dir} keeps the last good checkpoint. Try a lower --lr.")
                    rate = (step + 1 - start_step) * args.batch_size / (time.perf_counter() - start)
                    steps_bar.set_postfix(rec=f"{values[0]:.4f}", style_kl=f"{values[1]:.4f}",
                                          class_kl=f"{values[2]:.5f}", img_s=f"{rate:.0f}")
                if stop.requested and step + 1 < steps_per_epoch:
                    save(epoch, step + 1, perm)
                    print(f"\nInterrupted: saved {args.run_dir} at epoch {epoch + 1}, step {step + 1}; "
                          "continue with the same command plus --resume", file=sys.stderr)
                    return args.run_dir
            steps_bar.close()
            rate = (steps_per_epoch - start_step) * args.batch_size / (time.perf_counter() - start)
            means = (totals / max(steps_per_epoch - start_step, 1)).tolist()
            row = dict(zip(LOG_FIELDS, [epoch + 1, iteration, *(f"{v:.6g}" for v in means), f"{rate:.0f}"]))
            log_rows.append(row)
            write_log(log_path, log_rows)
            for name, value in zip(LOG_FIELDS[2:5], means):
                writer.add_scalar(f"loss/{name}", value, iteration)
            epochs_bar.set_postfix(rec=f"{means[0]:.4f}", img_s=f"{rate:.0f}")
            step, perm = 0, None
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs or stop.requested:
                save(epoch + 1, 0, None)
            if stop.requested:
                print(f"\nInterrupted: saved {args.run_dir} after epoch {epoch + 1}; "
                      "continue with the same command plus --resume", file=sys.stderr)
                return args.run_dir
    writer.close()
    return args.run_dir


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("high")
    try:
        run_dir = train(args)
    except TrainingDiverged as error:
        sys.exit(f"error: {error}")
    except data_loader.DatasetFileError as error:
        sys.exit(f"error: {error}")
    print(f"Saved to {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
