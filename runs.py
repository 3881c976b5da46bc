"""Run folders and script plumbing: atomic files, devices, the shared argparse flags and loading a
trained model from its run folder (encoder.pt, decoder.pt, args.json), with every failure turned into
a message that names the file and the fix.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data_loader import DATASETS, EVALUATION_SPLITS, VALIDATION_START
from networks import LIKELIHOODS, Decoder, Encoder

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


LOG_FIELDS = ("epoch", "iteration", "reconstruction", "style_kl", "class_kl", "images_per_s")


def read_log(path: Path, up_to_epoch: int | None = None) -> list[dict]:
    """The rows of a run's log.csv (those up to `up_to_epoch` when given); [] when there is none."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [row for row in csv.DictReader(f) if up_to_epoch is None or int(row["epoch"]) <= up_to_epoch]


def write_log(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())
