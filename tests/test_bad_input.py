"""Every script, fed a bad flag, file or value, ends with one `error:` line that names it, a non-zero
exit status and no traceback, before it writes anything.

Each case runs as its own process (conftest.start_script) on tiny data, all of them at once.
"""
import shutil
import time

import pytest
import torch

TRAIN = ["--checkpoint-dir", "{tmp}/ck", "--log-dir", "{tmp}/runs", "--data-dir", "{data}", "--epochs", "1",
         "--no-progress"]
MODEL = ["--checkpoint-dir", "{run}", "--data-dir", "{data}"]

# (script, flags, what the error line must name)
CASES = [
    ("training", ["--reconstruction-coef", "-1"], "--reconstruction-coef"),
    ("training", ["--kl-coef", "nan"], "--kl-coef"),
    ("training", ["--kl-coef", "inf"], "--kl-coef"),
    ("training", ["--style-kl-coef", "-5"], "--style-kl-coef"),
    ("training", ["--beta1", "2"], "--beta1"),
    ("training", ["--beta2", "1"], "--beta2"),
    ("training", ["--lr", "0"], "--lr"),
    ("training", ["--lr", "fast"], "--lr"),
    ("training", ["--eps-std", "-0.1"], "--eps-std"),
    ("training", ["--batch-size", "1"], "--batch-size"),
    ("training", ["--epochs", "0"], "--epochs"),
    ("training", ["--save-every", "0"], "--save-every"),
    ("training", ["--style-dim", "0"], "--style-dim"),
    ("training", ["--num-train", "0"], "--num-train"),
    ("training", ["--group-size", "0"], "--group-size"),
    ("training", ["--device", "tpu"], "--device"),
    ("training", ["--run-name", "../../x"], "--run-name"),
    ("training", ["--run-name", "a/b"], "--run-name"),
    ("training", ["--checkpoint-dir", "{file}"], "--checkpoint-dir"),
    ("training", ["--checkpoint-dir", "{file}/sub"], "is a file"),
    ("training", ["--log-dir", "{file}"], "--log-dir"),
    ("training", ["--classes", "42"], "--classes"),
    ("training", ["--classes", "-1"], "--classes"),
    ("training", ["--batch-size", "1000"], "--batch-size 1000"),
    ("training", ["--num-train", "100000"], "--num-train 100000"),
    ("training", ["--classes", "0", "--num-train", "200", "--batch-size", "64"], "--num-train 200"),
    ("training", ["--data-dir", "{damaged}"], "train-images-idx3-ubyte"),
    ("training", ["--resume", "--run-name", "none"], "--resume"),
    ("training", ["--resume", "--overwrite"], "--overwrite"),
    ("training", ["--checkpoint-dir", "{runs}", "--run-name", "stateless"], "already holds a run"),
    ("training", ["--checkpoint-dir", "{runs}", "--run-name", "stateless", "--resume"], "no training_state.pt"),
    ("training", ["--checkpoint-dir", "{runs}", "--run-name", "bad_state", "--resume"], "training_state.pt"),
    ("training", ["--checkpoint-dir", "{runs}", "--run-name", "good", "--resume", "--class-dim", "9"],
     "--class-dim"),
    ("training", ["--lr", "1e30", "--num-train", "512", "--batch-size", "64", "--run-name", "nan"],
     "nothing was saved"),
    ("inference", MODEL + ["--out", "{tmp}"], "--out"),
    ("inference", MODEL + ["--out", "{tmp}/grid.txt"], ".png"),
    ("inference", MODEL + ["--out", "{file}/grid.png"], "is a file"),
    ("inference", MODEL + ["--evidence-size", "0"], "--evidence-size"),
    ("inference", MODEL + ["--accumulate-evidence", "--evidence-size", "1000", "--out", "{tmp}/grid.png"],
     "--evidence-size 1000"),
    ("inference", MODEL + ["--style-dim", "0"], "--style-dim"),
    ("inference", ["--checkpoint-dir", "{tmp}/nothing"], "no weights"),
    ("inference", ["--checkpoint-dir", "{runs}/bad_args"], "args.json"),
    ("inference", ["--checkpoint-dir", "{runs}/bad_state"], "training_state.pt"),
    ("inference", ["--checkpoint-dir", "{runs}/bad_encoder"], "encoder.pt"),
    ("inference", MODEL + ["--data-dir", "{damaged}", "--out", "{tmp}/grid.png"], "t10k-images-idx3-ubyte"),
    ("classifier", MODEL + ["--batch-size", "50000", "--iterations", "3"], "--batch-size 50000"),
    ("classifier", MODEL + ["--batch-size", "1"], "--batch-size"),
    ("classifier", MODEL + ["--iterations", "0"], "--iterations"),
    ("classifier", MODEL + ["--lr", "nan"], "--lr"),
    ("classifier", MODEL + ["--json", "{tmp}"], "--json"),
    ("classifier", MODEL + ["--json", "{file}/x.json"], "is a file"),
    ("classifier", MODEL + ["--data-dir", "{damaged}"], "train-images-idx3-ubyte"),
    ("tsne", MODEL + ["--perplexity", "-1"], "--perplexity"),
    ("tsne", MODEL + ["--perplexity", "50", "--num-samples", "40"], "--perplexity"),
    ("tsne", MODEL + ["--num-samples", "2"], "--num-samples"),
    ("tsne", MODEL + ["--num-samples", "1000", "--out", "{tmp}/tsne.png"], "--num-samples 1000"),
    ("tsne", MODEL + ["--out", "{tmp}"], "--out"),
    ("tsne", MODEL + ["--data-dir", "{damaged}", "--out", "{tmp}/tsne.png"], "t10k-images-idx3-ubyte"),
    ("studies.few_shot", MODEL + ["--held-out", "42"], "--held-out"),
    ("studies.few_shot", MODEL + ["--held-out", "8"], "--held-out"),
    ("studies.few_shot", MODEL + ["--held-out", "8", "8"], "--held-out"),
    ("studies.few_shot", MODEL + ["--trials", "1"], "--trials"),
    ("studies.few_shot", MODEL + ["--shots", "0"], "--shots"),
    ("studies.few_shot", MODEL + ["--shots", "500"], "--shots 500"),
    ("studies.few_shot", MODEL + ["--json", "{tmp}"], "--json"),
    ("studies.few_shot", MODEL + ["--data-dir", "{damaged}"], "train-images-idx3-ubyte"),
    ("studies.group_size", MODEL + ["--group-sizes", "0"], "--group-sizes"),
    ("studies.group_size", MODEL + ["--group-sizes", "1", "1000"], "--group-sizes 1000"),
    ("studies.group_size", MODEL + ["--mlp-steps", "0"], "--mlp-steps"),
    ("studies.group_size", MODEL + ["--compare", "{tmp}/none.json"], "--compare"),
    ("studies.group_size", MODEL + ["--compare", "{file}"], "not valid JSON"),
    ("studies.group_size", MODEL + ["--out", "{tmp}/curves.txt"], "--out"),
    ("studies.group_size", MODEL + ["--json", "{tmp}"], "--json"),
    ("studies.group_size", MODEL + ["--data-dir", "{damaged}"], "train-images-idx3-ubyte"),
    ("studies.swap_score", MODEL + ["--num-styles", "0"], "--num-styles"),
    ("studies.swap_score", MODEL + ["--evidence-size", "0"], "--evidence-size"),
    ("studies.swap_score", MODEL + ["--num-styles", "1000"], "--num-styles 1000"),
    ("studies.swap_score", MODEL + ["--num-styles", "100", "--evidence-size", "500"], "--evidence-size 500"),
    ("studies.swap_score", MODEL + ["--pixel-classifier", "{file}"], "--pixel-classifier"),
    ("studies.swap_score", MODEL + ["--pixel-classifier", "{tmp}/none.pt"], "no pixel classifier"),
    ("studies.swap_score", MODEL + ["--json", "{tmp}"], "--json"),
    ("studies.swap_score", MODEL + ["--data-dir", "{damaged}"], "t10k-images-idx3-ubyte"),
    ("studies.pixel_classifier", ["--batch-size", "0"], "--batch-size"),
    ("studies.pixel_classifier", ["--num-train", "0"], "--num-train"),
    ("studies.pixel_classifier", ["--epochs", "0"], "--epochs"),
    ("studies.pixel_classifier", ["--lr", "-1"], "--lr"),
    ("studies.pixel_classifier", [], "exists"),  # the shipped classifier is not replaced by accident
    ("studies.pixel_classifier", ["--out", "{tmp}/p.pt", "--data-dir", "{data}", "--num-train", "100000"],
     "--num-train 100000"),
    ("studies.pixel_classifier", ["--out", "{tmp}/p.pt", "--data-dir", "{data}", "--batch-size", "1000"],
     "--batch-size 1000"),
    ("studies.pixel_classifier", ["--out", "{tmp}/p.pt", "--data-dir", "{damaged}"], "train-images-idx3-ubyte"),
    ("studies.evaluate", MODEL + ["--json", "{tmp}"], "--json"),
    ("studies.evaluate", MODEL + ["--data-dir", "{damaged}"], "train-images-idx3-ubyte"),
    ("studies.plot_losses", ["--checkpoint-dir", "{tmp}/nothing"], "log.csv"),
    ("studies.plot_losses", ["--checkpoint-dir", "{runs}/bad_log", "--out", "{tmp}/losses.png"], "log.csv"),
    ("studies.plot_losses", ["--checkpoint-dir", "{run}", "--out", "{tmp}"], "--out"),
    ("studies.sweep", ["--num-train", "60000"], "--num-train"),
    ("studies.sweep", ["--jobs", "0"], "--jobs"),
    ("studies.sweep", ["--sweep-dir", "{file}"], "--sweep-dir"),
    ("studies.sweep", ["--out", "{tmp}", "--sweep-dir", "{tmp}/sweeps"], "--out"),
    ("studies.benchmark", ["--threads", "0"], "--threads"),
    ("studies.benchmark", ["--device", "tpu"], "--device"),
    ("studies.benchmark", ["--json", "{tmp}"], "--json"),
]


