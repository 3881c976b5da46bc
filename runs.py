"""Run folders and script plumbing: atomic files, devices, the shared argparse flags and loading a
trained model from its run folder (encoder.pt, decoder.pt, args.json), with every failure turned into
a message that names the file and the fix.
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn

import torch

from data_loader import (DATASET_CHOICES, EVALUATION_SPLITS, FOLDER, REPOSITORY, VALIDATION_START, DataSpec,
                         DatasetFileError, file_sha256)
from networks import ARCHS, LIKELIHOODS, Decoder, Encoder, build_networks


class UserError(RuntimeError):
    """A bad flag, file or value: the message names it and the fix; a script prints it as one line."""


def fail(message: str, code: int = 2) -> NoReturn:
    """End the script with the one line `error: <message>` on stderr and exit status `code`."""
    print("error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)
    sys.exit(code)


def reports_errors(main: Callable) -> Callable:
    """Decorate a script's `main(argv)`: the project's own errors (and a file that cannot be read or
    written) end as one `error:` line and exit status 2, never as a traceback."""

    @functools.wraps(main)
    def checked_main(argv: list[str] | None = None):
        try:
            return main(argv)
        except (UserError, DatasetFileError) as error:
            fail(str(error))
        except OSError as error:
            fail(f"{error}; check that path and its permissions")
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return checked_main


class Bounded:
    """An argparse type: a finite int or float within the bounds given; `low_open`/`high_open`
    exclude the bound itself."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        noun = "an integer" if kind is int else "a number"
        if low is not None and high is not None:
            self.wanted = f"{noun} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            self.wanted = f"{noun} {'>' if low_open else '>='} {low:g}"
        else:
            self.wanted = f"a finite {'integer' if kind is int else 'number'}"
        self.__name__ = self.wanted  # argparse names the type in some of its messages

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.wanted}, got {text!r}") from None
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected {self.wanted}, got {text}")
        return value


POSITIVE_INT = Bounded(int, 1)
NONNEGATIVE_INT = Bounded(int, 0)
FINITE = Bounded(float)
NONNEGATIVE = Bounded(float, 0)
POSITIVE = Bounded(float, 0, low_open=True)
BETA = Bounded(float, 0, 1, high_open=True)  # Adam's betas


def repository_path(relative: str) -> str:
    """A default path of a flag: `relative` inside the repository, whichever folder a script runs from.
    It reads as given where the working directory is the repository, else as an absolute path. A path
    the user passes stays relative to the working directory."""
    return relative if Path.cwd().resolve() == REPOSITORY else str(REPOSITORY / relative)


def add_data_arguments(parser: argparse.ArgumentParser, from_run: bool = False) -> None:
    """The flags that choose the data (the fields of DataSpec). With `from_run`, for the scripts that
    evaluate a trained run, they default to None: the run's args.json then supplies them."""
    add = parser.add_argument

    def default(value):
        return None if from_run else value

    run = " (default: the run's, from args.json)" if from_run else ""
    add("--dataset", choices=DATASET_CHOICES, default=default("mnist"),
        help=f"mnist or fashion-mnist (IDX files), or folder: grouped images under --data-dir (docs/data.md){run}")
    add("--data-dir", default=default(repository_path("data")),
        help=f"IDX data sets: the folder holding <Dataset>/raw/; folder: the data set's root{run}")
    add("--data-list", default=None, help="folder data: a file of `relative/path group [split]` lines")
    add("--split-list", default=None, help="folder data: a file of `relative/path split` lines (0/1 train, 2 test)")
    add("--image-size", type=POSITIVE_INT, default=None,
        help="folder data: resize the shorter side to N and centre-crop NxN (default: the images' own size)")
    add("--channels", type=int, choices=(1, 3), default=None,
        help="folder data: 1 (grayscale) or 3 (RGB) (default: 3 when any image is colour, else 1)")
    add("--cache-dir", default=None, help="folder data: where decoded images are cached (default: cache/)")


def folder_name(text: str) -> str:
    """An argparse type: a single folder name, not a path (so a run stays inside its --checkpoint-dir)."""
    if text in ("", ".", "..") or any(sep in text for sep in ("/", "\\", "\0")):
        raise argparse.ArgumentTypeError(f"expected a folder name without '/', got {text!r}; "
                                         "choose the parent folder with --checkpoint-dir")
    return text


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what torchvision's save_image writes
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # what matplotlib writes


