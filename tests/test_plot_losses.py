"""plot_losses.py: the loss figure from a run's log.csv."""
import pytest
from PIL import Image

from studies import plot_losses


def test_writes_the_figure_next_to_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("epoch,iteration,reconstruction,style_kl,class_kl,images_per_s\n"
                                 "1,10,0.05,0.003,0.002,100\n2,20,0.04,0.004,0.001,100\n")
    out = plot_losses.main(["--checkpoint-dir", str(run)])
    assert out == run / "losses.png"
    assert Image.open(out).size[0] > Image.open(out).size[1]
    assert str(out) in capsys.readouterr().out


def test_several_runs_go_into_one_figure_with_a_panel_per_term(tmp_path, monkeypatch):
    header = "epoch,iteration,reconstruction,style_kl,class_kl,images_per_s\n"
    for name, epochs in (("a", 2), ("b", 3)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.csv").write_text(header + "".join(f"{e},{e},0.1,0.2,0.3,9\n" for e in range(1, epochs + 1)))
    figures = []
    monkeypatch.setattr(plot_losses, "save_figure", lambda fig, out: figures.append(fig))
    plot_losses.main(["--checkpoint-dir", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "l.png")])
    (fig,) = figures
    assert [ax.get_title() for ax in fig.axes] == ["reconstruction", "style KL", "class KL"]
    assert all([len(line.get_xdata()) for line in ax.lines] == [2, 3] for ax in fig.axes)


def test_missing_log_gives_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_losses.main(["--checkpoint-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and str(tmp_path / "log.csv") in capsys.readouterr().err
