"""Checkpoints of a training phase (groups under one step number) and batch padding, for `loop`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

__all__ = ["HOST_GROUP", "Checkpoints", "pad_batch"]

#: the checkpoint group of host state (the same on every client: written by client 0 only)
HOST_GROUP = "host"


class Checkpoints:
    """Groups of trackables checkpointed together under one step number.

    Each group is a `tf.train.CheckpointManager` of its own, written in the order given; the newest
    number present in every group is a consistent set, so a run killed between two writes resumes from
    the set before.

    Under several DTensor clients, a mesh group's save is collective: every client saves into the one
    shared directory and DTensor writes each shard once, from the client holding it, and merges them. The
    ``host`` group (host state, the same on every client) is written by client 0 only; every client
    restores every group.
    """

    def __init__(
        self,
        directory: Path,
        groups: Mapping[str, Mapping[str, Any]],
        max_to_keep: int = 2,
        *,
        chief: bool = True,
    ):
        self._managers = [
            (
                name,
                tf.train.CheckpointManager(
                    tf.train.Checkpoint(**items), str(directory / name if name else directory), max_to_keep
                ),
            )
            for name, items in groups.items()
            if items
        ]
        self._chief = chief

    def __bool__(self) -> bool:
        return bool(self._managers)

    def save(self, step: int) -> None:
        for name, manager in self._managers:
            if name != HOST_GROUP or self._chief:
                manager.save(checkpoint_number=step)

    def restore_latest(self) -> int | None:
        """Restores the newest step every group has; returns it (None when there is none)."""
        managers = [m for _, m in self._managers]
        numbers = [{int(p.rsplit("-", 1)[1]): p for p in m.checkpoints} for m in managers]
        common = sorted(set.intersection(*(set(n) for n in numbers))) if numbers else []
        if not common:
            return None
        step = common[-1]
        for manager, paths in zip(managers, numbers):
            manager.checkpoint.restore(paths[step]).assert_existing_objects_matched()
        return step


def pad_batch(batch: Mapping[str, Any], multiple: int) -> tuple[dict[str, Any], int]:
    """Pads every array of a host batch along dimension 0 (repeating its last row) to a multiple of
    `multiple`; returns the padded batch and the true size. Ragged tensors pass through unpadded."""
    sizes = {int(v.shape[0]) for v in batch.values() if not isinstance(v, tf.RaggedTensor)}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
    (n,) = sizes
    pad = (-n) % multiple
    if not pad:
        return dict(batch), n
    padded = {}
    for k, v in batch.items():
        if isinstance(v, tf.RaggedTensor):
            padded[k] = v
        elif isinstance(v, np.ndarray):
            padded[k] = np.concatenate([v, np.repeat(v[-1:], pad, axis=0)])
        else:
            padded[k] = tf.concat([v, tf.repeat(v[-1:], pad, axis=0)], axis=0)
    return padded, n
