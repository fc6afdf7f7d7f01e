"""``headrace run crowd-labels``: aggregate crowdsourced labels with majority vote, Dawid-Skene or GroupAnno.

    headrace run crowd-labels --annotations A.csv [--annotators W.csv] [--tasks T.csv] [--truth Y.csv]
        --method {majority_vote,dawid_skene,groupanno} --output OUT [--iterations N] [--tolerance T]

The models and their EM updates are written down in `headrace.transforms.crowd_em`. The Beam structure:

    ReadTable(A) -> Vocabulary (classes, workers, groups from W; a side input)
                 -> partition rows by hash(task) -> GroupByKey -> BuildChunks (dedup -> rejected)
    chunks -> MajorityStats -> M-step -> [EStep -> M-step] x N -> Posteriors -> JoinByPartition -> outputs
    every Rejected -> rejected.csv; counts -> report.json (read = used + rejected, per input file)

Annotations are grouped by task once, into `partitions` chunks of CSR numpy arrays; every E-step maps over
the chunks with the current parameters as a side input, and every M-step is a keyed combine of per-worker
count matrices (keyed by worker bucket), then per group. The iterations are unrolled in one graph rather
than driven by a loop of pipelines: one job instead of N submissions (seconds each on Flink or Dataflow),
and the chunks stay where the runner put them instead of being written and re-read every iteration. The
price is that the graph cannot stop early: once the log-likelihood has converged, the parameters are
marked converged and the remaining iterations pass them through without touching the data.

Outputs in ``--output``: labels.csv, posteriors.csv, annotators.csv, report.json, rejected.csv,
resolved_config.json; for groupanno groups.csv and groups.png; with ``--tasks``, TFRecord shards
``tasks-{train,eval}-*.tfrecord`` of (task, text, posterior) for ``headrace train crowd-classifier``, with
their spec.json (`crowd_task_spec`; `dataset` reads them).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import apache_beam as beam
import numpy as np

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError
from headrace.core.outputs import WORK_DIR
from headrace.transforms import crowd_em as em
from headrace.transforms.columnar import (
    CsvBatch,
    ReadCsvBatches,
    UnionStrings,
    first_header,
    partition,
    unique_strings,
)
from headrace.transforms.counting import NamedValues, ReasonCounts, SumArrays, Total, reconcile
from headrace.transforms.crowd_chunks import BuildChunks, Vocab, group_table, make_vocab
from headrace.transforms.crowd_outputs import annotator_rows, csv_rows, group_rows, plot_groups, task_outputs
from headrace.transforms.io import Rejected, WriteJson, WriteSortedText, WriteTextWithHeader, match_files
from headrace.transforms.tfrecord import (
    Feature,
    FeatureSpec,
    WriteSortedShards,
    WriteSpec,
    output_dataset,
    read_spec,
)
from headrace.transforms.validation import RejectEmptyFields

__all__ = ["CrowdConfig", "build_crowd_labels", "crowd_task_spec", "dataset"]

Method = Literal["majority_vote", "dawid_skene", "groupanno"]


@dataclasses.dataclass(frozen=True)
class CrowdConfig:
    annotations: str = dataclasses.field(
        default="", metadata={"help": "CSV task,worker,label", "required": True}
    )
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    method: Method = "dawid_skene"
    annotators: str = dataclasses.field(default="", metadata={"help": "CSV worker,group"})
    tasks: str = dataclasses.field(default="", metadata={"help": "CSV task,text (for the classifier)"})
    truth: str = dataclasses.field(default="", metadata={"help": "CSV task,label: report accuracy"})
    task_priors: str = dataclasses.field(
        default="",
        metadata={"help": "CSV task,<class>...: per-task priors (crowd-classifier predictions.csv)"},
    )
    iterations: int = 50
    tolerance: float = dataclasses.field(
        default=1e-7, metadata={"help": "stop when |dLL| <= tolerance * |LL|"}
    )
    smoothing: float = 0.01
    group_strength: float | None = dataclasses.field(
        default=None, metadata={"help": "GroupAnno's prior strength tau (default: the number of classes)"}
    )
    estimate_group_strength: bool = dataclasses.field(
        default=False, metadata={"help": "estimate tau per group by empirical Bayes"}
    )
    partitions: int = dataclasses.field(
        default=16, metadata={"help": "task partitions: chunks E-steps run over in parallel"}
    )
    worker_buckets: int = 8
    eval_fraction: float = 0.2
    shards: int = 2


@config_lib.register("crowd-labels", command="run crowd-labels")
def crowd_labels() -> CrowdConfig:
    """Label aggregation: Dawid-Skene, 50 iterations, 16 task partitions."""
    return CrowdConfig()


@config_lib.register("crowd-labels-groupanno", command="run crowd-labels")
def crowd_labels_groupanno() -> CrowdConfig:
    """Label aggregation with GroupAnno (needs --annotators)."""
    return CrowdConfig(method="groupanno")


def crowd_task_spec(num_classes: int | None = None) -> FeatureSpec:
    """Records of the classifier shards. The writer does not know K when the graph is built, so the
    posterior is written as a list; spec.json, written once K is known, declares it a fixed [K] vector."""
    return FeatureSpec(
        "crowd_task",
        {
            "task": Feature("bytes"),
            "text": Feature("bytes"),
            "posterior": Feature("float32", None if num_classes is None else (num_classes,)),
            "label": Feature("int64", description="argmax of the posterior"),
            "truth": Feature("int64", default=-1, description="true class index, -1 if unknown"),
        },
    )


def dataset(out: str, split: str, batch_size: int, **kwargs):
    """Batched classifier records of ``OUT/tasks-{split}-*.tfrecord`` (``train`` or ``eval``):
    ``{"task", "text", "posterior" [B, K], "label", "truth"}``, K read from the output's spec.json."""
    prefix = f"tasks-{split}"
    shape = read_spec(out, prefix).features["posterior"].shape
    return output_dataset(out, prefix, batch_size, crowd_task_spec(shape[0] if shape else None), **kwargs)


