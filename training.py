"""Train the Multi-Level VAE on grouped images: MNIST grouped by digit, or a folder of grouped images.

Each image gets a style posterior and a class posterior; the class posteriors of the images of one
group in the batch (one digit, or one folder data set's group) are fused by group evidence
accumulation, one class code is sampled per group, and the decoder rebuilds every image from its own
style sample and its group's class sample.

    python training.py                                   # paper-correct ML-VAE, eps std 0.1, 400 epochs
    python training.py --epochs 1 --num-train 2048 --run-name smoke   # a quick smoke run
    python training.py --detach-class-posterior --class-kl-per-sample   # the reference's objective
    python training.py --dataset folder --data-dir ~/faces --image-size 64 --arch conv \
        --groups-per-batch 32 --images-per-group 8       # your own grouped images (docs/data.md)
    tensorboard --logdir runs                            # watch losses, reconstructions and swap grids

Writes out/<run-name>/{encoder.pt, decoder.pt, args.json, log.csv, training_state.pt} (the shipped
runs in checkpoints/ are never touched unless --checkpoint-dir points there) and tensorboard logs
under runs/<run-name>. A folder that holds a run is written into only with --resume or --overwrite.
Ctrl-C or SIGTERM saves and exits (status 130 or 143); `--resume` with the same --run-name continues a run
stopped or killed at any instant, which loses at most the epochs since its last save (--save-every).

    torchrun --standalone --nproc_per_node 2 training.py --groups-per-batch 10 --images-per-group 25

trains the same model data-parallel in 2 processes (distributed.py; docs/training.md, "Several processes").
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

import data_loader
import distributed
from evaluation import encode
from grids import GRID_GROUPS, grid_image, reference_indices, swap_cells
from networks import ARCHS, LIKELIHOODS, Decoder, Encoder, build_networks
from runs import (BETA, LOG_FIELDS, NONNEGATIVE, NONNEGATIVE_INT, NUM_TRAIN_OF, NUM_TRAIN_OF_BEFORE, POSITIVE,
                  POSITIVE_INT, PRECISIONS, RUN_FILES, STATE_FILE, Bounded, UserError, add_data_arguments,
                  check_writable, fail, folder_name, pick_device, pick_threads, read_log, read_run_state,
                  reports_errors, repository_path, script_parser, set_float32_precision, training_selection,
                  write_run)
from utils import group_index, latent_layer, reconstruction_loss

# Settings that define the model and its objective: a resumed run must keep them.
RUN_SETTINGS = ("dataset", "data_list", "split_list", "image_size", "channels", "groups_per_batch",
                "images_per_group", "arch", "style_dim", "class_dim", "likelihood", "eps_std", "detach_class_posterior",
                "class_kl_per_sample", "reconstruction_coef", "kl_coef", "style_kl_coef", "group_size",
                "batch_size", "lr", "beta1", "beta2", "num_train", "num_train_of", "classes", "hold_out_validation",
                "seed", "precision")
# Settings that runs saved before args.json recorded them ran with another value than today's default.
SAVED_BEFORE = {"num_train_of": NUM_TRAIN_OF_BEFORE}
PROGRESS_EVERY = 25  # steps between progress-bar updates and NaN checks (each one syncs the device)
DEFAULT_IMAGES_PER_GROUP = 8  # group-balanced batches of folder data when neither G nor K is given
RECONSTRUCTED = 10  # tensorboard shows the first this many test images above their reconstructions


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; the run folder keeps its last save."""


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--epochs", type=POSITIVE_INT, default=400, help="total epochs (a resumed run continues up to this)")
    add("--batch-size", type=Bounded(int, 2), default=256,
        help="images per minibatch (random batches: a group = one label in it)")
    add("--groups-per-batch", type=POSITIVE_INT, default=None,
        help="group-balanced batches of G groups (default for --dataset folder: batch size / K)")
    add("--images-per-group", type=Bounded(int, 1), default=None,
        help=f"... of K images each (default for --dataset folder: {DEFAULT_IMAGES_PER_GROUP}; MNIST: random "
             "batches, the reference's)")
    add("--lr", type=POSITIVE, default=1e-3, help="Adam learning rate")
    add("--beta1", type=BETA, default=0.9, help="Adam beta1")
    add("--beta2", type=BETA, default=0.999, help="Adam beta2")
    add("--style-dim", type=POSITIVE_INT, default=10, help="dimension of the per-image style code")
    add("--class-dim", type=POSITIVE_INT, default=10, help="dimension of the per-group class code")
    add("--eps-std", type=POSITIVE, default=0.1, help="std of the one noise vector drawn per group")
    add("--arch", choices=ARCHS, default="mlp",
        help="mlp: the reference's 784-500 networks; conv: the cycle-consistent VAE's convolutional ones")
    add("--likelihood", choices=LIKELIHOODS, default="mse",
        help="mse: the reference's fixed variance; bernoulli: binary cross-entropy; "
             "gaussian: learned per-pixel variance")
    add("--reconstruction-coef", type=NONNEGATIVE, default=1.0, help="weight of the reconstruction term")
    add("--kl-coef", type=NONNEGATIVE, default=1.0, help="weight of the style and class KL terms")
    add("--style-kl-coef", type=NONNEGATIVE, default=1.0,
        help="extra weight of the style KL (a beta-VAE knob beyond the paper; 1 = the paper)")
    add("--group-size", type=POSITIVE_INT, default=None,
        help="split each digit's images in a batch into groups of at most this many (beyond the paper; "
             "default: one group per digit in the batch, the paper's setup)")
    add("--detach-class-posterior", action="store_true",
        help="reference behaviour: cut the class heads out of the gradient before accumulating evidence")
    add("--class-kl-per-sample", action="store_true",
        help="reference behaviour: count the group's class KL once per member instead of once per group")
    add_data_arguments(parser)
    add("--num-train", type=POSITIVE_INT, default=None,
        help=f"use only the first N images of the train split, --classes then picks its labels among them "
             f"({data_loader.VALIDATION_START} leaves the validation images unseen; default: all)")
    add("--classes", type=NONNEGATIVE_INT, nargs="+", metavar="LABEL", default=None,
        help="train only on images of these labels, e.g. 0 1 2 3 4 5 6 7 to hold digits 8 and 9 out")
    add("--hold-out-validation", action="store_true",
        help="folder data: leave the validation images out of training (the last sixth of each group's train "
             "images, or of the train groups where the test groups are unseen), for --split validation")
    add("--seed", type=int, default=0, help="seed of the weights, the batch order and the noise")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add("--threads", type=POSITIVE_INT, default=None,
        help="CPU threads (default: OMP_NUM_THREADS when set, else one per CPU idle when the run starts)")
    add("--precision", choices=PRECISIONS, default="fp32",
        help="fp32: strict IEEE fp32 matmuls and convolutions; tf32: TF32 ones where the hardware has them "
             "(Ampere and newer GPUs), faster, with 10-bit mantissa inputs; bf16: the networks under bf16 autocast")
    add("--compile", action="store_true",
        help="torch.compile the whole training step (forward, backward, Adam) into one graph")
    add("--checkpoint-dir", default=repository_path("out"),
        help="runs are saved in <checkpoint-dir>/<run-name>/ (the shipped runs live in checkpoints/)")
    add("--run-name", type=folder_name, default=None,
        help="a folder name (default: derived from the objective, e.g. mlvae_eps0.1)")
    add("--save-every", type=POSITIVE_INT, default=5,
        help="epochs between checkpoints (a crash loses at most the epochs since the last one)")
    add("--resume", action="store_true",
        help="continue the run saved under <checkpoint-dir>/<run-name>/ with its saved settings (flags given "
             "must agree with them, except --epochs and the logging ones); also repairs a save cut short")
    add("--overwrite", action="store_true",
        help="start afresh in a run folder that already holds a run, replacing it and its TensorBoard events at "
             "the first save")
    add("--log-dir", default=repository_path("runs"), help="tensorboard logs go to <log-dir>/<run-name>/")
    add("--log-every", type=POSITIVE_INT, default=50,
        help="steps between tensorboard points of the loss terms (their mean over those steps)")
    add("--image-every", type=NONNEGATIVE_INT, default=5,
        help="epochs between tensorboard reconstructions and swap grids (0: none)")
    add("--no-progress", action="store_true", help="no progress bars (for logs and tests)")
    parser.set_defaults(num_train_of=NUM_TRAIN_OF)  # recorded in args.json: what --num-train counts (runs.py)
    return parser