def case_id(case):
    script, flags, _ = case
    return f"{script} {' '.join(flags[len(MODEL):] if flags[:len(MODEL)] == MODEL else flags)}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_run, tiny_data):
    """Paths the cases name: tiny data and a damaged copy, a file, and run folders good and broken."""
    tmp = tmp_path_factory.mktemp("bad_input")
    damaged = tmp / "damaged"
    shutil.copytree(tiny_data, damaged)
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        path = damaged / "MNIST" / "raw" / name
        path.write_bytes(path.read_bytes()[:1000])  # truncated
    file = tmp / "a_file"
    file.write_text("not json, not weights\n")
    runs = tmp / "runs_in"
    shutil.copytree(tiny_run, runs / "good")
    for name, broken in (("stateless", None), ("bad_args", "args.json"), ("bad_encoder", "encoder.pt"),
                         ("bad_state", "training_state.pt"), ("bad_log", "log.csv")):
        shutil.copytree(tiny_run, runs / name)
        if name != "bad_state":
            (runs / name / "training_state.pt").unlink()  # a run as shipped: weights, args and log only
        if broken:
            (runs / name / broken).write_text("epoch,iteration\n1,x,garbage\n")
    return {"tmp": tmp, "data": tiny_data, "damaged": damaged, "file": file, "runs": runs, "run": runs / "good"}


