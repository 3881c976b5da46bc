"""The headline tables: mean ± std over seeds of the per-run files results/eval_*.json (studies.evaluate).

Runs named <run>, <run>_seed1, <run>_seed2, ... are seeds of one configuration <run>. Writes the
headline tables to results/headline.md and between README.md's markers `<!-- headline:start -->` and
`<!-- headline:end -->`; the comparison with the published anchors, protocol by protocol, to
results/anchors.md and between docs/reference.md's markers `<!-- anchors:start -->` and
`<!-- anchors:end -->`; a table of every evaluated run (each seed a row) to results/evaluations.md; and
the figure of class accuracy against K fused images (seed means) to images/group_size.png. The
per-run files results/factors_*.json (studies.factors, runs on the identities data) become the tables of
results/factors.md: what each code holds, factor by factor, after what one rendering shows a supervised
encoder (results/factor_ceiling.json, studies.factor_ceiling) where that file exists.

    python -m studies.aggregate            # after `python -m studies.evaluate ... --json results/eval_<run>.json`
    python -m studies.aggregate --check    # exit 1 when a table or block differs from what the files give
    python -m studies.aggregate --results-dir out/faces --tables-only   # runs of your own data: tables only

The std is the sample standard deviation (n - 1) over seeds; a configuration with one seed shows its
value alone.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from runs import repository_path, script_parser, write_text_atomic

START, END = "<!-- headline:start -->", "<!-- headline:end -->"
ANCHORS_START, ANCHORS_END = "<!-- anchors:start -->", "<!-- anchors:end -->"
# Headline configurations, in table order; other evaluated runs appear in results/evaluations.md only.
HEADLINE = ("mlvae_eps0.1", "mlvae_eps1", "reference_objective_eps0.1", "mlvae_eps0.1_stylekl4",
            "mlvae_conv16_eps0.1", "mlvae_conv16_eps0.1_stylekl2", "mlvae_conv16_eps0.1_stylekl4", "reference_eps0.1",
            "reference_eps1")
# Runs set beside the published anchors, and the networks each one uses.
ANCHOR_RUNS = (("mlvae_eps0.1", "MLP"), ("mlvae_eps0.1_stylekl4", "MLP"), ("mlvae_conv16_eps0.1", "conv"),
               ("mlvae_conv16_eps0.1_stylekl2", "conv"), ("mlvae_conv16_eps0.1_stylekl4", "conv"),
               ("reference_eps0.1", "MLP (reference weights)"))
# (model, networks, dims, protocol, style, class): Jha et al. (ECCV 2018), MNIST test split. Its class
# code is a deterministic linear output (its networks.py), so its class number is on the code itself;
# the table does not say whether its style classifier saw sampled latents or posterior means.
PUBLISHED = (("cycle-consistent VAE (Jha et al. 2018)", "conv", "16/16",
              "style: sampled or means not stated; class: a deterministic code", 17.56, 98.35),
             ("Mathieu et al. (2016), as reported by Jha et al.", "not stated", "16/16", "not stated", 66.83, 98.52),
             ("Szabo et al., as reported by Jha et al.", "not stated", "not stated", "not stated", 96.08, 98.46))
PROTOCOLS = (("sampled", "sampled latents (the reference's protocol)"), ("means", "posterior means"))
FIGURE = ("mlvae_eps0.1", "mlvae_eps0.1_stylekl4", "reference_eps0.1")
HEADLINE_K = (1, 2, 4, 8, 16)
EVIDENCE = {"no_evidence": "no", "with_evidence": "yes"}
CODES = [(f"{code}: {latents}", ("latent_classifier", latents, "{evidence}", f"{code}_test"))
         for code in ("style", "class") for latents in ("sampled", "means")]
SWAP = [("content transfer", ("swap_score", "{evidence}", "content_transfer")),
        ("style leak", ("swap_score", "{evidence}", "style_leak")),
        ("ceiling", ("swap_score", "{evidence}", "reconstruction_ceiling"))]
LOSS = [("reconstruction, means", ("test_loss", "posterior_means")),
        ("reconstruction, sampled", ("test_loss", "sampled"))]
FACTOR_NAMES = {"rotation_deg": "rotation", "scale": "scale", "translate_x": "x shift", "translate_y": "y shift",
                "stroke_hue_deg": "stroke hue", "background_hue_deg": "background hue"}


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    add = parser.add_argument
    add("--results-dir", type=Path, default=repository_path("results"), help="folder of the eval_*.json files")
    add("--readme", type=Path, default=repository_path("README.md"), help="README whose headline block is rewritten")
    add("--anchors-doc", type=Path, default=repository_path("docs/reference.md"),
        help="document whose anchors block is rewritten")
    add("--out", type=Path, default=None, help="headline tables (default: <results-dir>/headline.md)")
    add("--figure", type=Path, default=repository_path("images/group_size.png"),
        help="class accuracy against K, seed means")
    add("--tables-only", action="store_true",
        help="the tables of every configuration in --results-dir (runs of your own data, say) to <results-dir>/"
             "headline.md and evaluations.md; no README or anchors block, no figure")
    add("--check", action="store_true", help="write nothing; exit 1 when a block or table file differs from "
                                             "what the JSON files give")
    return parser


def configuration(run: str) -> str:
    """The configuration a run belongs to: its name without a trailing _seed<N>."""
    return re.sub(r"_seed\d+$", "", run)


def load_evaluations(folder: Path) -> list[dict]:
    """Every results/eval_*.json, in file-name order; ValueError when their classifier steps differ."""
    evaluations = [json.loads(path.read_text()) for path in sorted(folder.glob("eval_*.json"))]
    steps = {e["evaluation"]["classifier_iterations"] for e in evaluations}
    if len(steps) > 1:
        raise ValueError(f"the evaluations in {folder} used different classifier steps {sorted(steps)}; "
                         "rerun them with the same --iterations")
    return evaluations


def group_seeds(evaluations: list[dict]) -> dict[str, list[dict]]:
    """{configuration: its runs}, configurations in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for evaluation in evaluations:
        groups.setdefault(configuration(evaluation["run"]), []).append(evaluation)
    return groups


