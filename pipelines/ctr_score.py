"""``headrace run ctr-score``: bulk scoring of Criteo-format logs with a model in service, on Beam.

    headrace run ctr-score --model MROOT/current --input 'logs/*.tsv' --output OUT [--shards N]
        [--max-batch-size B] [--runner R]

    ReadLines -> Parse (-> rejected) -> RunInference(KeyedModelHandler(SavedModelHandler)) -> scores
                                                        -> report.json (read = scored + rejected)

Scoring is Beam's own `RunInference` with its TensorFlow model handler (`TFModelHandlerNumpy`): Beam
sizes the batches (`BatchElements`, adapting to the measured latency, unless ``--max-batch-size``
bounds them) and loads the model once per worker process (`Shared`), on every runner. The handler's
loader is `tf.keras.models.load_model`, which under Keras 3 refuses a SavedModel that is not a Keras
model; `SavedModelHandler` loads it with `tf.saved_model.load` and calls its ``serving_default``
signature (39 raw fields as strings -> probability, the one `headrace train ctr` exports).

``--model`` is a SavedModel, a trainer output holding ``saved_model/``, or a retrain date folder
(``MROOT/current`` included) holding ``model/saved_model/``. A symlink is resolved when the pipeline is
built, so a job keeps scoring with the model that was in service when it started.

Lines: tab-separated, 40 fields (label first, as in the training logs) or 39 (no label). A wrong field
count, a non-integer in I1..I13 or a label other than 0/1 is rejected with the field named.

Outputs in ``--output``: ``scores-SSSSS-of-NNNNN.tsv`` (header ``source, line, probability, label``;
label empty when the line has none), ``rejected-*.jsonl``, ``report.json`` (read, scored, rejected,
labelled, mean probability and, over the labelled lines, the mean label), ``resolved_config.json``
with the model's resolved path.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.models.criteo import FIELDS, INT_FIELDS
from headrace.transforms.counting import CountAll, ReasonCounts, reconcile
from headrace.transforms.io import Line, Rejected, WriteJson, WriteJsonLines
from headrace.transforms.textfiles import ReadLines

__all__ = ["CtrScoreConfig", "SavedModelHandler", "build_ctr_score", "parse_score_line", "resolve_model"]

_INTEGER = re.compile(r"^-?[0-9]{1,18}$")


@dataclasses.dataclass(frozen=True)
class CtrScoreConfig:
    model: str = dataclasses.field(
        default="",
        metadata={
            "help": "a SavedModel, a train ctr output, or a retrain date (MROOT/current)",
            "required": True,
        },
    )
    input: str = dataclasses.field(
        default="", metadata={"help": "file glob of Criteo-format lines", "required": True}
    )
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    shards: int = 4
    max_batch_size: int = dataclasses.field(
        default=0, metadata={"help": "upper bound of Beam's batches (0: Beam's default)"}
    )


@config_lib.register("ctr-score", command="run ctr-score")
def ctr_score() -> CtrScoreConfig:
    """Score Criteo-format lines with the model in service (RunInference)."""
    return CtrScoreConfig()


def resolve_model(path: str) -> str:
    """The SavedModel directory `path` names (see the module docstring), symlinks resolved."""
    if not path:
        raise ConfigError("--model is required")
    if "://" in path:  # an object store (gs://...): no symlinks there
        from apache_beam.io.filesystems import FileSystems

        base = path.rstrip("/")
        for candidate in (base, f"{base}/saved_model", f"{base}/model/saved_model"):
            if FileSystems.exists(f"{candidate}/saved_model.pb"):
                return candidate
        raise InputError(f"--model {path}: no saved_model.pb in it, in saved_model/ or in model/saved_model/")
    root = Path(os.path.realpath(path))
    for candidate in (root, root / "saved_model", root / "model" / "saved_model"):
        if (candidate / "saved_model.pb").is_file():
            return str(candidate)
    raise InputError(f"--model {path}: no saved_model.pb in it, in saved_model/ or in model/saved_model/")


def parse_score_line(line: Line) -> tuple[tuple[str, int, str], np.ndarray] | Rejected:
    """((source, line, label), the 39 fields) or a Rejected naming the field that is wrong."""
    parts = line.text.split("\t")
    if len(parts) == 40:
        label, fields = parts[0], parts[1:]
        if label not in ("0", "1"):
            return Rejected(line.path, line.number, f"label: {label[:20]!r} is not 0 or 1", line.text)
    elif len(parts) == 39:
        label, fields = "", parts
    else:
        return Rejected(
            line.path, line.number, f"field count: {len(parts)} (expected 40 with a label or 39)", line.text
        )
    for name, value in zip(INT_FIELDS, fields):
        if value and not _INTEGER.match(value):
            return Rejected(line.path, line.number, f"{name}: {value[:20]!r} is not an integer", line.text)
    return (line.path, line.number, label), np.array(fields, dtype=object)


class SavedModelHandler(TFModelHandlerNumpy):
    """Beam's TensorFlow numpy handler, loading a signature SavedModel (see the module docstring)."""

    def __init__(self, model_uri: str, **kwargs):
        super().__init__(model_uri, inference_fn=_serve, **kwargs)

    def load_model(self):
        import tensorflow as tf

        return tf.saved_model.load(self._model_uri).signatures["serving_default"]

    def get_metrics_namespace(self) -> str:
        return "ctr_score"