# -------------------------------------------------------------------------------------------------
# Composite steps
# -------------------------------------------------------------------------------------------------


@beam.ptransform_fn
def ReadTable(pbegin, path: str, columns: list[str], flag: str):
    """A CSV file's rows with every column non-empty: ``{"ok": CsvBatch, "malformed": Rejected (field
    count, blank line), "empty": Rejected (an empty field), "rows": rows parsed}``."""
    read = pbegin | "Read" >> ReadCsvBatches(path, columns, flag=flag)
    valid = read.batches | "RejectEmpty" >> beam.ParDo(RejectEmptyFields(columns)).with_outputs(
        RejectEmptyFields.REJECTED, main="ok"
    )
    return {
        "ok": valid.ok,
        "malformed": read.rejected,
        "empty": valid[RejectEmptyFields.REJECTED],
        "rows": read.batches | "Rows" >> Total(lambda b: b.num_rows),
    }


@beam.ptransform_fn
@beam.typehints.with_input_types(CsvBatch)
@beam.typehints.with_output_types(Vocab)
def Vocabulary(batches, groups=None):
    """Annotation batches -> the single `Vocab` (sorted classes and workers, each worker's group from the
    ``worker -> group`` singleton `groups`, if any)."""
    classes = (
        batches
        | "Labels" >> beam.Map(lambda b: unique_strings(b.table.column("label")))
        | "Classes" >> beam.CombineGlobally(UnionStrings())
    )
    workers = (
        batches
        | "WorkerNames" >> beam.Map(lambda b: unique_strings(b.table.column("worker")))
        | "Workers" >> beam.CombineGlobally(UnionStrings())
    )
    side = [beam.pvalue.AsSingleton(groups)] if groups is not None else []
    return classes | "Vocab" >> beam.Map(
        lambda c, w, g=None: make_vocab(c, w, g), beam.pvalue.AsSingleton(workers), *side
    )


