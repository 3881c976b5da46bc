"""tsne.py end to end on a tiny trained model and a few test images."""
import pytest
from PIL import Image

import tsne
from conftest import git, run_python


def test_writes_the_three_maps_as_png(tiny_run, tmp_path, capsys):
    out = tsne.main(["--checkpoint-dir", str(tiny_run), "--num-samples", "60", "--perplexity", "5",
                     "--out", str(tmp_path / "t.png")])
    assert Image.open(out).size[0] > 3 * Image.open(out).size[1] / 2  # three panels side by side
    assert str(out) in capsys.readouterr().out


def test_group_members_share_their_class_point_with_evidence(tiny_run):
    import torch
    from runs import load_models

    args = tsne.build_parser().parse_args(["--checkpoint-dir", str(tiny_run)])
    encoder, _, _ = load_models(args, torch.device("cpu"))
    labels = torch.tensor([3, 3, 5, 3])
    panels = tsne.latent_panels(encoder, torch.rand(4, 1, 28, 28), labels, evidence_batch=2)
    with_evidence = panels["class, with evidence"]
    assert torch.equal(with_evidence[0], with_evidence[1])  # digit 3 in the first batch
    assert not torch.equal(with_evidence[0], with_evidence[3])  # digit 3 in the second batch


def test_too_many_samples_are_rejected(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tsne.main(["--checkpoint-dir", str(tiny_run), "--num-samples", "20000"])
    assert exit_info.value.code == 2 and "--num-samples" in capsys.readouterr().err


def test_tsne_without_out_writes_into_out_and_leaves_git_status_clean(new_checkout):
    checkout = new_checkout()
    done = run_python(checkout / "tsne.py", "--num-samples", "60", "--perplexity", "5", cwd=checkout)
    assert done.returncode == 0, done.stderr
    assert (checkout / "out" / "tsne_mlvae_eps0.1.png").is_file()
    assert git(checkout, "status", "--porcelain").stdout == ""