def value(evaluation: dict, path: tuple[str, ...], **fields: str) -> float:
    """The number at `path` (keys, formatted with `fields`); "K=<k>" picks the MLP's accuracy at K=k."""
    node = evaluation
    for key in path:
        key = key.format(**fields)
        if key.startswith("K="):
            node = node["mlp"][node["group_sizes"].index(int(key[2:]))]
        else:
            node = node[key]
    return node


def mean_std(values: list[float], digits: int) -> str:
    """'mean ± std' (sample std) with `digits` decimals, or the value alone for one seed; '-' where a run
    has no value (a test loss of a split smaller than one training batch)."""
    if None in values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def cells(runs: list[dict], columns: list[tuple[str, tuple]], digits: int, **fields: str) -> list[str]:
    return [mean_std([value(run, path, **fields) for run in runs], digits) for _, path in columns]


def headline_tables(evaluations: list[dict], configurations: tuple[str, ...] = HEADLINE) -> str:
    """The three headline tables (Markdown) of the configurations present, in `configurations` order."""
    groups = group_seeds(evaluations)
    shown = [(name, groups[name]) for name in configurations if name in groups]
    if not shown:
        raise ValueError(f"no evaluation of any of {', '.join(configurations)}")
    steps = shown[0][1][0]["evaluation"]["classifier_iterations"]
    sizes = [k for k in HEADLINE_K if all(k in run["group_size"]["group_sizes"] for _, runs in shown for run in runs)]
    fused = [(f"K={k}", ("group_size", f"K={k}")) for k in sizes]
    codes, swap, rest = [], [], []
    for name, runs in shown:
        first = [f"`{name}`", str(len(runs))]
        for evidence, shown_as in EVIDENCE.items():
            codes.append(first + [shown_as] + cells(runs, CODES, 1, evidence=evidence))
            swap.append(first + [shown_as] + cells(runs, SWAP, 1, evidence=evidence))
            first = ["", ""]
        rest.append([f"`{name}`", str(len(runs))] + cells(runs, fused, 1) + cells(runs, LOSS, 4))
    return "\n\n".join([
        f"Digit accuracy (%) on the MNIST test split of the reference's classifier MLP ({steps} steps, "
        "BatchNorm in eval mode) trained on one code. **sampled**: latents drawn from the posteriors "
        "(the reference's protocol); **means**: posterior means. **evidence**: the class code fused over "
        "the images of the same digit in each test batch of 128 (grouped by the true label, as the "
        "reference does); evidence leaves the style code as it is, so its two rows differ only by the "
        "classifier's training noise. Style: lower is better; class: higher is better. Mean ± sample "
        "std over n seeds.",
        markdown(["run", "n", "evidence", *(title for title, _ in CODES)], codes),
        "Class code of the query fused with K-1 other test images of its digit (no label-sorted batch), "
        "MLP trained on single-image posterior means; test reconstruction error per pixel (the "
        "training loss's term) from the posterior means and from the training's sampled latent layer.",
        markdown(["run", "n", *(f"class, {title}" for title, _ in fused), *(title for title, _ in LOSS)], rest),
        "Swap score (%): generations from one test image's style and another's class code, judged by a "
        "pixel CNN. Content transfer: labelled as the class source (chance 10); style leak: labelled as "
        "the style source; ceiling: the CNN on plain reconstructions. Evidence: the class code fused over "
        "the class source and 24 other test images of its digit.",
        markdown(["run", "n", "evidence", *(title for title, _ in SWAP)], swap),
    ]) + "\n"