def check_writable(path: str | Path, flag: str, suffixes: tuple[str, ...] | None = None,
                   folder: bool = False) -> Path:
    """Raise UserError unless `path` can be written (as a folder when `folder`, else as a file whose
    name ends in one of `suffixes`), before any work starts: it must not be of the other kind, and its
    nearest existing parent must be a writable folder. Returns the path."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; give a folder")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: give a file name ending in {' or '.join(suffixes)}")
    parent = (path if folder else path.parent).absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; give another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {parent} is not writable; give another path")
    return path


def check_label_counts(labels: torch.Tensor, classes, needed: int, split: str, flag: str) -> None:
    """Raise UserError unless every label of `classes` has at least `needed` images among `labels`;
    `flag` names the flag that asks for them and `split` the images, e.g. "mnist test"."""
    counts = {label: int((labels == label).sum()) for label in classes}
    for label, have in counts.items():
        if have == 0:
            raise UserError(f"the {split} images hold no image of label {label}")
        if have < needed:
            raise UserError(f"{flag} {needed} exceeds the {have} {split} images of label {label}; pass at most "
                            f"{min(counts.values())}")


def check_finite(results, what: str) -> None:
    """Raise UserError naming the first number in `results` (nested dicts and lists) that is NaN or
    infinite, so that no script prints or writes one."""
    stack = [("", results)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{key}.{k}".strip("."), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{what}: {key} came out as {value}, not a finite number (are the model's weights "
                            "finite?); nothing was written")


def torch_bytes(obj: object) -> bytes:
    """What torch.save writes for `obj`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `<path>.tmp`, fsync it and rename it over `path` (then fsync the folder): whenever the
    process dies, `path` holds the old bytes or the new ones, and a failed write removes the .tmp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_save(obj: object, path: str | Path) -> None:
    """torch.save through write_bytes_atomic: a crash mid-save never leaves a broken file."""
    write_bytes_atomic(path, torch_bytes(obj))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file through write_bytes_atomic."""
    write_bytes_atomic(path, text.encode())


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


def device_flag(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """pick_device(args.device); a device that cannot be used is an argparse-style error naming --device."""
    try:
        return pick_device(args.device)
    except ValueError as error:
        parser.error(f"--device: {error}")


PRECISIONS = ("fp32", "tf32", "bf16")  # training.py --precision


def set_float32_precision(precision: str) -> None:
    """How float32 matmuls and convolutions run for --precision `precision`: in strict IEEE fp32 for
    fp32 (and for bf16, whose autocast covers the networks and leaves the rest in fp32); for tf32, in
    TF32 where the hardware has it (Ampere and newer GPUs, oneDNN on CPUs with TF32 units): inputs
    rounded to a 10-bit mantissa, products summed in fp32."""
    tf32 = precision == "tf32"
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32  # cuDNN convolutions: torch allows TF32 unless told otherwise


def idle_cpus(interval: float = 0.1) -> float | None:
    """How many of the CPUs this process may run on sat idle over the next `interval` seconds, from the
    kernel's per-CPU time counters (/proc/stat); None off Linux."""
    stat = Path("/proc/stat")
    if not stat.is_file() or not hasattr(os, "sched_getaffinity"):
        return None
    cpus = {f"cpu{index}" for index in os.sched_getaffinity(0)}

    def counters() -> dict[str, list[int]]:  # user nice system idle iowait irq softirq steal ...
        rows = (line.split() for line in stat.read_text().splitlines())
        return {row[0]: [int(value) for value in row[1:9]] for row in rows if row and row[0] in cpus}

    before = counters()
    time.sleep(interval)
    idle = 0.0
    for cpu, now in counters().items():
        spent = [a - b for a, b in zip(now, before[cpu])]
        idle += (spent[3] + spent[4]) / sum(spent) if sum(spent) else 1.0
    return idle


