"""Staged outputs: a directory appears whole or not at all, and an old one survives a failed overwrite."""

from __future__ import annotations

import pytest

from headrace.core.errors import HeadraceError
from headrace.core.outputs import staged_output


def test_staged_output_commits_on_success_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out) as staging:
        (staging / "part").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with staged_output(out) as staging:
        (staging / "part").write_text("v1")
    assert (out / "part").read_text() == "v1"

    with pytest.raises(HeadraceError, match="already exists"), staged_output(out):
        pass
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as staging:
        (staging / "part").write_text("v2")
        raise RuntimeError("boom")
    assert (out / "part").read_text() == "v1"  # a failed overwrite keeps the old output
    with staged_output(out, overwrite=True) as staging:
        (staging / "part").write_text("v2")
    assert (out / "part").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