@beam.ptransform_fn
@beam.typehints.with_input_types(em.ChunkRef)
def RunEM(chunks, vocab_si, settings: em.EMSettings, iterations: int):
    """Chunk references -> the final `em.Params`: majority-vote initialisation, then `iterations`
    E-steps (a ParDo over the chunks) and M-steps (a keyed combine of their statistics), unrolled."""
    # The chunk references plus one sentinel, from one producer: Flink's job server (Beam 2.62) fails on a
    # Flatten feeding ParDos whose side inputs derive from its own output ("A PCollectionNode should have
    # exactly one producing PTransformNode"). The Reshuffle spreads the references over workers again.
    carried = (
        chunks
        | "ChunkList" >> beam.combiners.ToList()
        | "WithSentinel" >> beam.FlatMap(lambda refs: [*refs, em.SENTINEL])
        | "SpreadChunks" >> beam.Reshuffle()
    )
    stats = (
        carried
        | "MajorityStats" >> beam.ParDo(em.EMStep(settings, majority=True), vocab_si)
        | "CombineInit" >> beam.CombinePerKey(em.StatsFn())
    )
    for t in range(1, iterations + 1):
        stats = (
            carried
            | f"EStep{t}" >> beam.ParDo(em.EMStep(settings), vocab_si, beam.pvalue.AsList(stats))
            | f"MStep{t}" >> beam.CombinePerKey(em.StatsFn())
        )
    return (
        chunks.pipeline
        | "Once" >> beam.Create([None])
        | "FinalParams" >> beam.Map(_final_params, beam.pvalue.AsList(stats), vocab_si, settings)
    )


def _settings(config: CrowdConfig) -> em.EMSettings:
    return em.EMSettings(
        method=config.method,
        smoothing=config.smoothing,
        tolerance=config.tolerance,
        group_strength=config.group_strength,
        estimate_group_strength=config.estimate_group_strength,
        buckets=config.worker_buckets,
    )


def _final_params(_, stats, vocab: Vocab, settings: em.EMSettings) -> em.Params | None:
    if not vocab.classes:
        return None
    collected = em.collect_stats(
        stats, len(vocab.workers), len(vocab.groups), len(vocab.classes), settings.buckets
    )
    return em.derive_params(collected, vocab.worker_groups, settings)