def default_run_name(args: argparse.Namespace) -> str:
    if args.detach_class_posterior and args.class_kl_per_sample:
        name = "reference_objective"
    else:
        name = "mlvae" + "_detach" * args.detach_class_posterior + "_klpersample" * args.class_kl_per_sample
    if args.arch != "mlp":
        name += f"_{args.arch}"
    name += f"_eps{args.eps_std:g}"
    if args.likelihood != "mse":
        name += f"_{args.likelihood}"
    if args.style_kl_coef != 1.0:
        name += f"_stylekl{args.style_kl_coef:g}"
    if args.group_size is not None:
        name += f"_group{args.group_size}"
    if args.dataset == data_loader.FOLDER:
        name += "_" + (Path(args.data_dir).expanduser().resolve().name or "folder")
    elif args.dataset != "mnist":
        name += f"_{args.dataset}"
    if args.classes is not None:
        name += "_classes" + "".join(map(str, sorted(args.classes)))
    return name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the flags, and check the run folder: a new run never writes into a folder that
    holds one (unless --overwrite), and --resume takes the settings it is not given from the saved run.
    Every problem ends in one `error:` line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    probe, not_given = build_parser(), object()  # argparse cannot tell a default from a given value
    probe.set_defaults(**dict.fromkeys(vars(args), not_given))
    given = {key for key, value in vars(probe.parse_args(argv)).items() if value is not not_given}
    args.classes = label_set(args.classes)
    if args.dataset == data_loader.FOLDER:  # args.json records where the data lie, for scripts run anywhere
        args.data_dir = str(Path(args.data_dir).expanduser().resolve())
        for key in ("data_list", "split_list"):
            if getattr(args, key) is not None and Path(getattr(args, key)).is_file():
                setattr(args, key, str(Path(getattr(args, key)).resolve()))
    world = distributed.world_from_environment()
    try:
        args.device = distributed.process_device(pick_device(args.device), world)
    except ValueError as error:
        parser.error(f"--device: {error}")
    args.run_name = args.run_name or default_run_name(args)
    args.run_dir = Path(args.checkpoint_dir) / args.run_name
    try:
        check_writable(args.checkpoint_dir, "--checkpoint-dir", folder=True)
        check_writable(args.log_dir, "--log-dir", folder=True)
        if args.resume and args.overwrite:
            parser.error("--resume continues a run and --overwrite replaces it; pass only one of them")
        present = [name for name in (STATE_FILE, *RUN_FILES) if (args.run_dir / name).is_file()]
        if args.resume:
            take_saved_settings(parser, args, given, present)
        elif present and not args.overwrite:
            resume = "pass --resume to continue it, " if STATE_FILE in present else ""
            parser.error(f"{args.run_dir} already holds a run ({', '.join(present)}); {resume}choose another "
                         "--run-name, or pass --overwrite to replace it")
    except UserError as error:
        parser.error(str(error))
    if args.arch == "conv" and args.likelihood == "gaussian":
        parser.error("--arch conv has no pixel log-variance head; use --likelihood mse or bernoulli")
    if args.num_train is not None and args.num_train < args.batch_size:
        parser.error(f"--num-train ({args.num_train}) must be at least --batch-size ({args.batch_size})")
    choose_batches(parser, args, given)
    check_process_shares(parser, args, world.size)
    return args


