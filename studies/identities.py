"""A colour data set with known style factors, made from MNIST: each identity (a group) is one MNIST glyph,
each of its members a 32x32 RGB rendering of that glyph under a rotation, a scale, a translation, a stroke
colour and a background colour drawn independently for each member.

Train identities are MNIST train images and test identities MNIST test images, so no test glyph is seen in
training. The images go to `<out>/<split>/<identity>/<member>.png`, one folder per identity (the folder data
layout: the folder is the group), and every image's identity, digit and factor values to
`<out>/factors.csv`; `<out>/info.json` holds the seed, the sizes, the factor ranges and the command. The
same seed gives byte-identical files.

    python -m studies.identities
    python -m studies.identities --train-identities 100 --test-identities 20 --out /tmp/identities_small

The data set appears at --out only once it is complete: it is written into a hidden `.<name>.<pid>.tmp`
folder beside --out and renamed into place (one rename instead of an fsync per image), so a run that fails
or is interrupted leaves --out as it was.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import shlex
import shutil
import sys
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data_loader
from runs import POSITIVE_INT, UserError, reports_errors, script_parser, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
SPLITS = ("train", "test")
MNIST_SIZE = data_loader.IMAGE_SIZE  # 28
SIZE = 32  # rendered images are SIZE x SIZE RGB
BASE_MAGNIFICATION = 0.75  # output pixels per MNIST pixel at scale 1: the MNIST digit box (20 px) becomes 15 px
# Each factor is drawn uniformly from its range, independently for every member. background_hue_offset_deg is
# the background hue minus the stroke hue: 180 +/- 60 degrees keeps the two colours at least 120 degrees
# apart on the hue circle.
RANGES = {
    "rotation_deg": (-45.0, 45.0),  # counter-clockwise on screen, about the frame's centre
    "scale": (0.8, 1.2),  # relative to BASE_MAGNIFICATION
    "translate_x": (-4.0, 4.0),  # pixels, to the right
    "translate_y": (-4.0, 4.0),  # pixels, downwards
    "stroke_hue_deg": (0.0, 360.0),
    "background_hue_offset_deg": (120.0, 240.0),
}
SATURATION = 1.0  # of both colours (HSV)
VALUE = 1.0  # of both colours (HSV)
DECIMALS = 4  # factors are rounded to what the CSV holds before rendering, so the CSV re-renders each image
FACTORS = ("rotation_deg", "scale", "translate_x", "translate_y", "stroke_hue_deg", "background_hue_deg")
# factors.csv: column -> type; ink_outside is the fraction of the glyph's ink (MNIST pixel values) whose pixel
# centres land outside the frame.
COLUMNS = {"split": str, "file": str, "identity": str, "digit": int, "mnist_index": int, "member": int,
           **{name: float for name in FACTORS}, "ink_outside": float}
GENERATOR = "studies.identities"  # info.json's "generator": marks a folder this script may replace
RENDER_CHUNK = 4096  # images rendered at once: one affine_grid and grid_sample call, bounded memory
WRITE_CHUNK = 256  # PNG files per writer task


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--train-identities", type=POSITIVE_INT, default=10000,
                        help="identities drawn from the MNIST train images (at most 60000)")
    parser.add_argument("--test-identities", type=POSITIVE_INT, default=2000,
                        help="identities drawn from the MNIST test images (at most 10000), never seen in training")
    parser.add_argument("--members", type=POSITIVE_INT, default=8, help="renderings of each identity")
    parser.add_argument("--seed", type=int, default=0, help="seed of the identity choice and the factor draws")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "identities",
                        help="folder to write, by default data/identities under the repository root")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it is not empty (only a data set this script wrote)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data",
                        help="folder holding MNIST/raw/ IDX files, by default data/ under the repository root")
    parser.add_argument("--workers", type=POSITIVE_INT, default=CPUS,
                        help="processes writing PNG files (1: the main process alone)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def split_generator(seed: int, split: str) -> torch.Generator:
    """The generator of one split's draws: each split depends only on --seed and its own sizes."""
    return torch.Generator().manual_seed(2 * seed + SPLITS.index(split))


def uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """`count` float64 draws from U[low, high), rounded to DECIMALS places."""
    draws = low + (high - low) * torch.rand(count, dtype=torch.float64, generator=generator)
    return torch.round(draws, decimals=DECIMALS)