class _Posteriors(beam.DoFn):
    """Final posteriors per chunk, and per-worker sums for the estimated accuracy."""

    ACCURACY = "accuracy"

    def __init__(self, method: str, buckets: int):
        self._method, self._buckets = method, buckets

    def process(self, ref: em.ChunkRef, vocab: Vocab, params: em.Params | None = None):
        chunk = em.load_chunk(ref)
        if self._method == "majority_vote":
            q = em.majority_posteriors(chunk, len(vocab.classes))
        else:
            q, _ = em.e_step(chunk, params)
        yield chunk.id, q
        # Estimated accuracy of worker j: mean over its labels of q_t(label), the posterior that it is right.
        right = q[chunk.task_index, chunk.labels]
        sums = np.bincount(chunk.local, weights=right, minlength=len(chunk.uniq))
        counts = np.bincount(chunk.local, minlength=len(chunk.uniq)).astype(np.float64)
        stats = np.stack([sums, counts], axis=1)[:, None, :]  # [u, 1, 2]
        bucket = chunk.uniq % self._buckets
        for b in np.unique(bucket):
            sel = bucket == b
            yield beam.pvalue.TaggedOutput(
                self.ACCURACY,
                (("w", int(b)), ("w", (chunk.uniq[sel] // self._buckets, stats[sel]))),
            )


# -------------------------------------------------------------------------------------------------
# The report
# -------------------------------------------------------------------------------------------------


def _report(
    counts: dict, params, vocab: Vocab, config: CrowdConfig, reasons: dict, truth: np.ndarray | None
) -> dict:
    c = _fold_counts(counts)
    reconcile(c, "read", ("used", "rejected"), "annotation counts")
    report = {
        "method": config.method,
        "classes": vocab.classes,
        "read": c["read"],
        "used": c.get("used", 0),
        "rejected": c.get("rejected", 0),
        "rejected_reasons": dict(sorted(reasons.items())),
        "tasks": c.get("tasks", 0),
        "workers": len(vocab.workers),
        "unknown_group_workers": vocab.unknown_group_workers,
    }
    if config.annotators:
        report["annotators_file"] = {
            "read": c["w_read"],
            "used": c["w_read"] - c["w_rejected"],
            "rejected": c["w_rejected"],
        }
    if config.tasks:
        t = {
            "read": c["t_read"],
            "written": c.get("t_train", 0) + c.get("t_eval", 0),
            "train": c.get("t_train", 0),
            "eval": c.get("t_eval", 0),
            "rejected": c["t_rejected"],
        }
        reconcile(t, "read", ("written", "rejected"), "task file counts")
        report["tasks_file"] = t
    if config.task_priors:
        report["task_priors_file"] = {
            "read": c["p_read"],
            "used": c.get("p_used", 0),
            "rejected": c["p_read"] - c.get("p_used", 0),
        }
    if config.method != "majority_vote" and params is not None:
        report["iterations"] = params.iteration
        report["converged"] = params.converged
        report["log_likelihood"] = [round(v, 6) for v in params.log_likelihood]
    else:
        report["iterations"] = 0
    if params is not None and params.group_strength is not None:
        report["groups"] = {
            name: {
                "strength": float(params.group_strength[g]),
                "workers": int((vocab.worker_groups == g).sum()),
            }
            for g, name in enumerate(vocab.groups)
        }
    if truth is not None and truth[1] > 0:
        report["truth"] = {
            "tasks": int(truth[1]),
            "accuracy": float(truth[0] / truth[1]),
            "unmatched": c.get("truth_unmatched", 0),
        }
    return report


def _fold_counts(c: dict) -> dict:
    """Derived counts: every file's rows read (parsed + malformed) and rejected."""
    c = dict(c)
    for f in ("", "w_", "t_", "p_"):
        c[f"{f}read"] = c.get(f"{f}read", 0) + c.get(f"{f}malformed", 0)
    c["w_rejected"] = c.get("w_malformed", 0) + c.get("w_empty", 0) + c.get("w_dups", 0)
    c["t_rejected"] = c.get("t_malformed", 0) + c.get("t_empty", 0) + c.get("t_rejected_join", 0)
    return c


def _keyed_lines(text: str):
    """A block of CSV rows -> (first field, row) per row: the sort key of a sorted write."""
    return [(line.split(",", 1)[0], line) for line in text.splitlines() if line]


def _rejected_rows(rejected: Rejected) -> str:
    return csv_rows([(rejected.source, rejected.line, rejected.reason, rejected.text)])


# -------------------------------------------------------------------------------------------------
# The pipeline
# -------------------------------------------------------------------------------------------------


def validate_config(config: CrowdConfig) -> None:
    if not config.annotations:
        raise ConfigError("--annotations is required")
    if config.method == "groupanno" and not config.annotators:
        raise ConfigError(
            "--method groupanno needs --annotators W.csv (header worker,group): the group of each annotator"
        )
    if config.iterations < 1 and config.method != "majority_vote":
        raise ConfigError("--iterations must be >= 1")
    if config.partitions < 1 or config.worker_buckets < 1:
        raise ConfigError("--partitions and --worker-buckets must be >= 1")
    if config.smoothing <= 0:
        raise ConfigError("--smoothing must be > 0 (it keeps every probability above zero)")


def build_crowd_labels(pipeline: beam.Pipeline, config: CrowdConfig) -> dict:
    """Adds the label-aggregation pipeline to `pipeline`; returns its main PCollections."""
    validate_config(config)
    out = config.output.rstrip("/")
    P = config.partitions

    annotations = pipeline | "Annotations" >> ReadTable(
        config.annotations, ["task", "worker", "label"], "--annotations"
    )
    batches = annotations["ok"]
    rejected_parts = [annotations["malformed"], annotations["empty"]]
    counts = {"read": annotations["rows"], "malformed": annotations["malformed"] | "Malformed" >> Total()}
    groups = None
    if config.annotators:
        workers = pipeline | "Annotators" >> ReadTable(config.annotators, ["worker", "group"], "--annotators")
        table = (
            workers["ok"]
            | "CollectAnnotators" >> beam.combiners.ToList()
            | "GroupTable" >> beam.Map(group_table)
        )
        groups = table | "Table" >> beam.Map(lambda t: t[0])
        dups = table | "DuplicateWorkers" >> beam.FlatMap(lambda t: t[1])
        rejected_parts += [workers["malformed"], workers["empty"], dups]
        counts.update(
            w_read=workers["rows"],
            w_malformed=workers["malformed"] | "WMalformed" >> Total(),
            w_empty=workers["empty"] | "WEmpty" >> Total(),
            w_dups=dups | "WDups" >> Total(),
        )
    vocab = batches | "Vocabulary" >> Vocabulary(groups)
    vocab_si = beam.pvalue.AsSingleton(vocab)

    # Group by task once: rows hash-partitioned by task, one chunk per partition.
    partitioned = batches | "PartitionByTask" >> beam.FlatMap(
        lambda b, n: ((p, ("a", sub)) for p, sub in partition(b, "task", n)), P
    )
    if config.task_priors:
        header = first_header(config.task_priors, ["task"], flag="--task-priors")
        pread = pipeline | "ReadPriors" >> ReadCsvBatches(config.task_priors, header, flag="--task-priors")
        rejected_parts.append(pread.rejected)
        counts["p_read"] = pread.batches | "PRows" >> Total(lambda b: b.num_rows)
        counts["p_malformed"] = pread.rejected | "PMalformed" >> Total()
        priors = pread.batches | "PartitionPriors" >> beam.FlatMap(
            lambda b, n: ((p, ("p", sub)) for p, sub in partition(b, "task", n)), P
        )
        partitioned = (partitioned, priors) | "WithPriors" >> beam.Flatten()
    chunked = (
        partitioned
        | "GroupByTask" >> beam.GroupByKey()
        | "BuildChunks"
        >> beam.ParDo(BuildChunks(f"{out}/{WORK_DIR}/chunks"), vocab_si).with_outputs(
            BuildChunks.TASKS, BuildChunks.REJECTED, BuildChunks.USED, BuildChunks.PRIORS_USED, main="chunks"
        )
    )
    chunks = chunked.chunks
    rejected_parts.append(chunked[BuildChunks.REJECTED])
    counts["used"] = chunked[BuildChunks.USED] | "Used" >> Total(lambda n: n)
    counts["tasks"] = chunks | "Tasks" >> Total(lambda c: c.num_tasks)
    if config.task_priors:
        counts["p_used"] = chunked[BuildChunks.PRIORS_USED] | "PUsed" >> Total(lambda n: n)

    params = None
    if config.method != "majority_vote":
        params = chunks | "EM" >> RunEM(vocab_si, _settings(config), config.iterations)
    params_si = [beam.pvalue.AsSingleton(params)] if params is not None else []
    final = chunks | "Posteriors" >> beam.ParDo(
        _Posteriors(config.method, config.worker_buckets), vocab_si, *params_si
    ).with_outputs(_Posteriors.ACCURACY, main="q")

    # Join posteriors with task ids (and texts, truth) per partition.
    join = {"q": final.q, "tasks": chunked[BuildChunks.TASKS]}
    for name, path, columns, flag in (
        ("text", config.tasks, ["task", "text"], "--tasks"),
        ("truth", config.truth, ["task", "label"], "--truth"),
    ):
        if not path:
            join[name] = pipeline | f"No{name.title()}" >> beam.Create([])
            continue
        table = pipeline | name.title() >> ReadTable(path, columns, flag)
        join[name] = table["ok"] | f"Partition{name.title()}" >> beam.FlatMap(partition, "task", P)
        if name == "text":
            rejected_parts += [table["malformed"], table["empty"]]
            counts.update(
                t_read=table["rows"],
                t_malformed=table["malformed"] | "TMalformed" >> Total(),
                t_empty=table["empty"] | "TEmpty" >> Total(),
            )
    outputs = (
        join
        | "JoinByPartition" >> beam.CoGroupByKey()
        | "TaskOutputs"
        >> beam.ParDo(task_outputs, vocab_si, config.eval_fraction).with_outputs(
            "labels", "posteriors", "train", "eval", "rejected", "truth_stats", "truth_unmatched"
        )
    )
    rejected_parts.append(outputs.rejected)

    # Every file is written in a fixed order (rows by task, worker, group; records by bytes), so any
    # runner at any parallelism writes the same bytes (tests/runners/test_flink_cluster.py).
    (
        outputs.labels
        | "KeyLabels" >> beam.FlatMap(_keyed_lines)
        | "WriteLabels" >> WriteSortedText(f"{out}/labels.csv", header="task,label,confidence")
    )
    posterior_header = vocab | "PosteriorHeader" >> beam.Map(lambda v: csv_rows([["task", *v.classes]]))
    posterior_lines = outputs.posteriors | "PosteriorLines" >> beam.FlatMap(lambda t: t.splitlines())
    posterior_lines | "WritePosteriors" >> WriteTextWithHeader(f"{out}/posteriors.csv", posterior_header)
    (
        final[_Posteriors.ACCURACY]
        | "AccuracySums" >> beam.CombinePerKey(em.StatsFn())
        | "AnnotatorRows" >> beam.Map(annotator_rows, vocab_si, config.worker_buckets)
        | "NonEmpty" >> beam.Filter(bool)
        | "KeyAnnotators" >> beam.FlatMap(_keyed_lines)
        | "WriteAnnotators" >> WriteSortedText(f"{out}/annotators.csv", header="worker,group,labels,accuracy")
    )
    if config.method == "groupanno":
        (
            params
            | "GroupRows" >> beam.FlatMap(lambda p, v: enumerate(group_rows(p, v)), vocab_si)
            | "WriteGroups" >> WriteSortedText(f"{out}/groups.csv", header="group,true,given,probability")
        )
        params | "PlotGroups" >> beam.Map(plot_groups, vocab_si, f"{out}/groups.png")
    if config.tasks:
        for split in ("train", "eval"):
            outputs[split] | f"Write{split.title()}Tasks" >> WriteSortedShards(
                crowd_task_spec(), f"{out}/tasks-{split}", config.shards
            )
            counts[f"t_{split}"] = outputs[split] | f"T{split.title()}" >> Total()
        counts["t_rejected_join"] = outputs.rejected | "TJoinRejected" >> Total()
        (
            vocab
            | "TaskSpecs"
            >> beam.Map(lambda v: {f"tasks-{s}": crowd_task_spec(len(v.classes)) for s in ("train", "eval")})
            | "WriteSpec" >> WriteSpec(out)
        )

    # A Flatten whose result feeds several consumers, materialised once by a Reshuffle.
    rejected = (
        tuple(rejected_parts) | "AllRejectedFlatten" >> beam.Flatten() | "AllRejected" >> beam.Reshuffle()
    )
    (
        rejected
        | "RejectedRows" >> beam.Map(lambda r: ((r.source, r.line, r.reason, r.text), _rejected_rows(r)))
        | "WriteRejected" >> WriteSortedText(f"{out}/rejected.csv", header="file,line,reason,row")
    )
    annotation_files = set(match_files(config.annotations, flag="--annotations"))
    counts["rejected"] = (
        rejected
        | "AnnotationRejects" >> beam.Filter(lambda r, files: r.source in files, annotation_files)
        | "Rejected" >> Total()
    )
    reasons = rejected | "Reasons" >> ReasonCounts(lambda r: r.split(" (")[0].split(":")[0])
    truth_stats = outputs.truth_stats | "TruthStats" >> beam.CombineGlobally(SumArrays())
    counts["truth_unmatched"] = outputs.truth_unmatched | "TruthUnmatched" >> Total(lambda n: n)
    report = (counts | "Counts" >> NamedValues()) | "Report" >> beam.Map(
        _report,
        params_si[0] if params_si else None,
        vocab_si,
        config,
        beam.pvalue.AsSingleton(reasons),
        beam.pvalue.AsSingleton(truth_stats),
    )
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report, "rejected": rejected, "params": params, "chunks": chunks}