def idle_threads() -> tuple[int, str]:
    """One thread per CPU (of those this process may use) idle right now, at least one, and why; all of
    them where the idle time cannot be read."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = idle_cpus()
    if idle is None:
        return cpus, f"{cpus} CPUs"
    return max(1, min(cpus, int(idle + 0.5))), f"{idle:.1f} of {cpus} CPUs idle at start"


def pick_threads(requested: int | None = None) -> tuple[int, str]:
    """CPU threads for torch, and why: `requested` when given, else OMP_NUM_THREADS when set, else
    idle_threads().

    OpenMP threads wait for each other at every op: a thread that shares its core with a busy process
    holds up the others, so two threads beside one busy process on two cores run slower than one.
    """
    if requested is not None:
        return requested, "--threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return idle_threads()


MODEL_DEFAULTS = {"arch": "mlp", "style_dim": 10, "class_dim": 10, "eps_std": 0.1, "likelihood": "mse",
                  "image_shape": [1, 28, 28]}
DATA_DEFAULTS = DataSpec()  # runs saved before args.json recorded their data read MNIST
DEFAULT_RUN = "checkpoints/mlvae_eps0.1"  # inside the repository: repository_path(DEFAULT_RUN)


class ModelLoadError(UserError):
    """A model file is missing, unreadable or of other shapes; the message names the file and the fix."""


@dataclass
class ModelSettings:
    """What an evaluation needs to know about a trained model, resolved from flags and args.json."""

    arch: str
    style_dim: int
    class_dim: int
    eps_std: float
    likelihood: str
    image_shape: list[int]  # [channels, height, width]
    data: DataSpec
    encoder_path: Path
    decoder_path: Path
    state: dict | None = field(default=None, repr=False)  # the run's training_state.pt, when it has one
    trained: dict = field(default_factory=dict, repr=False)  # the run's args.json; {} for weights without one

    @property
    def dataset(self) -> str:
        return self.data.dataset

    @property
    def name(self) -> str:
        """A short name for output files: the run folder's name, or the encoder file's name."""
        path = self.encoder_path
        return path.parent.name if path.name == "encoder.pt" else path.name.removesuffix(".pt")

    def weights(self) -> dict[str, str]:
        """The weight files and their SHA-256, so that a result can be matched to the weights it measured."""
        return {"encoder": str(self.encoder_path), "decoder": str(self.decoder_path),
                "encoder_sha256": file_sha256(self.encoder_path), "decoder_sha256": file_sha256(self.decoder_path)}


class Parser(argparse.ArgumentParser):
    """argparse whose errors are the one line `error: ...` (no usage block), like every other error."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def script_parser(doc: str) -> Parser:
    """The parser each script starts from: its docstring's first paragraph, and defaults shown in --help."""
    return Parser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)


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
    add("--checkpoint-dir", default=repository_path(DEFAULT_RUN),
        help="run folder holding encoder.pt, decoder.pt and args.json")
    add("--encoder", default=None, help="encoder state_dict (any file name; default: <checkpoint-dir>/encoder.pt)")
    add("--decoder", default=None, help="decoder state_dict (any file name; default: <checkpoint-dir>/decoder.pt)")
    add("--style-dim", type=POSITIVE_INT, default=None,
        help=f"style dimension (default: from args.json beside the encoder, else {MODEL_DEFAULTS['style_dim']})")
    add("--class-dim", type=POSITIVE_INT, default=None,
        help=f"class dimension (default: from args.json, else {MODEL_DEFAULTS['class_dim']})")
    add("--eps-std", type=POSITIVE, default=None,
        help=f"std of the per-group noise the model was trained with (default: from args.json, "
             f"else {MODEL_DEFAULTS['eps_std']}); pass it for weights without args.json")
    add("--arch", choices=ARCHS, default=None,
        help=f"the networks (default: from args.json, else {MODEL_DEFAULTS['arch']}, the reference's MLP)")
    add("--likelihood", choices=LIKELIHOODS, default=None,
        help=f"the decoder's likelihood (default: from args.json, else {MODEL_DEFAULTS['likelihood']})")
    add_data_arguments(parser, from_run=True)
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")


def add_split_argument(parser: argparse.ArgumentParser) -> None:
    start = VALIDATION_START
    parser.add_argument("--split", choices=EVALUATION_SPLITS, default="test",
                        help=f"test: fit on the train split, report the test split; validation: fit on train "
                             f"images [0, {start}), report train images [{start}, end) as 'test' (for "
                             f"choosing settings; refused for a model whose args.json does not show that it "
                             f"trained on none of them: train it with --num-train {start})")


