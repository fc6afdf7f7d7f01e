"""Serving copies of an online CTR model: published by deltas as versioned SavedModels, read by servers.

`ServingPublisher` (the trainer's side) keeps a host copy of the sparse parameters. Every sync it applies
the rows the table touched since the last one (and drops the ids it expired), and with a dense sync the
dense weights too; then it writes the copy as ``S/<version>/`` (the batch model's ``serving_default``: 39
raw fields in, ``probability`` out, plus ``sync.json``) and replaces ``S/LATEST`` atomically, so a reader
never sees half a model. Old versions beyond `keep_versions` are removed.

`ServingCopy` (the reader's side) loads ``S/<LATEST>`` and reloads when LATEST changes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from headrace.core import mesh as mesh_lib
from headrace.core.errors import HeadraceError
from headrace.models.ctr_serving import ServingCTR, VersionWriter

__all__ = ["ServingCopy", "ServingPublisher"]


class ServingPublisher:
    """The serving copy's host state, updated from a CTR task (its model, table, sparse rows and field mask) by deltas and published as versions."""

    def __init__(self, task, directory: Path, keep_versions: int = 3):
        self.task = task
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep_versions = keep_versions
        dim = task.config.embedding_dim
        self._slot: dict[int, int] = {}  # id -> row of the arrays below
        self._E = np.zeros((1024, dim), np.float32)
        self._w = np.zeros((1024, 1), np.float32)
        self._free: list[int] = []
        self._dense = [mesh_lib.to_numpy(v) for v in task.model.weights]
        self._writer: VersionWriter | None = None
        self.synced_clock = -1  # rows used after this table clock are not in the copy yet
        self.version = self._latest_version()

    def _latest_version(self) -> int:
        latest = self.dir / "LATEST"
        return int(latest.read_text().strip()) if latest.is_file() else 0

    def _put(self, ids: np.ndarray, E: np.ndarray, w: np.ndarray) -> None:
        for i, key in enumerate(ids.tolist()):
            slot = self._slot.get(key)
            if slot is None:
                if self._free:
                    slot = self._free.pop()
                else:
                    slot = len(self._slot)
                    if slot >= len(self._E):
                        self._E = np.concatenate([self._E, np.zeros_like(self._E)])
                        self._w = np.concatenate([self._w, np.zeros_like(self._w)])
                self._slot[key] = slot
            self._E[slot], self._w[slot] = E[i], w[i]

    def apply_delta(self, clock: int, dense: bool) -> dict:
        """Copies rows used since the last sync (and drops expired ids); the dense weights if `dense`.
        `clock` is the number of steps run."""
        table = self.task.table
        row_ids = table.row_ids.numpy()
        last_seen = table.last_seen.numpy()
        touched = np.flatnonzero((last_seen > self.synced_clock) & (row_ids > 0))
        touched = touched[touched > 0]
        E = mesh_lib.to_numpy(self.task.sparse.E)
        w = mesh_lib.to_numpy(self.task.sparse.w)
        self._put(row_ids[touched], E[touched], w[touched])
        removed = 0
        if self._slot:
            keys = np.fromiter(self._slot.keys(), np.int64, len(self._slot))
            gone = keys[table.lookup(tf.constant(keys)).numpy() == 0]
            for key in gone.tolist():
                self._free.append(self._slot.pop(key))
            removed = len(gone)
        if dense:
            self._dense = [mesh_lib.to_numpy(v) for v in self.task.model.weights]
        self.synced_clock = clock - 1  # steps 0..clock-1 have run, each using the table at its own clock
        return {"rows_updated": len(touched), "rows_removed": removed, "dense_synced": dense}

    def publish(self, info: dict, logit_shift: float) -> int:
        """Writes the copy as the next version and makes it current; returns the version."""
        task = self.task
        keys = np.fromiter(self._slot.keys(), np.int64, len(self._slot))
        slots = np.fromiter(self._slot.values(), np.int64, len(self._slot))
        values = (keys, self._E[slots], self._w[slots], self._dense, task.field_mask, logit_shift)
        if self._writer is None:
            self._writer = VersionWriter(ServingCTR(task.model.config, *values))
        else:  # the same graph with new values: the version is its variables
            self._writer.module.update(*values)
        version = self.version + 1
        final = self.dir / f"{version:08d}"
        staging = self.dir / f".{version:08d}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        self._writer.write(staging)
        (staging / "sync.json").write_text(
            json.dumps({**info, "version": version, "rows": len(keys), "published_unix": time.time()})
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        tmp = self.dir / ".LATEST.tmp"
        tmp.write_text(f"{version:08d}\n")
        os.replace(tmp, self.dir / "LATEST")  # atomic: readers see the old version or the new one
        self.version = version
        versions = sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())
        for old in versions[: -self.keep_versions]:
            shutil.rmtree(old, ignore_errors=True)
        return version


class ServingCopy:
    """The reader side of a serving directory: `refresh` loads ``S/<LATEST>`` when LATEST changes."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.version: str | None = None
        self.info: dict = {}
        self._serve = None

    def refresh(self) -> bool:
        latest = self.dir / "LATEST"
        if not latest.is_file():
            return False
        version = latest.read_text().strip()
        if version == self.version:
            return False
        loaded = tf.saved_model.load(str(self.dir / version))
        self._serve, self._keep = loaded.signatures["serving_default"], loaded
        self.info = json.loads((self.dir / version / "sync.json").read_text())
        self.version = version
        return True

    def probability(self, fields: dict) -> np.ndarray:
        if self._serve is None and not self.refresh():
            raise HeadraceError(f"{self.dir}: no serving copy yet (no LATEST)")
        return self._serve(**{k: tf.constant(v) for k, v in fields.items()})["probability"].numpy()
