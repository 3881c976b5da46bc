"""Few-shot prototypes on class codes and in pixel space."""
import torch

import training
from studies import few_shot


def test_nearest_prototype_accuracy():
    prototypes = torch.tensor([[[0.0, 0.0], [10.0, 0.0]], [[10.0, 0.0], [0.0, 0.0]]])  # two trials
    queries = torch.tensor([[1.0, 0.0], [9.0, 0.0]])
    accuracy = few_shot.nearest_prototype_accuracy(prototypes, queries, torch.tensor([0, 1]))
    assert accuracy.tolist() == [1.0, 0.0]


def test_few_shot_runs_on_a_model_trained_without_the_held_out_digits(tmp_path):
    run_dir = training.main(["--epochs", "1", "--num-train", "512", "--batch-size", "64", "--no-progress",
                             "--classes", "0", "1", "2", "3", "4", "5", "6", "7",
                             "--checkpoint-dir", str(tmp_path), "--log-dir", str(tmp_path / "runs")])
    results = few_shot.main(["--checkpoint-dir", str(run_dir), "--trials", "5", "--shots", "1", "3"])
    assert set(results["class_code"]) == set(results["pixels"]) == {"1", "3"}
    assert results["pixels"]["3"]["mean"] > 55.0  # 8 versus 9 from three mean images is better than chance
