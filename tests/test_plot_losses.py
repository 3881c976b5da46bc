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


def test_several_runs_go_into_one_figure(tiny_run, tmp_path):
    out = plot_losses.main(["--checkpoint-dir", str(tiny_run), str(tiny_run), "--out", str(tmp_path / "l.png"),
                            "--log-scale"])
    assert out.is_file()


def test_missing_log_gives_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_losses.main(["--checkpoint-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and str(tmp_path / "log.csv") in capsys.readouterr().err