def _serve(model, batch, inference_args, model_id=None):
    """Beam's inference_fn: the batch's rows [B, 39] as the signature's 39 named string inputs."""
    import tensorflow as tf

    rows = np.stack(batch)
    feed = {name: tf.constant(rows[:, k].astype(str)) for k, name in enumerate(FIELDS)}
    probabilities = model(**feed)["probability"].numpy()
    return [PredictionResult(x, float(p), model_id) for x, p in zip(batch, probabilities)]


class _Parse(beam.DoFn):
    REJECTED = "rejected"

    def __init__(self):
        self._bad = beam.metrics.Metrics.counter("ctr_score", "rejected")

    def process(self, line: Line):
        parsed = parse_score_line(line)
        if isinstance(parsed, Rejected):
            self._bad.inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, parsed)
        else:
            yield parsed


def _row(keyed) -> str:
    (source, number, label), result = keyed
    return f"{source}\t{number}\t{result.inference:.7g}\t{label}"


class _Summary(beam.CombineFn):
    """(lines, labelled, sum of probabilities, sum of labels)."""

    def create_accumulator(self):
        return (0, 0, 0.0, 0.0)

    def add_input(self, acc, keyed):
        (_, _, label), result = keyed
        n, labelled, p, y = acc
        return (n + 1, labelled + bool(label), p + result.inference, y + (label == "1"))

    def merge_accumulators(self, accs):
        return tuple(map(sum, zip(*accs)))

    def extract_output(self, acc):
        return acc


def _report(counts: dict, summary, reasons: dict, model: str) -> dict:
    counts = {
        "read": counts.get("lines", 0) + counts.get("unreadable", 0),
        **{k: counts.get(k, 0) for k in ("scored", "rejected")},
    }
    reconcile(counts, "read", ("scored", "rejected"))
    n, labelled, p, y = summary
    return {
        **counts,
        "labelled": labelled,
        "mean_probability": p / n if n else None,
        "mean_label": y / labelled if labelled else None,
        "model": model,
        "rejected_reasons": dict(sorted(reasons.items())),
    }


def build_ctr_score(pipeline: beam.Pipeline, config: CtrScoreConfig) -> dict:
    """Adds ctr-score to `pipeline`; returns its named PCollections."""
    model = resolve_model(config.model)
    if not config.input:
        raise ConfigError("--input is required")
    out = config.output.rstrip("/")
    read = pipeline | "Read" >> ReadLines(config.input)
    parsed = read["lines"] | "Parse" >> beam.ParDo(_Parse()).with_outputs(_Parse.REJECTED, main="ok")
    batching = {"max_batch_size": config.max_batch_size} if config.max_batch_size else {}
    handler = KeyedModelHandler(SavedModelHandler(model, **batching))
    scored = parsed.ok | "RunInference" >> RunInference(handler)
    (
        scored
        | "Rows" >> beam.Map(_row)
        | "WriteScores"
        >> beam.io.WriteToText(
            f"{out}/scores",
            file_name_suffix=".tsv",
            num_shards=config.shards,
            header="source\tline\tprobability\tlabel",
        )
    )
    # One Flatten over ReadLines' rejected output, materialised once: Flink's job server (Beam 2.62) fails
    # a job whose multi-output ParDo output feeds two Flattens ("consumed but never produced").
    rejected = (
        (read["rejected"], parsed[_Parse.REJECTED])
        | "AllRejectedFlatten" >> beam.Flatten()
        | "AllRejected" >> beam.Reshuffle()
    )
    rejected | "WriteRejected" >> WriteJsonLines(f"{out}/rejected")
    counts = {
        "lines": read["lines"],
        "unreadable": read["rejected"],
        "scored": scored,
        "rejected": rejected,
    } | "Counts" >> CountAll()
    summary = scored | "Summary" >> beam.CombineGlobally(_Summary())
    reasons = rejected | "Reasons" >> ReasonCounts()
    report = counts | "Report" >> beam.Map(
        _report, beam.pvalue.AsSingleton(summary), beam.pvalue.AsSingleton(reasons), model
    )
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"scored": scored, "rejected": rejected, "report": report}