def evaluations_table(evaluations: list[dict]) -> str:
    """Every evaluated run (each seed a row), test accuracies on both protocols and the swap score."""
    columns = [(f"{title}, {evidence.replace('_', ' ')}", tuple(k.format(evidence=evidence) for k in path))
               for evidence in EVIDENCE for title, path in CODES]
    columns += [(f"swap {title}", tuple(k.format(evidence="no_evidence") for k in path)) for title, path in SWAP]
    rows = [[f"`{run['run']}`", str(run["training_args"]["seed"]) if run["training_args"] else "",
             *cells([run], columns, 2), *cells([run], LOSS, 5)] for run in evaluations]
    return ("Every evaluated run (results/eval_<run>.json), one row per seed: test accuracy (%) of the latent "
            "classifiers, swap score without evidence, test reconstruction error per pixel.\n\n"
            + markdown(["run", "seed", *(title for title, _ in columns), *(title for title, _ in LOSS)], rows) + "\n")


def factors_tables(results: list[dict], ceiling: dict | None = None) -> str:
    """results/factors.md: per configuration (mean ± std over seeds) and latents, each code's R^2 per style
    factor, digit accuracy and identity retrieval; the class code fused over K; the importance shares. With
    `ceiling` (studies.factor_ceiling's results), first what a supervised encoder reads from one rendering."""
    groups: dict[str, list[dict]] = {}
    for result in results:
        groups.setdefault(configuration(result["run"]), []).append(result)
    probe_header = ["configuration", "seeds", "latents", *(f"{name} R²" for name in FACTOR_NAMES.values()), "digit %",
                    "identity top-1 %", "identity top-5 %"]
    sections = []
    if ceiling is not None:
        rows = [[renderings, *(f"{scores[factor]:.3f}" for factor in FACTOR_NAMES), f"{100 * scores['digit']:.1f}"]
                for renderings, scores in (("test (unseen identities)", ceiling["scores"]),
                                           ("train (fitted)", ceiling["train_scores"]))]
        sections.append("**What one rendering shows**: the conv encoder's stack trained with the factors as labels "
                        f"(`{ceiling['command']}`)\n\n"
                        + markdown(["renderings", *(f"{name} R²" for name in FACTOR_NAMES.values()), "digit %"], rows))
    for code in ("style", "class"):
        rows = []
        for name, runs in groups.items():
            for latents in PROTOCOLS:
                probes = [run["probes"][code][latents[0]] for run in runs]
                found = [run["retrieval"][code][latents[0]]["1"] for run in runs]
                rows.append([f"`{name}`", str(len(runs)), latents[0],
                             *(mean_std([p[factor] for p in probes], 3) for factor in FACTOR_NAMES),
                             mean_std([100 * p["digit"] for p in probes], 1),
                             *(mean_std([100 * f[top] for f in found], 1) for top in ("top1", "top5"))])
        sections.append(f"**The {code} code**, one rendering's code (unseen test identities)\n\n"
                        + markdown(probe_header, rows))
    rows = []
    for name, runs in groups.items():
        for latents, _ in PROTOCOLS:
            for k in runs[0]["fusion"][latents]:
                scores = [run["fusion"][latents][k] for run in runs]
                rows.append([f"`{name}`", str(len(runs)), latents, k,
                             *(mean_std([100 * s[key] for s in scores], 1) for key in ("digit", "top1", "top5"))])
    sections.append("**The class code fused over K renderings**\n\n"
                    + markdown(["configuration", "seeds", "latents", "K", "digit %", "identity top-1 %",
                                "identity top-5 %"], rows))
    rows = []
    for name, runs in groups.items():
        shares = [run["importance"]["style_share"] for run in runs]
        rows.append([f"`{name}`", str(len(runs)),
                     *(mean_std([share[factor] for share in shares], 2) for factor in [*FACTOR_NAMES, "digit"]),
                     *(mean_std([run["importance"][key] for run in runs], 2)
                       for key in ("disentanglement", "completeness"))])
    sections.append("**Where each factor lives**: the share of its permutation importance in the style code "
                    "(1: all in style, 0: all in class), and DCI's scores\n\n"
                    + markdown(["configuration", "seeds", *FACTOR_NAMES.values(), "digit", "disentanglement",
                                "completeness"], rows))
    return "\n\n".join(sections) + "\n"


