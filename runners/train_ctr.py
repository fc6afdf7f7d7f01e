"""``headrace train ctr``: CTR models on a DTensor mesh, from the ctr-ingest shards.

    headrace train ctr --data OUT --model {lr,fm,wide_deep,deepfm,dcn,dcn_v2} --output MODEL
        [--batch-size B] [--epochs E] [--optimizer {adam,cowclip}] [--embedding-dim D] [--min-count N]
        [--feature-selection {none,gating,ensemble_gating}] [--ensemble-size K] [--mesh batch=4,model=2]
        [--resume] [--online ...]

The model, its step and CowClip are `headrace.runners.ctr_task`; ``--online`` trains from a Kafka topic
instead (`headrace.runners.train_ctr_online`).

Feature selection runs two phases in one output: the gated model (``gating`` or ``ensemble_gating``), then
a model retrained from scratch on the selected fields only, the one saved. A field is selected when any
gate set's probability exceeds ``--gate-threshold``.

Outputs in MODEL/: metrics.json (auc, logloss, examples_per_sec, steps, table_rows_used, ids_filtered,
ids_expired, ...), selected_features.json (with feature selection), saved_model/ (serving_default: 39 raw
Criteo fields as strings -> probability), checkpoint/, tensorboard/, curves.png, resolved_config.json.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError
from headrace.core.outputs import write_json
from headrace.models.criteo import FIELDS
from headrace.runners import loop
from headrace.runners.ctr_task import CTRTask, CTRTrainConfig

__all__ = ["CTRTrainConfig", "select_fields", "train_and_evaluate"]

_log = logging.getLogger("headrace.train")


@config_lib.register("ctr", command="train ctr")
def ctr() -> CTRTrainConfig:
    """DeepFM, batch 1024, Adam, one epoch, batch=4,model=2 mesh."""
    return CTRTrainConfig()


@config_lib.register("ctr-cowclip-64k", command="train ctr")
def ctr_cowclip_64k() -> CTRTrainConfig:
    """DeepFM at batch 65536 with CowClip (sqrt-scaled dense lr, linear L2, warm-up)."""
    return CTRTrainConfig(batch_size=65536, optimizer="cowclip")


@config_lib.register("ctr-ensemble-gating", command="train ctr")
def ctr_ensemble_gating() -> CTRTrainConfig:
    """DeepFM with ensemble gating feature selection (4 gate sets), then retraining on the selection."""
    return CTRTrainConfig(feature_selection="ensemble_gating", epochs=2)


def select_fields(gating: CTRTask, threshold: float) -> dict:
    """The selection from a trained gated task: every field any gate set keeps open.

    The sets explore different subsets and the L0 penalty closes noise fields in every set. Measured on
    the planted log over 3 seeds: all 9 informative fields and no noise field, where the sets' mean missed
    the weakest field once."""
    probs = gating.gates.probability()  # [K, F]
    keep = probs.max(axis=0)
    selected = [f for f, p in zip(FIELDS, keep) if p > threshold] or [FIELDS[int(np.argmax(keep))]]
    return {
        "selected": selected,
        "dropped": [f for f in FIELDS if f not in selected],
        "gate_probability": {f: round(float(p), 4) for f, p in zip(FIELDS, keep)},
        "gate_probability_mean": {f: round(float(p), 4) for f, p in zip(FIELDS, probs.mean(axis=0))},
        "gate_probability_per_set": [[round(float(p), 4) for p in row] for row in probs],
        "method": gating.config.feature_selection,
        "ensemble_size": int(probs.shape[0]),
    }


def train_and_evaluate(config: CTRTrainConfig) -> dict:
    if config.online:
        from headrace.runners.train_ctr_online import train_online

        return train_online(config)
    if not config.data:
        raise ConfigError("--data is required")
    if config.warm_start and config.feature_selection != "none":
        raise ConfigError("--warm-start continues a trained model: use it without --feature-selection")
    with loop.Run(config) as run:
        curves, selection = {}, None
        if config.feature_selection != "none":
            gating = CTRTask(config, gated=True, label="gating")
            gated = run.train(gating, "gating")
            curves["gating loss"] = gated.curves()["train loss"]
            selection = select_fields(gating, config.gate_threshold)
            selection["gated_model"] = {"auc": gated.final["auc"], "logloss": gated.final["logloss"]}
            config = dataclasses.replace(config, fields=tuple(selection["selected"]))
        task = CTRTask(config, label="final")
        result = run.train(task, "final", resume=run.resume and selection is None)
        extra = {}
        if selection is not None:
            selection["retrained"] = {"auc": result.final["auc"], "logloss": result.final["logloss"]}
            write_json(run.dir / "selected_features.json", selection)
            extra["selected_features"] = len(selection["selected"])
        metrics = run.finish(task, result, extra=extra, curves=curves)
    _log.info(
        "ctr %s: eval auc=%.4f logloss=%.4f, %.0f ex/s",
        config.model,
        metrics["auc"],
        metrics["logloss"],
        metrics["examples_per_sec"],
    )
    return metrics