def read_json(path: Path) -> dict:
    """A JSON object from `path`; UserError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); restore or delete it") from error
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object; restore or delete it")
    return value


def resolve_settings(args: argparse.Namespace) -> ModelSettings:
    """Each setting from its flag when given, else from the run's training_state.pt or args.json beside
    the encoder, else the default."""
    encoder_path = Path(args.encoder or Path(args.checkpoint_dir) / "encoder.pt")
    decoder_path = Path(args.decoder or Path(args.checkpoint_dir) / "decoder.pt")
    run_dir = encoder_path.parent
    state = read_run_state(run_dir) if encoder_path.name == "encoder.pt" else None
    if state is not None:
        saved = state["args"]
    else:
        saved = read_json(run_dir / "args.json") if (run_dir / "args.json").is_file() else {}
    values = {key: saved.get(key, default) if getattr(args, key, None) is None else getattr(args, key)
              for key, default in MODEL_DEFAULTS.items()}
    data = {key: saved.get(key, getattr(DATA_DEFAULTS, key)) if getattr(args, key) is None else getattr(args, key)
            for key in DataSpec.__dataclass_fields__}
    if args.data_dir is None and data["dataset"] != FOLDER:  # IDX files: the repository's, whatever args.json says
        data["data_dir"] = repository_path("data")
    return ModelSettings(**values, data=DataSpec.from_settings(data), encoder_path=encoder_path,
                         decoder_path=decoder_path, state=state, trained=saved)


# What training.py --num-train counts: the first N images of the train split, of which --classes then
# keeps its labels. Runs saved before args.json recorded `num_train_of` counted N among the images of
# --classes instead, so that their N images could reach past the start of the validation split.
NUM_TRAIN_OF = "split"
NUM_TRAIN_OF_BEFORE = "classes"


def training_selection(images: torch.Tensor, labels: torch.Tensor, num_train: int | None,
                       classes: list[int] | None, num_train_of: str = NUM_TRAIN_OF
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels of the train split that a run with these settings trains on, in split
    order: the first `num_train` (all when None), of which those with a label in `classes` (all when
    None); with num_train_of=NUM_TRAIN_OF_BEFORE, the first `num_train` of those of `classes`."""
    if num_train is not None and num_train_of == NUM_TRAIN_OF:
        images, labels = images[:num_train], labels[:num_train]
    if classes is not None:
        keep = torch.isin(labels, torch.tensor(classes, device=labels.device))
        images, labels = images[keep], labels[keep]
    if num_train is not None and num_train_of == NUM_TRAIN_OF_BEFORE:
        images, labels = images[:num_train], labels[:num_train]
    return images, labels


def check_validation_unseen(settings: ModelSettings, train_labels: torch.Tensor) -> None:
    """Raise UserError unless the model never trained on a validation image (train images
    [VALIDATION_START, end) of the data set it is evaluated on), as its args.json records; weights
    without an args.json do not say, and are refused too. `train_labels`: those of the whole train split."""
    run = settings.encoder_path.parent
    instead = (f"pass --split test, or choose settings with a model trained by training.py with --num-train "
               f"{VALIDATION_START} (its first {VALIDATION_START} train images)")
    trained = settings.trained
    if not trained:
        raise UserError(f"--split validation: {run} has no args.json to say which images {settings.encoder_path.name} "
                        f"trained on, so its validation images may have been among them; {instead}")
    if trained.get("dataset", DATA_DEFAULTS.dataset) != settings.dataset:
        return  # trained on another data set: it saw none of these images
    if settings.dataset == FOLDER:
        if not trained.get("hold_out_validation"):
            raise UserError(f"--split validation: {run} trained on every train image of {settings.data.data_dir}, "
                            "the validation images among them; pass --split test, or choose settings with a model "
                            "trained by training.py with --hold-out-validation")
        return
    num_train, classes = trained.get("num_train"), trained.get("classes")
    seen, _ = training_selection(torch.arange(len(train_labels), device=train_labels.device), train_labels,
                                 num_train, classes, trained.get("num_train_of", NUM_TRAIN_OF_BEFORE))
    if len(seen) and int(seen.max()) >= VALIDATION_START:
        limit = f"--num-train {num_train}" if num_train is not None else "no --num-train"
        of_classes = "" if classes is None else f" of --classes {' '.join(map(str, classes))}"
        raise UserError(f"--split validation: {run} trained on {settings.dataset} train images{of_classes} up to "
                        f"index {int(seen.max())} ({limit} in its args.json), so it saw validation images (train "
                        f"images {VALIDATION_START} on) and their scores would measure training images; {instead}")


