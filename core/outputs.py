"""Outputs that appear whole or not at all: the staging directory every pipeline and trainer writes through.

`staged_output` gives a directory beside the output that becomes the output only when the block
succeeds: on a local filesystem one ``rename``, so readers see either no output or all of it; on object
stores (``gs://``), which have no directory rename, the files are renamed one by one after success and an
empty ``_SUCCESS`` is written last. Intermediate files a pipeline keeps while it runs (EM chunks, volume
parts) live under ``STAGING/.work`` (`WORK_DIR`) and are removed before the commit.

`write_json` writes the small JSON files runs leave beside their outputs (numpy values as lists,
non-finite floats as null).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

from headrace.core.errors import HeadraceError

__all__ = ["WORK_DIR", "commit_directory", "staged_output", "write_json"]

# Pipelines may keep intermediate files under OUTPUT/.work (e.g. EM chunks read every iteration); the
# directory is removed before the output is committed, and never appears in a finished output.
WORK_DIR = ".work"


class staged_output:
    """Context manager giving a staging directory that becomes `output` only if the block succeeds.

    With ``overwrite=True`` an existing `output` is replaced after the new one is complete. On failure the
    staging directory is removed and any existing output is left untouched.
    """

    def __init__(self, output: str | os.PathLike, *, overwrite: bool = False):
        self.remote = "://" in str(output)
        self.overwrite = overwrite
        tag = uuid.uuid4().hex[:8]
        if self.remote:
            self.output = str(output).rstrip("/")
            parent, _, base = self.output.rpartition("/")
            self.staging = f"{parent}/.{base}.staging-{tag}"
        else:
            self.output = Path(output).absolute()
            self.staging = self.output.parent / f".{self.output.name}.staging-{tag}"

    def __enter__(self):
        if self.remote:
            from apache_beam.io.filesystems import FileSystems

            if FileSystems.exists(self.output + "/_SUCCESS") and not self.overwrite:
                raise HeadraceError(f"output {self.output} already exists; pass --overwrite")
            return self.staging
        if self.output.exists() and not self.overwrite:
            raise HeadraceError(f"output {self.output} already exists; pass --overwrite to replace it")
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.remote:
            self._exit_remote(failed=exc_type is not None)
            return
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        shutil.rmtree(self.staging / WORK_DIR, ignore_errors=True)
        commit_directory(self.staging, self.output)

    def _exit_remote(self, *, failed: bool) -> None:
        from apache_beam.io.filesystems import FileSystems

        staged = [m.path for r in FileSystems.match([self.staging + "/**"]) for m in r.metadata_list]
        if failed:
            if staged:
                FileSystems.delete(staged)
            return
        work = [p for p in staged if p.startswith(f"{self.staging}/{WORK_DIR}/")]
        if work:
            FileSystems.delete(work)
        staged = [p for p in staged if p not in set(work)]
        if self.overwrite:
            old = [m.path for r in FileSystems.match([self.output + "/**"]) for m in r.metadata_list]
            if old:
                FileSystems.delete(old)
        FileSystems.rename(staged, [self.output + p[len(self.staging) :] for p in staged])
        FileSystems.create(self.output + "/_SUCCESS").close()


def commit_directory(staging: Path, output: Path) -> None:
    """Renames the local directory `staging` to `output`, replacing an existing `output` only once the new
    one is in place (the old one is moved aside first, then removed)."""
    if output.exists():
        trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output, trash)
        os.rename(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staging, output)


def write_json(path: str | os.PathLike, data: Mapping) -> None:
    """`data` as indented JSON at a local `path` (numpy values as lists, NaN and infinities as null)."""

    def default(v):
        try:  # numpy scalars and arrays
            return v.tolist()
        except AttributeError:
            raise TypeError(f"not JSON serialisable: {type(v).__name__}") from None

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    Path(path).write_text(
        json.dumps({k: clean(v) for k, v in data.items()}, indent=2, default=default) + "\n"
    )
