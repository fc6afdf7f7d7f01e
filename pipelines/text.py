"""text-ingest: text files -> a SentencePiece vocabulary and packed token sequences as TFRecord shards.

    headrace run text-ingest --input 'DIR/**/*.txt' --output OUT [--vocab-size V] [--seq-len L]

    (driver) sample documents -> train SentencePiece -> OUT/tokenizer.model
    ReadDocuments (-> rejected) -> Tokenize (model loaded in setup) -> by split and shard ->
        Pack (seqio-style) -> WriteTFRecordShards(train / eval) ; report.json (documents and tokens)

A document is one file, read through `headrace.transforms.textfiles.TextReader`: an empty or binary
file, or one with a line that is not UTF-8, is rejected with its reason. The vocabulary is learned once,
when the pipeline is built, on a sample of the documents (every k-th file, up to `sample_bytes`), and
written into the output, from where every worker's `Tokenize` loads it in `setup()`.

Packing (as seqio packs): each document's ids plus an end-of-document id fill rows of `seq_len` in
order; a document goes into the current row if it fits, else starts a new one, so no document is split
across rows unless it is longer than a row (then it fills whole rows, its remainder continuing in the
next). Every row carries `segment_ids` (1, 2, ... per document in the row, 0 for padding) and
`positions` (the token's position in its document piece), the inputs `Transformer` masks attention with.
Documents are split into train and eval by a hash of their path below the corpus folder (`eval_files`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.transforms.counting import CountAll, ReasonCounts, reconcile
from headrace.transforms.io import Rejected, WriteJson, WriteJsonLines, match_files
from headrace.transforms.packing import pack
from headrace.transforms.textfiles import TextReader
from headrace.transforms.tfrecord import Feature, FeatureSpec, WriteSpec, WriteTFRecordShards, output_dataset

__all__ = [
    "TextIngestConfig",
    "build_text_ingest",
    "dataset",
    "learn_vocabulary",
    "pack",
    "read_document",
    "text_spec",
]

TOKENIZER = "tokenizer.model"


def text_spec(seq_len: int) -> FeatureSpec:
    """The packed-row record type for rows of `seq_len` tokens (the length goes into spec.json)."""
    return FeatureSpec(
        "packed_text",
        {
            "tokens": Feature(
                "int64", (seq_len,), description="token ids, 0 (padding) after the last document"
            ),
            "segment_ids": Feature(
                "int64", (seq_len,), description="1, 2, ... per document in the row; 0 padding"
            ),
            "positions": Feature("int64", (seq_len,), description="position of the token in its document"),
        },
    )


def dataset(out: str, split: str, batch_size: int, **kwargs):
    """Batches of packed rows of ``OUT/{split}-*.tfrecord``: ``{"tokens", "segment_ids", "positions"}``,
    each [B, L] int64, L read from the output's spec.json."""
    return output_dataset(out, split, batch_size, **kwargs)


@dataclasses.dataclass(frozen=True)
class TextIngestConfig:
    input: str = dataclasses.field(
        default="", metadata={"help": "text files (glob, ** for any depth)", "required": True}
    )
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    vocab_size: int = 1024
    seq_len: int = 128
    eval_fraction: float = 0.05
    shards: int = 4
    sample_bytes: int = dataclasses.field(
        default=20_000_000, metadata={"help": "how much text the vocabulary is learned on"}
    )


@config_lib.register("text-ingest", command="run text-ingest")
def text_ingest() -> TextIngestConfig:
    """Text files -> SentencePiece (1024 pieces) and packed rows of 128 tokens, 4 shards, 5% eval."""
    return TextIngestConfig()


# -------------------------------------------------------------------------------------------------
# Documents, the vocabulary, packing
# -------------------------------------------------------------------------------------------------


def read_document(path: str) -> str | Rejected:
    """A file's text, or why it cannot be a document (empty, binary, a line that is not UTF-8)."""
    with TextReader(path) as reader:
        lines = [text for _, text in reader.lines()]
        problems = reader.rejections()
    if problems:
        first = problems[0]
        return Rejected(path, first.line, first.reason, first.text)
    text = "\n".join(lines).strip()
    if not text:
        return Rejected(path, 1, "empty file", "")
    return text


def _hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def train_tokenizer(files: list[str], config: TextIngestConfig) -> bytes:
    """A SentencePiece model (its serialized proto) learned on a sample of the documents."""
    sample, size = [], 0
    for path in sorted(files, key=_hash):  # a fixed pseudo-random order: the sample is reproducible
        doc = read_document(path)
        if isinstance(doc, str):
            sample.append(doc)
            size += len(doc)
            if size >= config.sample_bytes:
                break
    if not sample:
        raise InputError(f"--input {config.input}: no readable text to learn a vocabulary from")
    lines = (line for doc in sample for line in doc.splitlines() if line.strip())
    return learn_vocabulary(lines, config.vocab_size, source=f"--input {config.input}")


