"""Few-shot prototypes on class codes and in pixel space."""
import torch

import few_shot
import training


def test_nearest_prototype_accuracy():
    prototypes = torch.tensor([[[0.0, 0.0], [10.0, 0.0]], [[10.0, 0.0], [0.0, 0.0]]])  # two trials
    queries = torch.tensor([[1.0, 0.0], [9.0, 0.0]])
    accuracy = few_shot.nearest_prototype_accuracy(prototypes, queries, torch.tensor([0, 1]))
    assert accuracy.tolist() == [1.0, 0.0]


def test_shots_are_distinct_images_of_their_class():
    labels = torch.arange(3).repeat(20)
    picks = few_shot.draw_shots(labels, [1, 2], shots=5, trials=4, generator=torch.Generator().manual_seed(0))
    assert picks.shape == (4, 2, 5)
    assert (labels[picks[:, 0]] == 1).all() and (labels[picks[:, 1]] == 2).all()
    assert all(len(set(p.tolist())) == 5 for p in picks.flatten(0, 1))


def test_few_shot_runs_on_a_model_trained_without_the_held_out_digits(tmp_path):
    run_dir = training.main(["--epochs", "1", "--num-train", "512", "--batch-size", "64", "--no-progress",
                             "--classes", "0", "1", "2", "3", "4", "5", "6", "7",
                             "--checkpoint-dir", str(tmp_path), "--log-dir", str(tmp_path / "runs")])
    results = few_shot.main(["--checkpoint-dir", str(run_dir), "--trials", "5", "--shots", "1", "3"])
    for name in ("class_code", "pixels"):
        assert 0.0 <= results[name]["3"]["mean"] <= 100.0
    assert results["pixels"]["3"]["mean"] > 55.0  # 8 versus 9 from three mean images is better than chance