def _read_state_dict(path: Path, device: torch.device) -> dict:
    """A state_dict from `path`, with every failure turned into a ModelLoadError."""
    if not path.is_file():
        raise ModelLoadError(f"no weights at {path}; train a model with `python training.py`, or point "
                             "--checkpoint-dir at a run folder (or --encoder/--decoder at the files)")
    try:
        state = torch.load(path, weights_only=True, map_location=device)
    except Exception as error:  # pickle, zip and torch errors all mean the same thing here
        raise ModelLoadError(f"{path} cannot be read as a state_dict ({_first_line(error)})") from error
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def _load_state_dict(module: torch.nn.Module, state: dict, path: Path, expected: str,
                     held: Callable[[dict], str]) -> None:
    """load_state_dict(strict), a mismatch turned into a ModelLoadError naming `path`."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ModelLoadError(f"{path} does not fit the expected {expected}: {held(state)}; pass the "
                             "model's --arch/--style-dim/--class-dim/--likelihood") from error


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[Encoder, Decoder, ModelSettings]:
    """Build the encoder and decoder the flags describe and load their weights (strict, weights_only).

    In a run folder with a training_state.pt whose encoder.pt or decoder.pt are not the ones it
    recorded (a save cut short), the weights come from training_state.pt, with a note on stderr.
    Returns (encoder, decoder, settings), both networks in eval mode on `device`. Raises
    ModelLoadError with a message naming the file for missing, unreadable or mismatched weights.
    """
    settings = resolve_settings(args)
    dims = f"--arch {settings.arch} --style-dim {settings.style_dim} --class-dim {settings.class_dim}"

    def encoder_holds(state: dict) -> str:
        if "style_mu.weight" in state and "class_mu.weight" in state:
            arch = "conv" if "conv_model.0.weight" in state else "mlp"
            return (f"the file holds {arch} encoder weights of style dim {state['style_mu.weight'].shape[0]}, "
                    f"class dim {state['class_mu.weight'].shape[0]}")
        return f"the file holds the keys {sorted(state)[:4]}..."

    def decoder_holds(state: dict) -> str:
        if "style_input.weight" in state and "class_input.weight" in state:
            return (f"the file holds a conv decoder of style dim {state['style_input.weight'].shape[1]}, "
                    f"class dim {state['class_input.weight'].shape[1]}")
        first = state.get("linear_model.linear_1.weight")
        inputs = f"style + class dim {first.shape[1]}" if first is not None else f"keys {sorted(state)[:4]}..."
        kind = "gaussian" if "pixel_logvar.weight" in state else "mse or bernoulli"
        return f"the file holds {inputs}, a {kind} likelihood head"

    run_dir = settings.encoder_path.parent
    stale = stale_files(run_dir, settings.state) if settings.state is not None else []
    weights = {}
    for name, path in (("encoder", settings.encoder_path), ("decoder", settings.decoder_path)):
        if path == run_dir / f"{name}.pt" and f"{name}.pt" in stale:
            weights[name] = settings.state[name]
        else:
            weights[name] = _read_state_dict(path, device)
    if any(name in stale for name in ("encoder.pt", "decoder.pt")):
        print(f"note: {run_dir}: {' and '.join(stale)} are not from its last save (one was cut short); "
              f"using the weights in {STATE_FILE}. `python training.py --checkpoint-dir {run_dir.parent} "
              f"--run-name {run_dir.name} --resume` rewrites them.", file=sys.stderr)
    try:
        encoder, decoder = build_networks(settings.arch, settings.style_dim, settings.class_dim, settings.likelihood,
                                          tuple(settings.image_shape))
    except ValueError as error:
        raise ModelLoadError(f"{run_dir}: {error}") from error
    encoder, decoder = encoder.to(device), decoder.to(device)
    _load_state_dict(encoder, weights["encoder"], settings.encoder_path, f"encoder with {dims}", encoder_holds)
    _load_state_dict(decoder, weights["decoder"], settings.decoder_path,
                     f"decoder with {dims} --likelihood {settings.likelihood}", decoder_holds)
    return encoder.eval(), decoder.eval(), settings


def device_and_models(parser: argparse.ArgumentParser,
                      args: argparse.Namespace) -> tuple[torch.device, Encoder, Decoder, ModelSettings]:
    """The device and the trained model that the flags of `add_model_arguments` name; every problem
    (bad device, missing or mismatched weights) ends in an argparse-style error."""
    device = device_flag(parser, args)
    try:
        encoder, decoder, settings = load_models(args, device)
    except ModelLoadError as error:
        parser.error(str(error))
    return device, encoder, decoder, settings


LOG_FIELDS = ("epoch", "iteration", "reconstruction", "style_kl", "class_kl", "images_per_s")


def read_log(path: Path, up_to_epoch: int | None = None) -> list[dict]:
    """The rows of a run's log.csv (those up to `up_to_epoch` when given); [] when there is none.
    UserError naming the line when the file is not a log written by training.py."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        try:
            rows = list(csv.DictReader(file))
        except (csv.Error, UnicodeDecodeError) as error:
            raise UserError(f"{path} is not a CSV file ({error}); restore it from training_state.pt with "
                            "training.py --resume, or from git") from error
    for number, row in enumerate(rows, start=2):
        try:
            row_ok = set(LOG_FIELDS) <= set(row) and all(math.isfinite(float(row[key])) for key in LOG_FIELDS)
            int(row["epoch"])
        except (TypeError, ValueError):
            row_ok = False
        if not row_ok:
            raise UserError(f"{path} line {number} is not a log row with finite {', '.join(LOG_FIELDS)}; "
                            "restore it from training_state.pt with training.py --resume, or from git")
    return [row for row in rows if up_to_epoch is None or int(row["epoch"]) <= up_to_epoch]