def learn_vocabulary(sentences, vocab_size: int, *, source: str) -> bytes:
    """A SentencePiece unigram model (its serialized proto: pad 0, unk 1, eos 2, no bos) learned on
    `sentences`; `InputError` naming `source` when it cannot be learned."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="unigram",
            pad_id=0,
            unk_id=1,
            bos_id=-1,
            eos_id=2,
            character_coverage=0.9995,
            num_threads=1,
            minloglevel=2,
            hard_vocab_limit=False,  # a small corpus may not hold vocab_size pieces
        )
    except RuntimeError as exc:
        raise InputError(f"{source}: SentencePiece could not learn a vocabulary ({exc})") from None
    return model.getvalue()


# -------------------------------------------------------------------------------------------------
# The pipeline
# -------------------------------------------------------------------------------------------------


class _Read(beam.DoFn):
    REJECTED = "rejected"

    def process(self, path: str):
        doc = read_document(path)
        if isinstance(doc, Rejected):
            yield beam.pvalue.TaggedOutput(self.REJECTED, doc)
        else:
            yield path, doc


class _Tokenize(beam.DoFn):
    """(path, text) -> (split, shard, (path, ids)); the SentencePiece model is loaded once per worker."""

    def __init__(self, model_path: str, config: TextIngestConfig, eval_shards: int, eval_files: frozenset):
        self._path, self._config, self._eval_shards = model_path, config, eval_shards
        self._eval_files = eval_files
        self._tokens = beam.metrics.Metrics.counter("text", "tokens")

    def setup(self):
        import sentencepiece as spm

        with FileSystems.open(self._path) as f:
            self._sp = spm.SentencePieceProcessor(model_proto=f.read())

    def process(self, element):
        path, text = element
        ids = [*self._sp.encode(text), self._sp.eos_id()]
        self._tokens.inc(len(ids))
        is_eval = path in self._eval_files
        shards = self._eval_shards if is_eval else self._config.shards
        shard = int(_hash(path + "/shard") * shards)
        yield ("eval" if is_eval else "train", shard), (path, ids)


def _pack_shard(element, seq_len: int):
    (split, _), docs = element
    for row in pack([ids for _, ids in sorted(docs)], seq_len):  # by path: the same rows on every runner
        yield beam.pvalue.TaggedOutput(split, row)


def _report(counts: dict, reasons: dict, tokens: int, config: TextIngestConfig) -> dict:
    rows = counts["train_rows"] + counts["eval_rows"]
    report = {
        "documents": counts["documents"],
        "tokenized": counts["tokenized"],
        "rejected": counts["rejected"],
        "tokens": tokens,
        "train_rows": counts["train_rows"],
        "eval_rows": counts["eval_rows"],
        "seq_len": config.seq_len,
        "packing_efficiency": round(tokens / (rows * config.seq_len), 4) if rows else None,
        "rejected_reasons": reasons,
    }
    reconcile(report, "documents", ("tokenized", "rejected"))
    return report


def eval_files(files: list[str], fraction: float) -> frozenset:
    """The documents held out: by a hash of their path below the files' common folder (the same split
    wherever the corpus lies), at least one when there are two or more and `fraction` > 0."""
    if not fraction or not files:
        return frozenset()
    root = os.path.commonpath([os.path.dirname(f) for f in files]) if "://" not in files[0] else ""
    key = {f: _hash(os.path.relpath(f, root) if root else f) for f in files}
    held = {f for f in files if key[f] < fraction}
    if not held and len(files) >= 2:
        held = {min(files, key=key.get)}
    return frozenset(held)


def build_text_ingest(pipeline: beam.Pipeline, config: TextIngestConfig) -> dict:
    if not config.input:
        raise ConfigError("--input is required")
    if config.seq_len < 2 or config.vocab_size < 8 or config.shards < 1 or not 0 <= config.eval_fraction < 1:
        raise ConfigError("--seq-len >= 2, --vocab-size >= 8, --shards >= 1, --eval-fraction in [0, 1)")
    out = config.output.rstrip("/")
    files = match_files(config.input, flag="--input")
    model_path = f"{out}/{TOKENIZER}"
    with FileSystems.create(model_path) as f:  # into the staged output, before the workers start
        f.write(train_tokenizer(files, config))
    spec = text_spec(config.seq_len)
    eval_shards = max(1, round(config.shards * config.eval_fraction)) if config.eval_fraction else 1

    read = (
        pipeline
        | "ListFiles" >> beam.Create(files)
        | "Spread" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(_Read()).with_outputs(_Read.REJECTED, main="documents")
    )
    held = eval_files(files, config.eval_fraction)
    tokenized = read.documents | "Tokenize" >> beam.ParDo(_Tokenize(model_path, config, eval_shards, held))
    rows = (
        tokenized
        | "ByShard" >> beam.GroupByKey()
        | "Pack" >> beam.FlatMap(_pack_shard, config.seq_len).with_outputs("train", "eval")
    )
    rows.train | "WriteTrain" >> WriteTFRecordShards(spec, f"{out}/train", config.shards)
    rows.eval | "WriteEval" >> WriteTFRecordShards(spec, f"{out}/eval", eval_shards)
    pipeline | "WriteSpec" >> WriteSpec(out, {"train": spec, "eval": spec})
    read.rejected | "WriteRejected" >> WriteJsonLines(f"{out}/rejected/rejected")

    documents = (read.documents, read.rejected) | "AllDocuments" >> beam.Flatten()
    counts = {
        "documents": documents,
        "tokenized": tokenized,
        "rejected": read.rejected,
        "train_rows": rows.train,
        "eval_rows": rows.eval,
    } | "Counts" >> CountAll()
    tokens = (
        tokenized
        | "TokenCount" >> beam.Map(lambda kv: len(kv[1][1]))
        | "SumTokens" >> beam.CombineGlobally(sum)
    )
    reasons = read.rejected | "Reasons" >> ReasonCounts()
    report = counts | "Report" >> beam.Map(
        _report, beam.pvalue.AsSingleton(reasons), beam.pvalue.AsSingleton(tokens), config
    )
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report}
