"""`headrace demo`, the README's main job, runs every stage and prints its summary (on the small sizes:
the user's demo runs the same stages on more data)."""

from __future__ import annotations

from headrace.runners import demo


def test_demo_runs_every_stage(tmp_path, capsys):
    assert demo.run_demo(str(tmp_path / "demo"), demo.SMALL) == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    assert "run example" in out and "train mlp" in out and "eval AUC" in out
    assert "run crowd-labels" in out and "GroupAnno" in out and "train crowd-classifier" in out
    assert "run ctr-ingest" in out and "train ctr deepfm" in out
    assert "run ct-ingest" in out and "labelled" in out
    assert "train unet3d" in out and "Dice" in out
