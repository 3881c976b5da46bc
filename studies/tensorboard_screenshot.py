"""Check the tensorboard log in a real browser: train a short run, serve it with TensorBoard on 127.0.0.1,
take a headless Chromium screenshot of the page, and stop the server it started by its process id.

Needs the `tensorboard` package (requirements.txt) and Debian's `chromium` (`apt-get install -y chromium`);
not part of the tests.

    python -m studies.tensorboard_screenshot --out out/tensorboard.png   # default --out: images/tensorboard.png
    python -m studies.tensorboard_screenshot --logdir runs --tab images --out /tmp/images.png

The page is opened with `?forceSVG=true`: headless Chromium without a GPU leaves TensorBoard's WebGL
line charts blank.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

from runs import reports_errors, repository_path, script_parser

ROOT = Path(__file__).resolve().parents[1]
# --run-all-compositor-stages-before-draw lets the page draw in virtual time; without it, about one
# screenshot in three shows TensorBoard's cards still empty.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--run-all-compositor-stages-before-draw"]


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--logdir", default=None, help="tensorboard log folder to show (default: train a short run into a "
                                       "temporary folder)")
    add("--epochs", type=int, default=6, help="epochs of the short run")
    add("--num-train", type=int, default=10000, help="training images of the short run")
    add("--port", type=int, default=6123, help="port of the TensorBoard server on 127.0.0.1")
    add("--tab", default="timeseries", help="the dashboard to show: timeseries, scalars, images, text, ...")
    add("--tag-filter", default="images/|loss_steps|speed",
        help="regular expression of the tags the timeseries dashboard shows ('': all)")
    add("--window-size", default="1400,1300", help="browser window width,height in pixels")
    add("--render-ms", type=int, default=30000, help="virtual time Chromium gives the page to render")
    add("--colors", type=int, default=64, help="palette size of the saved PNG (keeps it small); 0: full color")
    add("--out", default=repository_path("images/tensorboard.png"), help="PNG path of the screenshot")
    return parser


def train_short_run(logdir: Path, checkpoints: Path, epochs: int, num_train: int) -> None:
    """training.py in a subprocess, logging losses every 10 steps and images every epoch."""
    subprocess.run([sys.executable, str(ROOT / "training.py"), "--epochs", str(epochs), "--num-train",
                    str(num_train), "--log-every", "10", "--image-every", "1", "--run-name", "short_run",
                    "--checkpoint-dir", str(checkpoints), "--log-dir", str(logdir), "--no-progress"],
                   cwd=ROOT, check=True)


def wait_for_runs(url: str, server: subprocess.Popen, timeout: float = 120) -> list[str]:
    """Poll the server until it answers and lists a run with scalars; return the runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "data/plugin/scalars/tags", timeout=5) as response:
                runs = [run for run, tags in json.load(response).items() if tags]
            if runs:
                return runs
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard at {url} listed no run within {timeout:.0f} s")


def screenshot(url: str, out: Path, window_size: str, render_ms: int, colors: int) -> None:
    """A headless Chromium screenshot of `url`, with a throwaway profile folder."""
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("error: no `chromium` on PATH; install Debian's package with `apt-get install -y chromium`")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={window_size}",
                        f"--virtual-time-budget={render_ms}", f"--screenshot={out.resolve()}", url],
                       check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if colors:
        Image.open(out).convert("RGB").quantize(colors).save(out, optimize=True)


@reports_errors
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        logdir = Path(args.logdir) if args.logdir else Path(scratch) / "runs"
        if args.logdir is None:
            train_short_run(logdir, Path(scratch) / "checkpoints", args.epochs, args.num_train)
        url = f"http://127.0.0.1:{args.port}/"
        server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                                   "--host", "127.0.0.1", "--port", str(args.port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            runs = wait_for_runs(url, server)
            print(f"TensorBoard (process {server.pid}) serves {', '.join(runs)} at {url}")
            query = urllib.parse.urlencode({"forceSVG": "true", "tagFilter": args.tag_filter})
            screenshot(f"{url}?{query}#{args.tab}", out, args.window_size, args.render_ms, args.colors)
        finally:
            server.terminate()  # the server this script started, by its process id
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(f"Saved the screenshot of {url}#{args.tab} ({out.stat().st_size // 1024} KB) to {out}")
    return out


if __name__ == "__main__":
    main()
