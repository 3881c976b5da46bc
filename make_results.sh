#!/usr/bin/env bash
# Regenerate every file under results/ and every figure under images/ from the shipped checkpoints.
# Usage: bash make_results.sh [REFERENCE_CHECKPOINTS]
#   REFERENCE_CHECKPOINTS: the reference's published weights (default: $MLVAE_REFERENCE_DIR, else
#   ../shared/reference/checkpoints); the steps that need them are skipped when they are absent.
# JOBS=2 (default) runs that many evaluations at once, one thread each. One evaluation takes about
# 3 minutes of one idle CPU core (20000 classifier steps); the whole script took 51 minutes on 2 cores.
# Each step's command is also quoted in README.md or docs/ beside its output. Steps, in order:
#   1. studies.evaluate on every run folder under checkpoints/ (all seeds) and on the reference's weights
#      -> results/eval_<run>.json; then studies.aggregate -> results/headline.md, results/anchors.md,
#      results/evaluations.md, images/group_size.png, the headline block of README.md and the anchors
#      block of docs/reference.md;
#   2. swap grids, t-SNE maps and loss curves -> images/;
#   3. few-shot on held-out digits, the reference's 100,000-step classifier cross-check;
#   4. the validation sweeps, MLP and conv (reuse finished runs under sweeps/, else train 15 short
#      runs), and the speed benchmark (2 threads; run it on an otherwise idle machine);
#   5. the eager step of the code before the hand-written autograd Functions were removed, against this one;
#   6. the runs on the identities data set (checkpoints/identities_*, trained on data/identities/ from
#      `python -m studies.identities`): what each code holds -> results/factors_<run>.json, then
#      studies.aggregate -> results/factors.md; their colour swap grids -> images/.
# Each step prints its wall time.
set -euo pipefail
cd "$(dirname "$0")"
started=$SECONDS
step_done() { echo "make_results.sh: step $1 done, $(( (SECONDS - started) / 60 )) min since the start" >&2; }
ref=${1:-${MLVAE_REFERENCE_DIR:-../shared/reference/checkpoints}}
jobs_max=${JOBS:-2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p results images
have_ref=false
if [ -f "$ref/encoder_0.1_var_reparam" ] && [ -f "$ref/encoder_1_var_reparam" ]; then
  have_ref=true
else
  echo "note: no reference weights at $ref; skipping the steps that need them" >&2
fi

# Run a command in the background, at most $jobs_max at once; wait_all waits for them all. A failed
# command stops the script (set -e), whenever it ends.
pids=()
background() {
  "$@" &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
}
wait_all() {
  for pid in "${pids[@]}"; do wait "$pid"; done
  pids=()
}

# 1. Every number of every run, then the headline tables.
for dir in checkpoints/*/; do
  run=$(basename "$dir")
  [ -f "$dir/encoder.pt" ] || continue
  case $run in identities_*) continue;; esac  # step 6
  background python -m studies.evaluate --no-progress --checkpoint-dir "checkpoints/$run" --json "results/eval_$run.json"
done
if $have_ref; then
  for eps in 0.1 1; do
    background python -m studies.evaluate --no-progress --eps-std $eps --name reference_eps$eps \
      --encoder "$ref/encoder_${eps}_var_reparam" --decoder "$ref/decoder_${eps}_var_reparam" \
      --json "results/eval_reference_eps$eps.json"
  done
fi
wait_all
python -m studies.aggregate
step_done 1

# 2. Figures: swap grids without and with evidence, t-SNE maps, loss curves.
for run in mlvae_eps0.1 mlvae_eps1 mlvae_eps0.1_stylekl4 mlvae_eps0.1_fashion-mnist mlvae_conv16_eps0.1 \
    mlvae_conv16_eps0.1_stylekl4; do
  python inference.py --checkpoint-dir checkpoints/$run --out images/swap_${run}_no_evidence.png
  python inference.py --checkpoint-dir checkpoints/$run --accumulate-evidence --out images/swap_${run}_evidence.png
done
background python tsne.py --checkpoint-dir checkpoints/mlvae_eps0.1 --out images/tsne_mlvae_eps0.1.png
background python tsne.py --checkpoint-dir checkpoints/mlvae_eps1 --out images/tsne_mlvae_eps1.png
if $have_ref; then
  for eps in 0.1 1; do
    weights=(--eps-std $eps --encoder "$ref/encoder_${eps}_var_reparam" --decoder "$ref/decoder_${eps}_var_reparam")
    python inference.py "${weights[@]}" --out images/reference_swap_eps${eps}_no_evidence.png
    python inference.py "${weights[@]}" --accumulate-evidence --out images/reference_swap_eps${eps}_evidence.png
  done
  background python tsne.py --eps-std 0.1 --encoder "$ref/encoder_0.1_var_reparam" \
    --decoder "$ref/decoder_0.1_var_reparam" --out images/reference_tsne_eps0.1.png
fi
python -m studies.plot_losses --checkpoint-dir checkpoints/mlvae_eps0.1 checkpoints/mlvae_eps1 \
  checkpoints/reference_objective_eps0.1 --log-scale --out images/losses.png
wait_all
step_done 2

# 3. Few-shot classes never seen in training; the reference's std-1 weights with a 100,000-step classifier.
few_shot() {
  python -m studies.few_shot --checkpoint-dir checkpoints/mlvae_eps0.1_classes01234567 \
    --json results/few_shot.json > results/few_shot.md
}
reference_cross_check() {
  python classifier.py --accumulate-evidence --iterations 100000 --no-progress --eps-std 1 \
    --encoder "$ref/encoder_1_var_reparam" --decoder "$ref/decoder_1_var_reparam" \
    --json results/classifier_reference_eps1_evidence_100k.json > results/classifier_reference_eps1_evidence_100k.md
}
background few_shot
if $have_ref; then
  background reference_cross_check
fi
wait_all
step_done 3

# 4. The validation sweeps that chose the settings, and the speed benchmark (two threads).
python -m studies.sweep --epochs 30 --jobs 2 --out results/sweep_validation.md
python -m studies.sweep --configs conv16 conv16_stylekl4 --epochs 30 --jobs 2 --out results/sweep_conv.md
# The conv style-KL weights between 1 and 4 -> results/sweep_conv_weights.md, results/sweep_conv_weights.json
python -m studies.sweep --configs conv16_stylekl1.5 conv16_stylekl2 conv16_stylekl2.5 conv16_stylekl3 --epochs 30 \
    --jobs 2 --out results/sweep_conv_weights.md
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python -m studies.benchmark --compile --json results/benchmark.json \
  | tee results/benchmark.md
step_done 4

# 5. The eager step of the code before the hand-written autograd Functions were removed, against this one.
before=$(mktemp -d)/before
git worktree add --detach "$before" 2aeec6e >/dev/null
python studies/compare_eager.py "$before" . --runs 6 --json results/eager_before_after.json
git worktree remove --force "$before"
step_done 5

# 6. The identities runs: what each code holds, and colour swap grids of ten unseen test identities.
if compgen -G "checkpoints/identities_*/encoder.pt" >/dev/null; then
  [ -f data/identities/factors.csv ] || python -m studies.identities --no-progress
  background python -m studies.factor_ceiling --no-progress --json results/factor_ceiling.json
  for dir in checkpoints/identities_*/; do
    run=$(basename "$dir")
    background python -m studies.factors --no-progress --checkpoint-dir "checkpoints/$run" \
      --json "results/factors_$run.json"
    python inference.py --checkpoint-dir "checkpoints/$run" --reference random --seed 0 \
      --out "images/swap_${run}.png"
  done
  wait_all
  python -m studies.aggregate
fi
step_done 6
