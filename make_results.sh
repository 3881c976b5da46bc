#!/usr/bin/env bash
# Regenerate every number and image of README.md's results from the shipped checkpoints.
# Usage: bash make_results.sh [REFERENCE_CHECKPOINTS]   (default: ../shared/reference/checkpoints)
# About 40 minutes on 2 CPU cores; each command is also quoted in README.md beside its output.
# The validation sweep that chose the settings trains its own short runs, so it is not repeated here:
#   python sweep.py --epochs 30 --jobs 2 --out results/sweep_validation.md
set -euo pipefail
cd "$(dirname "$0")"
ref=${1:-../shared/reference/checkpoints}
mkdir -p results images

# Swap grids, t-SNE and loss curves of the two paper-correct runs; swap grids of the style-KL variant.
for run in mlvae_eps0.1 mlvae_eps1; do
  python inference.py --checkpoint-dir checkpoints/$run
  python inference.py --checkpoint-dir checkpoints/$run --accumulate-evidence
  python tsne.py --checkpoint-dir checkpoints/$run
done
python inference.py --checkpoint-dir checkpoints/mlvae_eps0.1_stylekl4
python inference.py --checkpoint-dir checkpoints/mlvae_eps0.1_stylekl4 --accumulate-evidence
python plot_losses.py --checkpoint-dir checkpoints/mlvae_eps0.1 checkpoints/mlvae_eps1 \
  checkpoints/reference_objective_eps0.1 --out images/losses.png

# Latent-classifier tables (the reference's protocol) and swap scores.
for run in mlvae_eps0.1 mlvae_eps1 reference_objective_eps0.1 \
           mlvae_klpersample_eps0.1 mlvae_eps0.1_stylekl4 mlvae_eps0.1_fashion-mnist \
           mlvae_eps0.1_epoch100 reference_objective_eps0.1_epoch100 mlvae_detach_eps0.1_epoch100; do
  python classifier.py --both --no-progress --checkpoint-dir checkpoints/$run --json results/classifier_$run.json \
    | tee results/classifier_$run.md
  python swap_score.py --checkpoint-dir checkpoints/$run --json results/swap_score_$run.json \
    | tee results/swap_score_$run.md
done
python inference.py --checkpoint-dir checkpoints/mlvae_eps0.1_fashion-mnist
python inference.py --checkpoint-dir checkpoints/mlvae_eps0.1_fashion-mnist --accumulate-evidence

# The reference's published weights: its table with our evaluation, at the eps std of each training.
if [ -f "$ref/encoder_0.1_var_reparam" ]; then
  for eps in 0.1 1; do
    weights=(--eps-std $eps --encoder "$ref/encoder_${eps}_var_reparam" --decoder "$ref/decoder_${eps}_var_reparam")
    python classifier.py --both --no-progress "${weights[@]}" --json results/classifier_reference_eps$eps.json \
      | tee results/classifier_reference_eps$eps.md
    python swap_score.py "${weights[@]}" --json results/swap_score_reference_eps$eps.json \
      | tee results/swap_score_reference_eps$eps.md
  done
  python group_size.py --encoder "$ref/encoder_0.1_var_reparam" --decoder "$ref/decoder_0.1_var_reparam" \
    --eps-std 0.1 --label "reference weights, eps 0.1" --json results/group_size_reference_eps0.1.json
fi

# Test-time group size, and few-shot classes never seen in training.
python group_size.py --checkpoint-dir checkpoints/mlvae_eps0.1_stylekl4 --label "ours, mlvae_eps0.1_stylekl4" \
  --json results/group_size_mlvae_eps0.1_stylekl4.json
python group_size.py --checkpoint-dir checkpoints/mlvae_eps0.1 --label "ours, mlvae_eps0.1" \
  --json results/group_size_mlvae_eps0.1.json \
  --compare results/group_size_mlvae_eps0.1_stylekl4.json $(ls results/group_size_reference_eps0.1.json 2>/dev/null) \
  --out images/group_size.png
python few_shot.py --checkpoint-dir checkpoints/mlvae_eps0.1_classes01234567 --json results/few_shot.json \
  | tee results/few_shot.md