def check_process_shares(parser: argparse.ArgumentParser, args: argparse.Namespace, processes: int) -> None:
    """Under torchrun, each process takes whole groups of every batch (data_loader.Batches): the batches
    must be group-balanced, with a group count the process count divides."""
    if processes == 1:
        return
    if args.images_per_group is None:
        parser.error(f"random batches group images by label inside a batch, which {processes} processes cannot "
                     "share as whole groups; pass --groups-per-batch G --images-per-group K, with G a multiple of "
                     f"{processes} (e.g. --groups-per-batch {processes * math.ceil(10 / processes)} "
                     "--images-per-group 25 on MNIST)")
    if args.groups_per_batch % processes:
        parser.error(f"--groups-per-batch {args.groups_per_batch}: {processes} processes take whole groups, an "
                     f"equal share each; pass a multiple of {processes}, or another --nproc_per_node")


def choose_batches(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]) -> None:
    """Settle random against group-balanced batches: folder data defaults to G groups of K images with
    G * K = --batch-size; MNIST to the reference's random batches."""
    if args.images_per_group is None and args.groups_per_batch is None:
        if args.dataset != data_loader.FOLDER or args.resume:
            return
        args.images_per_group = DEFAULT_IMAGES_PER_GROUP
    if args.group_size is not None:
        parser.error("--group-size splits the labels of random batches; group-balanced batches "
                     "(--groups-per-batch, --images-per-group) set the group size themselves")
    if args.images_per_group is None:
        args.images_per_group = max(1, args.batch_size // args.groups_per_batch)
    if args.groups_per_batch is None:
        args.groups_per_batch = max(1, args.batch_size // args.images_per_group)
    size = args.groups_per_batch * args.images_per_group
    if "batch_size" in given and args.batch_size != size:
        parser.error(f"--batch-size {args.batch_size} differs from --groups-per-batch x --images-per-group = {size}; "
                     "leave --batch-size out")
    args.batch_size = size


def label_set(classes: list[int] | None) -> list[int] | None:
    """--classes as the set it means, sorted: `9 8` and `8 9 8` are `8 9`."""
    return None if classes is None else sorted(set(classes))


# Flags of one invocation of a run: --resume never takes them from the saved run.
INVOCATION_FLAGS = {"resume", "overwrite", "device", "threads", "compile", "no_progress", "checkpoint_dir",
                    "run_name", "log_dir", "data_dir"}


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues the run, in backquotes: --resume takes the run's settings from the saved
    run, and the INVOCATION_FLAGS that differ from their defaults are repeated."""
    world = distributed.world_from_environment()
    launcher = ["python"] if world.size == 1 else ["torchrun", f"--nproc_per_node={world.local_size}"]
    nodes = world.size // world.local_size
    if nodes > 1:
        launcher.insert(1, f"--nnodes={nodes}")
    defaults, words = build_parser(), [*launcher, "training.py"]
    for key in ("checkpoint_dir", "run_name", "log_dir", "data_dir", "threads", "compile", "no_progress"):
        value = getattr(args, key)
        if key in ("checkpoint_dir", "run_name") or value != defaults.get_default(key):
            words += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    if args.device != pick_device("auto"):
        words += ["--device", str(args.device)]
    command = f"`{shlex.join(words + ['--resume'])}`"
    # torchrun's rendezvous flags never reach the processes, so a multi-node launch must repeat its own.
    return command if nodes == 1 else f"{command} on every node, with the launch's rendezvous flags"


def take_saved_settings(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str],
                        present: list[str]) -> None:
    """For --resume: refuse given RUN_SETTINGS that differ from the saved run's, and take every flag
    not given (but the INVOCATION_FLAGS) from the saved run."""
    state = read_run_state(args.run_dir)
    if state is None:
        what = ("it is a run without training state (a shipped one keeps only its weights and log); choose "
                "another --run-name to train a new run" if present else "start the run without --resume")
        parser.error(f"--resume: {args.run_dir} holds no {STATE_FILE} to continue from; {what}")
    # Runs saved before a setting existed ran with its default, but those of SAVED_BEFORE.
    saved = {key: state["args"].get(key, SAVED_BEFORE.get(key, parser.get_default(key))) for key in vars(args)}
    saved["classes"] = label_set(saved["classes"])  # runs saved before kept the order given
    changed = [f"--{key.replace('_', '-')} (saved {saved[key]}, given {getattr(args, key)})"
               for key in RUN_SETTINGS if key in given and saved[key] != getattr(args, key)]
    if changed:
        parser.error("--resume: the saved run used other settings: " + ", ".join(changed)
                     + "; leave these flags out to keep the saved ones")
    check_random_state(parser, args, state)
    for key in vars(args).keys() - given - INVOCATION_FLAGS - {"run_dir"}:
        setattr(args, key, saved[key])


def check_random_state(parser: argparse.ArgumentParser, args: argparse.Namespace, state: dict) -> None:
    """For --resume: refuse a device whose random generator cannot take the saved state. A CPU generator
    (Mersenne Twister, 5056 bytes of state) and a CUDA one (Philox, 16 bytes) draw different streams, so
    the batch order and the noise still to come continue only on the kind of device they were saved on."""
    try:
        torch.Generator(device=args.device).set_state(state["generator"])
    except RuntimeError:
        cpu_state = len(state["generator"]) == len(torch.Generator().get_state())
        kind = "cpu" if cpu_state else "cuda"
        saved = str(state["args"].get("device", kind))
        saved = saved if saved.startswith(kind) else kind
        where = " on a machine with CUDA" if kind == "cuda" and not torch.cuda.is_available() else ""
        parser.error(f"--resume: {args.run_dir} was saved on {saved}, and its random state (the batch order and "
                     f"the noise still to come) continues only on a {kind} device, not on {args.device}; "
                     f"resume it with --device {saved}{where}")


def compute_losses(encoder: Encoder, decoder: Decoder, x: torch.Tensor, groups: torch.Tensor,
                   noise: tuple[torch.Tensor, torch.Tensor], args: argparse.Namespace) -> torch.Tensor:
    """The three ML-VAE loss terms [reconstruction, style KL, class KL] of one batch, each divided by
    batch * values per image (C*H*W: 784 on MNIST) as the reference does, so that values compare with its logs.

    `groups` [B] are ids in [0, G) and `noise` = (style eps [B, S], class eps [G, C]), one class row per
    possible group: a fixed-size group index, so that the step compiles into one graph.
    """
    x = x.reshape(x.shape[0], -1)
    index = group_index(groups, num_groups=len(noise[1]))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        style_mu, style_logvar, class_mu, class_logvar = encoder(x)
    style_mu, style_logvar, class_mu, class_logvar = (
        t.float() for t in (style_mu, style_logvar, class_mu, class_logvar))
    style_z, class_z, style_kl, class_kl = latent_layer(
        style_mu, style_logvar, class_mu, class_logvar, groups, args.eps_std, args.class_kl_per_sample,
        args.detach_class_posterior, index=index, noise=noise)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        logits, pixel_logvar = decoder.logits(style_z, class_z)
    logits = logits.float()
    pixel_logvar = None if pixel_logvar is None else pixel_logvar.float()
    terms = torch.stack([reconstruction_loss(x, logits, pixel_logvar, args.likelihood), style_kl, class_kl])
    return terms / x.numel()


def fused_adam_kernel(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                      exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
                      lr: float, lr_tensor: torch.Tensor | None, beta1: float, beta2: float, weight_decay: float,
                      eps: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool) -> None:
    """One Adam (AdamW when decoupled_weight_decay) step of one parameter group in place: torch.optim's fused
    CPU/CUDA kernel, called as torch.optim.adam._fused_adam calls it (step counts first, then the kernel).
    `lr_tensor`, when given, is the learning rate (a tensor lr, read at every step); else `lr`."""
    torch._foreach_add_(steps, 1)
    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=amsgrad,
           lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
           maximize=maximize, grad_scale=None, found_inf=None)


# The fused kernel as an op a compiled graph calls: torch.optim's own entry to it is hidden from torch.compile
# (torch.compiler.disable), and Inductor's fusion of the traced foreach form recomputes the bias corrections
# (two pow calls) for every 8 elements, several times the fused kernel's time on a CPU (docs/speed.md).
fused_adam_op = torch.library.custom_op(
    "mlvae::fused_adam_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))(
    fused_adam_kernel)


@fused_adam_op.register_fake
def fused_adam_outputs(*args, **kwargs) -> None:
    """What the op returns when traced: nothing; it updates its inputs in place."""


def adam_update(optimizer: torch.optim.Adam, grads: list[torch.Tensor]) -> None:
    """optimizer.step() with the gradients given, one per parameter of its param groups in order: torch.optim's
    fused Adam kernel on the optimizer's own state (made by init_adam_state; checkpoints keep torch.optim's
    format), with each group's lr, betas, eps, weight_decay, amsgrad, maximize and decoupled_weight_decay
    (AdamW). Callable inside a compiled graph: Adam.step() breaks one on purpose (pytorch/pytorch#104053)
    and reads .grad, which a traced backward cannot write without another break.

    A float lr is a constant of a compiled graph, so changing it recompiles the graph; a tensor lr
    (torch.optim.Adam(..., lr=torch.tensor(1e-3)), torch.optim's way to schedule a compiled optimizer) is
    read at every step. UserError for settings the fused kernel has no form for (differentiable).
    """
    update = fused_adam_op if torch.compiler.is_compiling() else fused_adam_kernel
    start = 0
    for group in optimizer.param_groups:
        if group.get("differentiable"):
            raise UserError("Adam(differentiable=True) has no fused kernel; training.adam_update runs "
                            "differentiable=False only")
        params = group["params"]
        states = [optimizer.state[p] for p in params]
        max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else []
        lr = group["lr"]
        tensor_lr = isinstance(lr, torch.Tensor)
        with torch.no_grad():
            update(params, grads[start:start + len(params)], [s["exp_avg"] for s in states],
                   [s["exp_avg_sq"] for s in states], max_exp_avg_sqs,
                   [s["step"] for s in states], lr=0.0 if tensor_lr else lr, lr_tensor=lr if tensor_lr else None,
                   beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                   eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                   decoupled_weight_decay=group.get("decoupled_weight_decay", False))
        start += len(params)


def optimization_step(encoder: Encoder, decoder: Decoder, optimizer: torch.optim.Adam, x: torch.Tensor,
                      groups: torch.Tensor, noise: tuple[torch.Tensor, torch.Tensor],
                      args: argparse.Namespace) -> torch.Tensor:
    """Loss, gradients and Adam update of one batch, given its noise; returns the detached loss terms [3].

    It draws no random numbers and syncs nothing, so that torch.compile makes it one graph (compile_step).
    """
    terms = compute_losses(encoder, decoder, x, groups, noise, args)
    loss = args.reconstruction_coef * terms[0] + args.kl_coef * (args.style_kl_coef * terms[1] + terms[2])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # A parameter the loss does not reach (the class heads under --detach-class-posterior) gets a zero
    # gradient, with which Adam leaves it unchanged.
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    # Under torchrun each process's terms are its share's sums over its share's size: their averages
    # are the whole batch's, and the averaged gradients the whole batch's gradients.
    *grads, terms = distributed.average_over_processes([*grads, terms.detach()])
    adam_update(optimizer, grads)
    return terms


def compile_step(optimizer: torch.optim.Adam, device: torch.device):
    """optimization_step as one torch.compile'd graph (fullgraph: a graph break is an error): forward,
    backward and Adam update; on CUDA replayed as a CUDA graph (mode="reduce-overhead"). Call it once
    the optimizer holds the state it will train with (after a resume's load_state_dict).

    Where compilation fails (no C++ compiler for Inductor, say), the step says so in one `note:` line
    and runs eager from then on (eager_fallback)."""
    # torch 2.14 traces autograd.grad (and Tensor.backward) into a graph only with this switch on, which it
    # has no public form of; without it the backward breaks the graph.
    torch._dynamo.config.trace_autograd_ops = True
    for tensor in static_tensors(optimizer):  # updated in place at every step: CUDA graphs keep their addresses
        torch._dynamo.mark_static_address(tensor)
    compiled = torch.compile(optimization_step, fullgraph=True,
                             mode="reduce-overhead" if device.type == "cuda" else None)
    return eager_fallback(compiled)


def static_tensors(optimizer: torch.optim.Adam) -> list[torch.Tensor]:
    """The optimizer's state tensors and its tensor learning rates (which a scheduler fills in place)."""
    lrs = [group["lr"] for group in optimizer.param_groups if isinstance(group["lr"], torch.Tensor)]
    return [tensor for state in optimizer.state.values() for tensor in state.values()] + lrs


def eager_fallback(compiled):
    """`compiled` (a compiled optimization_step), which turns into optimization_step itself the first time
    its compilation fails: one `note:` line says why, and that step and all later ones run eager. A failed
    compilation runs nothing, so the step is taken once."""
    step = compiled

    def run(*args):
        nonlocal step
        try:
            return step(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            cause = error.inner_exception
            reason = next(iter(str(cause).strip().splitlines()), "")[:200] or type(cause).__name__
            print(f"note: --compile: torch.compile failed ({reason}); training continues eager", flush=True)
            step = optimization_step
            return step(*args)

    return run


def train_step(encoder: Encoder, decoder: Decoder, optimizer: torch.optim.Adam, x: torch.Tensor,
               groups: torch.Tensor, num_groups: int, args: argparse.Namespace,
               generator: torch.Generator | None = None, step_fn=optimization_step,
               world: distributed.World = distributed.World()) -> torch.Tensor:
    """One Adam step on one batch whose group ids lie in [0, num_groups) (data_loader.Batches); returns
    the detached loss terms [3] without syncing the device.

    The step's noise is drawn here from `generator`, outside `step_fn` (optimization_step or
    compile_step's graph): a compiled run and an eager run of one seed draw the same numbers. Under
    torchrun, `x` is this process's share of the batch: every process draws the whole batch's noise,
    as one process does, and takes its share's rows, so that all generators stay in one state.
    """
    noise = (torch.randn(len(x) * world.size, args.style_dim, generator=generator, device=x.device),
             torch.randn(num_groups * world.size, args.class_dim, generator=generator, device=x.device))
    if world.size > 1:
        noise = tuple(rows.chunk(world.size)[world.rank] for rows in noise)
    if x.device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # a CUDA graph may reuse the last step's output memory
    return step_fn(encoder, decoder, optimizer, x, groups, noise, args)


def make_optimizer(encoder: Encoder, decoder: Decoder, args: argparse.Namespace) -> torch.optim.Adam:
    """Adam over both networks, with its state created now (init_adam_state)."""
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, args.beta2), fused=True)
    init_adam_state(optimizer)
    return optimizer


def init_adam_state(optimizer: torch.optim.Adam) -> None:
    """Create the Adam state of every parameter that has none, as the first step() would (adam_update never
    calls step()), laid out as fused Adam keeps it: the step counts on the parameters' device, and
    max_exp_avg_sq in the groups with amsgrad."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.zeros((), device=p.device), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p),
                                      **({"max_exp_avg_sq": torch.zeros_like(p)} if group["amsgrad"] else {})}


def saved_args(args: argparse.Namespace) -> dict:
    """The flags as args.json records them."""
    return {key: (str(value) if isinstance(value, (Path, torch.device)) else value) for key, value in vars(args).items()}


def save_run(args: argparse.Namespace, encoder: Encoder, decoder: Decoder, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, position: dict) -> None:
    """Save the whole run with runs.write_run: training_state.pt first, then the files derived from it.
    `position` says where in the schedule we stand (epoch, step, iteration, perm and the loss sums of
    the epoch so far) and holds the log rows."""
    write_run(args.run_dir, {"encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                             "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                             "args": saved_args(args), **position})


def check_finite_save(encoder: Encoder, decoder: Decoder, totals: torch.Tensor | None, epoch: int, step: int) -> None:
    """Raise TrainingDiverged unless the weights and the loss sums of the epoch so far (`totals`; None at
    an epoch's end, whose means were checked) are finite, so that a NaN never overwrites the last good
    save: between saves the loss is checked only every PROGRESS_EVERY steps."""
    values = [*encoder.parameters(), *decoder.parameters(), *([] if totals is None else [totals])]
    if not torch.stack([torch.isfinite(value).all() for value in values]).all():
        sums = "" if totals is None else f" (the loss sums of epoch {epoch + 1} so far: {totals.tolist()})"
        where = f"epoch {epoch + 1}, step {step}" if step else f"epoch {epoch}"
        raise TrainingDiverged(f"the loss or the weights became NaN or Inf before the save after {where}{sums}")


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (what `kill`, SLURM and Kubernetes send before they kill
    a job) into a flag checked between steps, so that a step is never cut in half and the run is saved;
    a second signal acts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        self.previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __exit__(self, *exc) -> None:
        self._restore()

    def exit_saved(self, where: str, resume: str, say: bool = True) -> NoReturn:
        """After the save: say so (unless not `say`: rank 0 speaks for the processes of torchrun) and exit
        with status 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a process ended by
        that signal does, so that a caller sees the run is not finished."""
        if say:
            by = signal.Signals(self.signum).name if self.requested else "a signal to another process of the run"
            print(f"\nStopped by {by}: saved {where}; continue with {resume}", file=sys.stderr, flush=True)
        sys.exit(128 + (self.signum or signal.SIGTERM))

    def agreed(self, world: distributed.World, device: torch.device, synced: bool) -> bool:
        """Whether to stop now: in one process once a signal came; under torchrun once one came to any
        process, asked only where the loop syncs anyway (`synced`), so that all stop after the same step."""
        if world.size == 1:
            return self.requested
        return synced and distributed.any_process(self.requested, device)


def tensorboard_sources(test: data_loader.ImageSplit, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed test images tensorboard shows: the first RECONSTRUCTED of the test split, and the swap
    grid's sources (the first test image of each of the first GRID_GROUPS groups, as `inference.py`
    takes them)."""
    groups = list(range(min(GRID_GROUPS, len(test.groups))))
    shown = min(RECONSTRUCTED, len(test.labels))
    index = torch.cat([torch.arange(shown), reference_indices(test.labels, groups, "fixed", None)])
    images = data_loader.to_float(test.images[index], device)
    return images[:shown], images[shown:]


@torch.no_grad()
def log_images(writer, encoder: Encoder, decoder: Decoder, sources: tuple[torch.Tensor, torch.Tensor],
               step: int) -> None:
    """Write the fixed test images above their reconstructions from the posterior means, and the swap
    grid of `inference.py` (style rows x class columns)."""
    from torchvision.utils import make_grid

    shown, references = sources
    style_mu, _, class_mu, _ = encode(encoder, shown)
    pairs = torch.cat([shown, decoder(style_mu, class_mu).view_as(shown)])
    writer.add_image("images/reconstructions", make_grid(pairs.cpu(), nrow=len(shown), pad_value=1), step)
    style_mu, _, class_mu, _ = encode(encoder, references)
    grid = grid_image(references, swap_cells(decoder, style_mu, class_mu))
    writer.add_image("images/swap_grid", grid, step)


def write_step_losses(writer, pending: list[tuple[int, torch.Tensor]]) -> None:
    """Write the loss means of the last --log-every steps queued in `pending` (read after a device sync,
    so reading them waits for nothing), then empty the queue."""
    for at, means in pending:
        for name, value in zip(LOG_FIELDS[2:5], means.tolist()):
            writer.add_scalar(f"loss_steps/{name}", value, at)
    pending.clear()


def training_data(args: argparse.Namespace, device: torch.device, world: distributed.World = distributed.World()
                  ) -> tuple[data_loader.Batches, data_loader.FolderData]:
    """The batches of the training images that --num-train and --classes select (runs.training_selection),
    this process's share of each under torchrun, and the data set (whose notes are printed first);
    records the image shape in `args`. UserError when the images are fewer than asked for or cannot
    fill one batch."""
    data = data_loader.load_data(data_loader.DataSpec.from_settings(vars(args)), progress=not args.no_progress)
    for note in data.notes:
        print(note, flush=True)
    args.image_shape = list(data.shape)
    split = data.train
    where = f"{args.dataset} training images" + f" of {args.data_dir}" * (args.dataset == data_loader.FOLDER)
    if args.classes is not None and args.dataset == data_loader.FOLDER:
        raise UserError("--classes selects labels of mnist or fashion-mnist; for folder data, list the groups "
                        "to train on in a --data-list file")
    if args.num_train is not None and args.num_train_of == NUM_TRAIN_OF and args.num_train > len(split.labels):
        raise UserError(f"--num-train {args.num_train} exceeds the {len(split.labels)} {where}; pass at most "
                        f"{len(split.labels)}, or leave it out to use them all")
    images, labels = training_selection(split.images, split.labels, args.num_train, args.classes, args.num_train_of)
    if args.hold_out_validation:
        if args.dataset != data_loader.FOLDER:
            raise UserError(f"--hold-out-validation is for folder data; on {args.dataset} pass --num-train "
                            f"{data_loader.VALIDATION_START} to leave the validation images unseen")
        keep = ~data_loader.validation_rows(labels, data_loader.align_test_groups(data.train, data.test) is None)
        images, labels = images[keep], labels[keep]
        where += " outside the validation split"
    if args.classes is not None:
        among = (f" among the first {args.num_train} (--num-train {args.num_train})"
                 if args.num_train is not None and args.num_train_of == NUM_TRAIN_OF else "")
        missing = sorted(set(args.classes) - set(labels.unique().tolist()))
        if missing:
            raise UserError(f"--classes: no {args.dataset} training image{among} has the label(s) {missing}")
        where += f" of --classes {' '.join(map(str, args.classes))}{among}"
    split = data_loader.ImageSplit(images, labels, split.groups)
    if args.images_per_group is not None:
        print(f"group-balanced batches of {args.groups_per_batch} groups x {args.images_per_group} images; "
              + data_loader.describe_groups(split.labels, args.images_per_group), flush=True)
    batches = data_loader.Batches(split, args.batch_size, device, args.groups_per_batch, args.images_per_group,
                                  args.group_size, world.rank, world.size)
    if batches.steps_per_epoch == 0:
        fix = ("pass a smaller --groups-per-batch or --images-per-group" if args.images_per_group
               else "pass a smaller --batch-size")
        size = (f"--groups-per-batch {args.groups_per_batch} x --images-per-group {args.images_per_group}"
                if args.images_per_group else f"--batch-size {args.batch_size}")
        raise UserError(f"the {len(split.labels)} {where} cannot fill one batch of {size}; {fix}")
    return batches, data


def restore_run(args: argparse.Namespace, encoder: Encoder, decoder: Decoder, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, repair: bool = True) -> dict:
    """Load the saved run into the networks, the optimizer and the generator; returns the saved state
    (its epoch, step, iteration, perm, totals and log say where the schedule stands). Rewrites the files
    of a save cut short when `repair` (in rank 0 only under torchrun)."""
    state = read_run_state(args.run_dir)
    if "encoder" not in state:  # saved before training_state.pt held the whole run
        state.update({name: torch.load(args.run_dir / f"{name}.pt", weights_only=True, map_location="cpu")
                      for name in ("encoder", "decoder")}, log=read_log(args.run_dir / "log.csv", state["epoch"]))
    encoder.load_state_dict(state["encoder"])
    decoder.load_state_dict(state["decoder"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    if repair:
        write_run(args.run_dir, {**state, "args": saved_args(args)})
    return state


class SilentWriter:
    """The TensorBoard writer of the processes other than rank 0 under torchrun: it writes nothing."""

    def __enter__(self) -> "SilentWriter":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_scalar(self, *args, **kwargs) -> None:
        pass


def open_writer(args: argparse.Namespace, iteration: int):
    """The run's TensorBoard writer, with its settings as text, and the event files of the run that
    --overwrite replaces (deleted at the first save)."""
    from tensorboardX import SummaryWriter  # imported late: it is slow to import

    log_dir = Path(args.log_dir) / args.run_name
    replaced_events = sorted(log_dir.glob("events.out.tfevents.*")) if args.overwrite else []
    # TensorBoard drops what the folder logged at the steps this run logs anew: after the last save on
    # --resume, everything for a new run (a run stopped before its first save, say).
    writer = SummaryWriter(str(log_dir), flush_secs=30, purge_step=iteration + 1 if args.resume else 0)
    settings = json.dumps(saved_args(args), indent=1, sort_keys=True)  # as args.json holds them
    writer.add_text("settings", "\n".join("    " + line for line in settings.splitlines()), iteration)
    return writer, replaced_events


def log_epoch(writer, log_rows: list[dict], epoch: int, iteration: int, means: list[float], rate: float) -> None:
    """Append the epoch's row to the log and write its means and speed to TensorBoard."""
    log_rows.append(dict(zip(LOG_FIELDS, [epoch + 1, iteration, *(f"{v:.6g}" for v in means), f"{rate:.0f}"])))
    for name, value in zip(LOG_FIELDS[2:5], means):
        writer.add_scalar(f"loss/{name}", value, iteration)
    writer.add_scalar("speed/images_per_s", rate, iteration)


def train(args: argparse.Namespace, world: distributed.World = distributed.World()) -> Path:
    """Run (or resume) the training described by parsed `args` as the process `world` says (one, or one
    of torchrun's, in the process group); returns the run folder."""
    device = args.device
    threads, why = pick_threads(args.threads)
    torch.set_num_threads(threads)
    with distributed.leader_first(world):
        batches, data = training_data(args, device, world)  # prints the data's notes first
    print(f"{args.run_name}: {device}, {threads} CPU thread{'s' * (threads > 1)} ({why})", flush=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        networks = build_networks(args.arch, args.style_dim, args.class_dim, args.likelihood, tuple(args.image_shape))
    except ValueError as error:  # an image shape the architecture has no stack for
        raise UserError(str(error)) from error
    encoder, decoder = (net.to(device) for net in networks)
    optimizer = make_optimizer(encoder, decoder, args)
    steps_per_epoch = batches.steps_per_epoch
    if world.leader:
        for tmp in args.run_dir.glob("*.tmp"):  # left by a process killed while saving
            tmp.unlink()
    position = restore_run(args, encoder, decoder, optimizer, generator, world.leader) if args.resume else {}
    epoch, step, iteration = (position.get(key, 0) for key in ("epoch", "step", "iteration"))
    perm = None if position.get("perm") is None else position["perm"].to(device)
    partial, log_rows = position.get("totals"), position.get("log", [])
    if epoch >= args.epochs:
        print(f"{args.run_dir} is already finished ({epoch} epochs, --epochs {args.epochs}); pass a larger "
              "--epochs to train it further")
        return args.run_dir
    step_fn = compile_step(optimizer, device) if args.compile else optimization_step
    writer, replaced_events = open_writer(args, iteration) if world.leader else (SilentWriter(), [])
    sources = tensorboard_sources(data.test, device) if args.image_every and world.leader else None
    window, window_start = torch.zeros(3, device=device), iteration  # loss sums of the --log-every window
    pending = []  # (iteration, window means) not yet read from the device

    def save(at_epoch: int, at_step: int, at_perm: torch.Tensor | None, at_totals: torch.Tensor | None) -> None:
        check_finite_save(encoder, decoder, at_totals, at_epoch, at_step)
        if world.leader:  # the processes hold the same weights, optimizer state and generator state
            save_run(args, encoder, decoder, optimizer, generator,
                     {"epoch": at_epoch, "step": at_step, "iteration": iteration, "log": log_rows,
                      "perm": None if at_perm is None else at_perm.cpu(),
                      "totals": None if at_totals is None else at_totals.cpu()})
        for path in replaced_events:
            path.unlink(missing_ok=True)
        replaced_events.clear()
        distributed.wait_for_all()  # no process ends before the save is whole

    epochs_bar = tqdm(range(epoch, args.epochs), initial=epoch, total=args.epochs, desc=args.run_name,
                      unit="epoch", disable=args.no_progress, dynamic_ncols=True)
    # A lost process is reported while the stop handlers still hold: torchrun's SIGTERM, which follows
    # a process's death at once, then cannot end this one before it has said why.
    with StopRequest() as stop, ends_on_a_lost_process(args, world), writer:
        for epoch in epochs_bar:
            if perm is None:
                perm = batches.epoch_order(generator)
            # The epoch's loss sums, carried over from the save when the run resumes in mid-epoch.
            totals = torch.zeros(3, device=device) if partial is None else partial.to(device)
            partial = None
            start, start_step = time.perf_counter(), step
            steps_bar = tqdm(range(step, steps_per_epoch), initial=step, total=steps_per_epoch, leave=False,
                             unit="batch", disable=args.no_progress, dynamic_ncols=True)
            for step in steps_bar:
                x, groups = batches.batch(perm, step)
                terms = train_step(encoder, decoder, optimizer, x, groups, batches.num_groups, args, generator,
                                   step_fn, world)
                totals += terms
                window += terms
                iteration += 1
                if iteration % args.log_every == 0:  # queued on the device, read at the next sync
                    pending.append((iteration, window / (iteration - window_start)))
                    window, window_start = torch.zeros_like(window), iteration
                if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == steps_per_epoch:
                    values = terms.tolist()
                    if not all(map(math.isfinite, values)):
                        raise TrainingDiverged(f"the loss became {values} at epoch {epoch + 1}, step {step + 1}")
                    write_step_losses(writer, pending)
                    rate = (step + 1 - start_step) * args.batch_size / (time.perf_counter() - start)
                    steps_bar.set_postfix(rec=f"{values[0]:.4f}", style_kl=f"{values[1]:.4f}",
                                          class_kl=f"{values[2]:.5f}", img_s=f"{rate:.0f}")
                if step + 1 < steps_per_epoch and stop.agreed(world, device, (step + 1) % PROGRESS_EVERY == 0):
                    write_step_losses(writer, pending)
                    save(epoch, step + 1, perm, totals)
                    stop.exit_saved(f"{args.run_dir} at epoch {epoch + 1}, step {step + 1}", resume_command(args),
                                    world.leader)
            steps_bar.close()
            rate = (steps_per_epoch - start_step) * args.batch_size / (time.perf_counter() - start)
            means = (totals / steps_per_epoch).tolist()
            if not all(map(math.isfinite, means)):
                raise TrainingDiverged(f"the mean loss of epoch {epoch + 1} became {means}")
            log_epoch(writer, log_rows, epoch, iteration, means, rate)
            if sources is not None and (epoch + 1) % args.image_every == 0:  # rank 0's, with --image-every
                log_images(writer, encoder, decoder, sources, iteration)
            epochs_bar.set_postfix(rec=f"{means[0]:.4f}", img_s=f"{rate:.0f}")
            step, perm = 0, None
            stopping = stop.agreed(world, device, synced=True)
            if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs or stopping:
                save(epoch + 1, 0, None, None)
            if stopping:
                stop.exit_saved(f"{args.run_dir} after epoch {epoch + 1}", resume_command(args), world.leader)
    print(f"Saved to {args.run_dir}")
    return args.run_dir


def last_save(run_dir: Path) -> str:
    """What the run folder keeps, for a message after a failure."""
    state = read_run_state(run_dir)
    return (f"{run_dir} keeps its last save (epoch {state['epoch']}, step {state['step']})" if state
            else "nothing was saved")


@contextlib.contextmanager
def ends_on_a_lost_process(args: argparse.Namespace, world: distributed.World) -> Iterator[None]:
    """Under torchrun, end with one `error:` line when another process of the run has gone (its
    collective raises here), saying what the run folder keeps and how to continue."""
    try:
        yield
    except RuntimeError as error:
        if not distributed.lost_peer(error):
            raise
        cause = str(error).splitlines()[0]
        fail(f"process {world.rank} of {world.size}: another process of the run ended ({cause}); "
             f"{last_save(args.run_dir)}; continue with {resume_command(args)}", 1)


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    world = distributed.world_from_environment()
    # Under torchrun every process parses the same flags: rank 0 alone reports a bad one, and alone
    # prints and shows progress bars.
    with contextlib.nullcontext() if world.leader else contextlib.redirect_stderr(io.StringIO()):
        args = parse_args(argv)
    args.no_progress = args.no_progress or not world.leader  # rank 0 alone writes args.json
    set_float32_precision(args.precision)
    with distributed.process_group(world, args.device), ends_on_a_lost_process(args, world), \
            contextlib.nullcontext() if world.leader else contextlib.redirect_stdout(io.StringIO()):
        try:
            return train(args, world)
        except TrainingDiverged as error:
            if not world.leader:
                sys.exit(1)
            fp32 = " or --precision fp32" if args.precision != "fp32" else ""
            fail(f"{error}; {last_save(args.run_dir)}. Start a new run (another --run-name) with a lower --lr than "
                 f"{args.lr:g}{fp32}", 1)


if __name__ == "__main__":
    main()