def log_text(rows: list[dict]) -> str:
    """log.csv's text: a header of LOG_FIELDS, then one line per epoch."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


# A run folder: training_state.pt holds the whole run (weights, optimizer, random state, position in the
# schedule, args and log rows) and the SHA-256 of every other file, each derived from it.
STATE_FILE = "training_state.pt"
RUN_FILES = ("encoder.pt", "decoder.pt", "args.json", "log.csv")
STATE_KEYS = {"epoch", "step", "iteration", "optimizer", "generator", "args"}


def _first_line(error: Exception) -> str:
    """An exception as one short line (torch's messages span many)."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def run_files(state: dict) -> dict[str, bytes]:
    """The bytes of every file of RUN_FILES, from a training state alone."""
    return {"encoder.pt": torch_bytes(state["encoder"]), "decoder.pt": torch_bytes(state["decoder"]),
            "args.json": (json.dumps(state["args"], indent=1, sort_keys=True) + "\n").encode(),
            "log.csv": log_text(state["log"]).encode()}


def write_run(run_dir: Path, state: dict) -> None:
    """Save a run so that a crash at any instant loses at most this save: training_state.pt (with the
    SHA-256 of each other file) first, then each file of RUN_FILES from it, every one atomically. A
    crash between the writes leaves files that differ from the recorded hashes: `load_models` then
    takes the weights from training_state.pt, and training.py --resume rewrites the files."""
    files = run_files(state)
    state = {**state, "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    write_bytes_atomic(run_dir / STATE_FILE, torch_bytes(state))
    for name, data in files.items():
        write_bytes_atomic(run_dir / name, data)


def read_run_state(run_dir: Path) -> dict | None:
    """The run's training_state.pt on the CPU, or None where there is none; UserError if unreadable."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # pickle, zip and torch errors all mean the same thing here
        raise UserError(f"{path} cannot be read ({_first_line(error)}); move it away to use the run's "
                        "encoder.pt and decoder.pt as they are (the run can then not be resumed)") from error
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise UserError(f"{path} is not a training state written by training.py; move it away to use the "
                        "run's encoder.pt and decoder.pt as they are (the run can then not be resumed)")
    return state


def stale_files(run_dir: Path, state: dict) -> list[str]:
    """The files of RUN_FILES in `run_dir` that are not the ones `state` recorded (a save cut short);
    [] for a state written before training_state.pt recorded them."""
    stale = []
    for name, digest in state.get("files", {}).items():
        path = Path(run_dir) / name
        if not path.is_file() or file_sha256(path) != digest:
            stale.append(name)
    return stale