def anchors_table(evaluations: list[dict]) -> str:
    """Single-image digit accuracy of our runs on each protocol, beside the published anchors."""
    groups = group_seeds(evaluations)
    rows = []
    for name, networks in ANCHOR_RUNS:
        if name not in groups:
            continue
        runs = groups[name]
        model = runs[0]["model"]
        for latents, protocol in PROTOCOLS:
            path = ("latent_classifier", latents, "no_evidence", "{code}_test")
            rows.append([f"`{name}`", networks, f"{model['style_dim']}/{model['class_dim']}", str(len(runs)),
                         protocol, *(mean_std([value(run, path, code=code) for run in runs], 2)
                                     for code in ("style", "class"))])
    for model, networks, dims, protocol, style, class_ in PUBLISHED:
        rows.append([model, networks, dims, "", f"single-image codes; {protocol}", f"{style:.2f}", f"{class_:.2f}"])
    return ("Digit accuracy (%) on the MNIST test split of a classifier trained on one image's code (no "
            "evidence). Our rows: results/eval_<run>.json, the reference's classifier MLP, mean ± sample std "
            "over n seeds. Published rows: the cycle-consistent VAE's table, as printed.\n\n"
            + markdown(["model", "networks", "dims (style/class)", "n", "protocol", "style (lower is better)",
                        "class (higher is better)"], rows) + "\n")


def replace_block(text: str, block: str, start: str = START, end: str = END) -> str:
    """`text` with everything between the markers replaced by `block`; ValueError without them."""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"the file needs one {start} line followed by one {end} line")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{block}{end}{tail}"


def block_between(text: str, start: str = START, end: str = END) -> str:
    """What stands between the markers; ValueError without them."""
    replace_block(text, "", start, end)
    return text.split(start)[1].split(end)[0].lstrip("\n")


def plot_group_size(groups: dict[str, list[dict]], out: Path) -> None:
    """Class accuracy against K, the mean over seeds of each configuration in FIGURE that was evaluated."""
    from studies.group_size import PROBES, plot_curves

    curves = []
    for name in FIGURE:
        if name not in groups:
            continue
        runs = groups[name]
        curve = {"label": f"{name} (n={len(runs)})", "group_sizes": runs[0]["group_size"]["group_sizes"]}
        for probe in PROBES:
            curve[probe] = [statistics.mean(values) for values in zip(*(run["group_size"][probe] for run in runs))]
        curves.append(curve)
    if curves:
        plot_curves(curves, str(out))


def main(argv: list[str] | None = None) -> str:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = args.out or args.results_dir / "headline.md"
    if args.tables_only:
        evaluations = load_evaluations(args.results_dir)
        block = headline_tables(evaluations, tuple(group_seeds(evaluations)))
        write_text_atomic(out, block)
        write_text_atomic(args.results_dir / "evaluations.md", evaluations_table(evaluations))
        print(block)
        print(f"Wrote {out} and {args.results_dir / 'evaluations.md'}")
        return block
    try:
        evaluations = load_evaluations(args.results_dir)
        block = headline_tables(evaluations)
        readme = replace_block(args.readme.read_text(), block)
        anchors = anchors_table(evaluations)
        anchors_doc = replace_block(args.anchors_doc.read_text(), anchors, ANCHORS_START, ANCHORS_END)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    anchors_file = args.results_dir / "anchors.md"
    written = ((args.readme, readme), (out, block), (args.anchors_doc, anchors_doc), (anchors_file, anchors))
    factor_results = [json.loads(path.read_text()) for path in sorted(args.results_dir.glob("factors_*.json"))]
    if factor_results:
        ceiling_file = args.results_dir / "factor_ceiling.json"
        ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.is_file() else None
        written += ((args.results_dir / "factors.md", factors_tables(factor_results, ceiling)),)
    if args.check:
        stale = [str(path) for path, text in written if not path.is_file() or path.read_text() != text]
        if stale:
            sys.exit(f"out of date: {', '.join(stale)}; run `python -m studies.aggregate`")
        print(f"{', '.join(str(path) for path, _ in written)} agree with {args.results_dir}/eval_*.json")
        return block
    for path, text in written:
        write_text_atomic(path, text)
    write_text_atomic(args.results_dir / "evaluations.md", evaluations_table(evaluations))
    plot_group_size(group_seeds(evaluations), args.figure)
    print(block)
    files = ", ".join(str(path) for path, _ in written[1:2] + written[3:])
    print(f"Wrote {files}, {args.results_dir / 'evaluations.md'}, {args.figure}, the headline block in {args.readme} "
          f"and the anchors block in {args.anchors_doc}")
    return block


if __name__ == "__main__":
    main()
