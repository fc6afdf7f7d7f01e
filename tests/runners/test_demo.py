"""`headrace demo`, the README's main job, runs every stage and prints its summary (on the small sizes:
the user's demo runs the same stages on more data)."""

from __future__ import annotations

from headrace.pipelines.omni_data import espeak_available
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
    assert "run image-ingest" in out and "train resnet-18" in out and "top-1" in out
    assert "text-ingest + train lm" in out and "licence files" in out and "perplexity" in out
    if espeak_available():
        assert "train omni" in out and "first audio" in out
        answers = tmp_path / "demo" / "omni-answers"
        assert (answers / "audio" / "answer.wav").is_file() and (answers / "image" / "answer.png").is_file()
    assert (tmp_path / "demo" / "resnet" / "augmented.png").is_file() and (
        tmp_path / "demo" / "resnet" / "curves.png"
    ).is_file()


def test_workdir_it_did_not_make_is_refused_unless_overwrite(tmp_path, capsys):
    from headrace.runners import cli

    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert cli.main(["demo", "--workdir", str(precious)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not made by `headrace demo`" in err and "--overwrite" in err
    assert (precious / "thesis.tex").read_text() == "years of work"
    # An empty directory, or one the demo made (its marker file), is the demo's to replace.
    root = demo.prepare_workdir(str(tmp_path / "fresh"))
    (root / "stale.txt").write_text("old output")
    root = demo.prepare_workdir(str(root))
    assert sorted(p.name for p in root.iterdir()) == [demo.MARKER]
    root = demo.prepare_workdir(str(precious), overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == [demo.MARKER]