def draw_factors(count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The factors of `count` renderings, each drawn independently (float64 [count] per name of FACTORS)."""
    factors = {name: uniform(count, *RANGES[name], generator) for name in FACTORS[:4]}
    stroke = uniform(count, *RANGES["stroke_hue_deg"], generator) % 360.0
    offset = uniform(count, *RANGES["background_hue_offset_deg"], generator)
    factors["stroke_hue_deg"] = stroke
    factors["background_hue_deg"] = torch.round((stroke + offset) % 360.0, decimals=DECIMALS) % 360.0
    return factors


def hsv_to_rgb(hue_deg: torch.Tensor, saturation: float, value: float) -> torch.Tensor:
    """RGB in [0, 1], [N, 3], of the HSV colours with hues `hue_deg` [N] (degrees):
    channel n in (5, 3, 1) for (R, G, B) is V - V S clamp(min(k, 4 - k), 0, 1), k = (n + H / 60) mod 6."""
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=hue_deg.dtype) + hue_deg[:, None] / 60.0) % 6.0
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def affine_matrices(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The [N, 2, 3] matrices for F.affine_grid that draw each glyph rotated, scaled and translated.

    A glyph point p (pixels from the centre, y downwards) lands at m R p + t, with m = BASE_MAGNIFICATION
    * scale, R the counter-clockwise (on screen) rotation and t the translation. affine_grid wants the
    inverse, p = R^T (o - t) / m, in coordinates where the 32-pixel frame spans [-1, 1].
    """
    angle = torch.deg2rad(factors["rotation_deg"].float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = BASE_MAGNIFICATION * factors["scale"].float()
    tx, ty = (2.0 * factors[name].float() / SIZE for name in ("translate_x", "translate_y"))
    first = torch.stack([cos / m, -sin / m, -(cos * tx - sin * ty) / m], dim=1)
    second = torch.stack([sin / m, cos / m, -(sin * tx + cos * ty) / m], dim=1)
    return torch.stack([first, second], dim=1)


def transform_glyphs(glyphs: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ink [N, 1, 32, 32] in [0, 1] of MNIST glyphs [N, 1, 28, 28] under their factors (bilinear).

    The glyph is padded to 32x32 first, so magnification 1 with no rotation or translation returns it
    unchanged in the middle of the frame.
    """
    pad = (SIZE - MNIST_SIZE) // 2
    padded = F.pad(glyphs, (pad, pad, pad, pad))
    grid = F.affine_grid(affine_matrices(factors), [len(glyphs), 1, SIZE, SIZE], align_corners=False)
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0.0, 1.0)


def colourise(ink: torch.Tensor, stroke_rgb: torch.Tensor, background_rgb: torch.Tensor) -> torch.Tensor:
    """RGB images [N, 3, H, W]: background (1 - ink) + stroke ink, with ink [N, 1, H, W] and colours [N, 3]."""
    return background_rgb[:, :, None, None] * (1.0 - ink) + stroke_rgb[:, :, None, None] * ink


def render(glyphs: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 RGB renderings [N, 3, 32, 32] of MNIST glyphs [N, 1, 28, 28] under their factors (FACTORS)."""
    stroke, background = (hsv_to_rgb(factors[name].float(), SATURATION, VALUE)
                          for name in ("stroke_hue_deg", "background_hue_deg"))
    rgb = colourise(transform_glyphs(glyphs, factors), stroke, background)
    return rgb.mul(255.0).round().to(torch.uint8)


def ink_outside(glyphs: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fraction [N] of each glyph's ink (its MNIST pixel values) whose pixel centres the factors move
    outside the 32x32 frame."""
    centres = torch.arange(MNIST_SIZE, dtype=torch.float32) - (MNIST_SIZE - 1) / 2
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    angle = torch.deg2rad(factors["rotation_deg"].float())[:, None, None]
    m = (BASE_MAGNIFICATION * factors["scale"].float())[:, None, None]
    out_x = m * (torch.cos(angle) * x + torch.sin(angle) * y) + factors["translate_x"].float()[:, None, None]
    out_y = m * (-torch.sin(angle) * x + torch.cos(angle) * y) + factors["translate_y"].float()[:, None, None]
    outside = (out_x.abs() > SIZE / 2) | (out_y.abs() > SIZE / 2)
    ink = glyphs[:, 0]
    return (ink * outside).sum((1, 2)) / ink.sum((1, 2)).clamp_min(1e-12)


def identity_name(split: str, mnist_index: int, digit: int) -> str:
    """The identity's folder name: its split, its MNIST index (fixed width, so names sort by index) and digit."""
    return f"{split}_{mnist_index:05d}_d{digit}"


def member_name(member: int, members: int) -> str:
    """A member's file name, zero-padded so that the names sort in member order."""
    return f"{member:0{max(2, len(str(members - 1)))}d}.png"


def split_columns(split: str, mnist_indices: torch.Tensor, digits: torch.Tensor, members: int,
                  factors: dict[str, torch.Tensor], outside: torch.Tensor) -> dict[str, list]:
    """The factors.csv columns (COLUMNS) of one split, identity-major: identity 0's members first."""
    names = [identity_name(split, index, digit) for index, digit in zip(mnist_indices.tolist(), digits.tolist())]
    members_files = [member_name(member, members) for member in range(members)]
    columns = {"split": [split] * (len(names) * members),
               "file": [f"{split}/{name}/{file}" for name in names for file in members_files],
               "identity": [name for name in names for _ in range(members)],
               "digit": digits.repeat_interleave(members).tolist(),
               "mnist_index": mnist_indices.repeat_interleave(members).tolist(),
               "member": list(range(members)) * len(names)}
    return {**columns, **{name: factors[name].tolist() for name in FACTORS}, "ink_outside": outside.tolist()}


def write_pngs(images: np.ndarray, paths: list[Path]) -> int:
    """Write uint8 RGB images [N, H, W, 3] as PNG files (Pillow writes no timestamp: same pixels, same bytes)."""
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path, format="PNG")
    return len(paths)


def writer_pool(workers: int) -> Executor:
    """Processes that write PNG files (Pillow's PNG encoder holds the GIL, so threads would take turns);
    forked, as torch's DataLoader workers are, so that they start without importing torch again."""
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return ThreadPoolExecutor(1)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def chunks(factors: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """The factors of renderings [start, stop)."""
    return {name: values[start:stop] for name, values in factors.items()}


def generate_split(split: str, images: torch.Tensor, labels: torch.Tensor, count: int, members: int, seed: int,
                   staging: Path, pool: Executor, bar: tqdm) -> dict[str, list]:
    """Draw `count` identities of one MNIST split (`images`, `labels`) and the factors of their members,
    render them and write them into `staging`; returns the split's factors.csv columns."""
    generator = split_generator(seed, split)
    mnist_indices = torch.randperm(len(images), generator=generator)[:count].sort().values
    factors = draw_factors(count * members, generator)
    glyph_of = mnist_indices.repeat_interleave(members)  # the MNIST index of every rendering
    starts = range(0, len(glyph_of), RENDER_CHUNK)
    outside = torch.cat([ink_outside(images[glyph_of[i:i + RENDER_CHUNK]], chunks(factors, i, i + RENDER_CHUNK))
                         for i in starts])
    columns = split_columns(split, mnist_indices, labels[mnist_indices], members, factors, outside)
    for identity in dict.fromkeys(columns["identity"]):
        (staging / split / identity).mkdir(parents=True)
    paths = [staging / file for file in columns["file"]]
    writing = []  # the writes of the chunk rendered last: at most two chunks of images are held at once
    for start in starts:
        rendered = render(images[glyph_of[start:start + RENDER_CHUNK]], chunks(factors, start, start + RENDER_CHUNK))
        rendered = rendered.permute(0, 2, 3, 1).numpy()
        previous, writing = writing, [pool.submit(write_pngs, rendered[i:i + WRITE_CHUNK],
                                                  paths[start + i:start + i + WRITE_CHUNK])
                                      for i in range(0, len(rendered), WRITE_CHUNK)]
        for future in previous:
            bar.update(future.result())
    for future in writing:
        bar.update(future.result())
    return columns


def csv_text(columns: dict[str, list]) -> str:
    """factors.csv: a header (COLUMNS) and one row per image; floats with DECIMALS places (what was rendered)."""
    formatted = [[f"{value:.{DECIMALS}f}" for value in columns[name]] if kind is float else columns[name]
                 for name, kind in COLUMNS.items()]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(zip(*formatted))
    return buffer.getvalue()


def info(args: argparse.Namespace, argv: list[str], columns: dict[str, list]) -> dict:
    """info.json: how the data set was made, and two checks of the renderings: the smallest RGB distance
    between an image's stroke and background colours, and how many glyphs lost ink past the frame."""
    stroke, background = (hsv_to_rgb(torch.tensor(columns[name], dtype=torch.float64), SATURATION, VALUE)
                          for name in ("stroke_hue_deg", "background_hue_deg"))
    outside = torch.tensor(columns["ink_outside"])
    contrast = torch.linalg.norm(stroke - background, dim=1).min().item()
    return {"generator": GENERATOR, "command": shlex.join(["python", "-m", GENERATOR, *argv]), "seed": args.seed,
            "identities": {"train": args.train_identities, "test": args.test_identities}, "members": args.members,
            "images": {split: columns["split"].count(split) for split in SPLITS},
            "image_size": SIZE, "base_magnification": BASE_MAGNIFICATION, "ranges": RANGES,
            "saturation": SATURATION, "value": VALUE,
            "min_stroke_background_rgb_distance": round(contrast, 4),
            "images_with_ink_outside": int((outside > 0).sum()), "max_ink_outside": round(outside.max().item(), 4),
            "order": "read_factors returns the rows sorted by file path: in each split folder, by identity folder "
                     "name, then by member file name"}


def is_identities_folder(path: Path) -> bool:
    """Whether `path` holds a data set this script wrote (its info.json says so)."""
    try:
        return json.loads((path / "info.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def identities_root(spec: data_loader.DataSpec, source: str, script: str) -> Path:
    """The data folder of `spec` if this script wrote it; else UserError saying that `source` (a flag, a run)
    names other data and that `script` needs factors.csv."""
    root = Path(spec.data_dir) if spec.dataset == data_loader.FOLDER else None
    if root is None or not is_identities_folder(root):
        raise UserError(f"{source} is {root or spec.dataset}, not a data set of `python -m studies.identities`; "
                        f"{script} needs its factors.csv")
    return root


def check_out(out: Path, overwrite: bool) -> None:
    """UserError unless --out may be written: new or empty, or (with --overwrite) a data set of this script."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace the data set in it, "
                            "or give another folder")
        if not is_identities_folder(out):
            raise UserError(f"--out {out} holds files that studies.identities did not write (no info.json of "
                            "its own); give an empty or new folder")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {parent} is not a writable folder; give another path")


def move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `staging` folder to `out`, removing the data set `out` held before (--overwrite).

    --out is checked again first: another process may have written into it meanwhile.
    """
    check_out(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        old = out.absolute().parent / f".{out.name}.{os.getpid()}.old.tmp"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)  # replaces an empty folder; fails, rather than replace one filled meanwhile


def read_factors(root: str | Path, split: str | None = None) -> dict[str, np.ndarray]:
    """The columns of `<root>/factors.csv` (COLUMNS: str, int64 or float64 arrays), rows sorted by file path.

    That order is the one a folder data reader that sorts by group name, then by file path, loads the
    images of a split folder (`<root>/train` or `<root>/test`) in: file paths are `<split>/<identity>/
    <member>.png`, and identity and member names have fixed widths. With `split`, only that split's rows.
    """
    path = Path(root) / "factors.csv"
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; write the data set with "
                        f"`python -m studies.identities --out {root}`") from None
    if not rows or set(COLUMNS) - set(rows[0]):
        raise UserError(f"{path} lacks the columns {sorted(set(COLUMNS) - set(rows[0] if rows else {}))}; "
                        "write it again with `python -m studies.identities --overwrite`")
    if split is not None:
        rows = [row for row in rows if row["split"] == split]
    rows.sort(key=lambda row: row["file"])
    dtypes = {str: np.str_, int: np.int64, float: np.float64}
    try:
        return {name: np.array([row[name] for row in rows], dtype=dtypes[kind]) for name, kind in COLUMNS.items()}
    except ValueError as error:
        raise UserError(f"{path}: {error}; write it again with `python -m studies.identities --overwrite`") from None


def load_mnist(data_dir: Path, counts: dict[str, int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of each MNIST split; UserError when a split holds fewer images than identities asked."""
    splits = {split: data_loader.load_split(data_dir, split) for split in SPLITS}
    for split, (images, _) in splits.items():
        if counts[split] > len(images):
            raise UserError(f"--{split}-identities {counts[split]}: the MNIST {split} split in {data_dir} holds "
                            f"{len(images)} images; give at most {len(images)}")
    return splits


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    counts = {"train": args.train_identities, "test": args.test_identities}
    check_out(args.out, args.overwrite)
    mnist = load_mnist(args.data_dir, counts)
    staging = args.out.absolute().parent / f".{args.out.name}.{os.getpid()}.tmp"
    staging.mkdir(parents=True)
    total = sum(counts.values()) * args.members
    try:
        with writer_pool(args.workers) as pool, tqdm(total=total, unit="image", disable=args.no_progress,
                                                     dynamic_ncols=True) as bar:
            try:
                splits = [generate_split(split, *mnist[split], counts[split], args.members, args.seed, staging,
                                         pool, bar) for split in SPLITS]
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        columns = {name: [value for split in splits for value in split[name]] for name in COLUMNS}
        write_text_atomic(staging / "factors.csv", csv_text(columns))
        write_text_atomic(staging / "info.json", json.dumps(info(args, argv, columns), indent=1) + "\n")
        move_into_place(staging, args.out, args.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {total} images of {counts['train']} train and {counts['test']} test identities to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