@pytest.fixture(scope="module")
def outcomes(workspace, start_script):
    """(exit status, stderr, seconds) of every case by its index in CASES, run a few at a time."""
    results = {}
    pending = list(enumerate(CASES))
    while pending:
        wave, pending = pending[:6], pending[6:]
        started = []
        for number, (script, flags, _) in wave:
            argv = [flag.format(**workspace) for flag in (TRAIN if script == "training" else []) + flags]
            started.append((number, start_script(script, *argv), time.monotonic()))
        for number, process, start in started:
            results[number] = (process.wait(120), process.stderr, time.monotonic() - start)
    return results


@pytest.mark.parametrize("number", range(len(CASES)), ids=[case_id(case) for case in CASES])
def test_bad_input_ends_in_one_error_line_naming_it(number, outcomes):
    code, stderr, _ = outcomes[number]
    case = CASES[number]
    lines = stderr.strip().splitlines()
    assert code not in (0, None) and "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: ") and case[2] in lines[-1], stderr
    assert sum(line.startswith("error:") for line in lines) == 1, stderr


def test_bad_input_writes_nothing(outcomes, workspace):
    tmp = workspace["tmp"]
    assert not list(tmp.rglob("*.tmp"))
    assert not (tmp / "ck").exists()  # no run folder, not even an empty one
    assert not list(tmp.glob("*.png")) and not list(tmp.glob("*.json"))


def test_resume_of_a_finished_run_says_so(tmp_path, tiny_run, start_script):
    run_dir = tmp_path / "ck" / "tiny"
    shutil.copytree(tiny_run, run_dir)
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    process = start_script("training", "--checkpoint-dir", tmp_path / "ck", "--run-name", "tiny", "--resume",
                           "--no-progress")
    assert process.wait() == 0
    out = process.stdout_path.read_text()
    assert "already finished (1 epochs, --epochs 1)" in out and "Saved to" not in out
    assert state["epoch"] == torch.load(run_dir / "training_state.pt", weights_only=True)["epoch"]
