"""omni-ingest: examples that mix text, audio, images and video -> one interleaved, packed token stream.

    headrace run omni-ingest --input MANIFEST.jsonl --output OUT [--seq-len L] [--codebook-size K]

Each manifest line is one example, a JSON list of parts in order (or ``{"parts": [...]}``), each
``{"text": "..."}``, ``{"audio": WAV}``, ``{"image": PNG/JPEG/...}`` or ``{"video": MP4 or a folder of
frames}``; paths are relative to the manifest's folder.

    (driver) text parts -> SentencePiece -> OUT/tokenizer.model ; OUT/vocab.json
    ManifestLines -> Decode (media front ends; an example with a bad part -> rejected, with its reason)
        ├─ audio frames (audio parts, video tracks) ─ KMeans (sample, k-means++, Lloyd steps as combines)
        ├─ image patches (images, video frames)     ─ KMeans           -> OUT/codebooks.npz
        └─ Tokenize (codebooks as side inputs) -> by split and shard -> Pack -> WriteTFRecordShards
    report.json: examples = tokenized + rejected; parts and tokens per modality; the k-means inertia

The tokenisers are learned on the data by the pipeline: the text vocabulary as text-ingest learns it (on
the manifest's text, when the pipeline is built); the audio and image codebooks by k-means as Beam
combines (`headrace.transforms.kmeans`), over every row of the data, not a sample (the sample only seeds
them). The token layout is `headrace.transforms.omni_tokens`; packing is text-ingest's (an example is a
document: `segment_ids` keep examples apart), with a modality id per token. Examples are split into
train and eval by a hash of their manifest line's text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from headrace.core import config as config_lib
from headrace.core.errors import ConfigError, InputError
from headrace.pipelines.text import learn_vocabulary
from headrace.transforms.counting import CountAll, ReasonCounts, reason_kind, reconcile
from headrace.transforms.io import Rejected, WriteJson, WriteJsonLines
from headrace.transforms.kmeans import KMeans
from headrace.transforms.media import Media, MediaError
from headrace.transforms.omni_tokens import (
    CODEBOOKS,
    MODALITIES,
    MODALITY_ID,
    TOKENIZER,
    VOCAB,
    Vocabulary,
    encode_part,
)
from headrace.transforms.packing import pack
from headrace.transforms.tfrecord import Feature, FeatureSpec, WriteSpec, WriteTFRecordShards, output_dataset

__all__ = ["OmniIngestConfig", "build_omni_ingest", "dataset", "media_of", "omni_spec", "parse_line"]


def omni_spec(seq_len: int) -> FeatureSpec:
    """Packed rows of `seq_len` tokens with their modality ids."""
    return FeatureSpec(
        "packed_omni",
        {
            "tokens": Feature("int64", (seq_len,), description="ids in the one vocabulary (vocab.json)"),
            "modalities": Feature(
                "int64", (seq_len,), description="0 padding, 1 text, 2 audio, 3 image, 4 video"
            ),
            "segment_ids": Feature("int64", (seq_len,), description="1, 2, ... per example in the row"),
            "positions": Feature("int64", (seq_len,), description="position of the token in its example"),
        },
    )


def dataset(out: str, split: str, batch_size: int, **kwargs):
    """Batches of ``{"tokens", "modalities", "segment_ids", "positions"}``, each [B, L] int64."""
    return output_dataset(out, split, batch_size, **kwargs)


@dataclasses.dataclass(frozen=True)
class OmniIngestConfig:
    input: str = dataclasses.field(
        default="",
        metadata={"help": "manifest.jsonl: one example per line, a list of parts", "required": True},
    )
    output: str = dataclasses.field(
        default="", metadata={"help": "output folder (or gs:// prefix)", "required": True}
    )
    seq_len: int = 512
    codebook_size: int = dataclasses.field(default=256, metadata={"help": "K codes per codebook"})
    text_vocab_size: int = 512
    kmeans_iterations: int = 10
    kmeans_sample: int = dataclasses.field(default=20_000, metadata={"help": "rows k-means++ seeds from"})
    image_size: int = 64
    patch: int = 8
    video_fps: float = dataclasses.field(default=1.0, metadata={"help": "video frames sampled per second"})
    eval_fraction: float = 0.1
    shards: int = 2
    seed: int = 0


@config_lib.register("omni-ingest", command="run omni-ingest")
def omni_ingest() -> OmniIngestConfig:
    """Manifest of mixed-media examples -> 256-code audio and image codebooks, rows of 512 tokens."""
    return OmniIngestConfig()


def media_of(config: OmniIngestConfig) -> Media:
    return Media(image_size=config.image_size, patch=config.patch, video_fps=config.video_fps)


def _hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


# -------------------------------------------------------------------------------------------------
# The manifest
# -------------------------------------------------------------------------------------------------


class PartError(ValueError):
    """A manifest line or one of its parts that cannot be used; the message says which and why."""


def parse_line(text: str) -> list[tuple[str, str]]:
    """``[(modality, text or path)]`` of a manifest line; `PartError` naming what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PartError(f"line is not JSON: {exc.msg} at column {exc.colno}") from None
    parts = value.get("parts") if isinstance(value, dict) else value
    if not isinstance(parts, list) or not parts:
        raise PartError('line is not a list of parts (or {"parts": [...]})')
    out = []
    for k, part in enumerate(parts, 1):
        if not isinstance(part, dict) or len(part) != 1 or next(iter(part)) not in MODALITIES:
            raise PartError(f"part {k}: not one of {', '.join(MODALITIES)}: {json.dumps(part)[:80]}")
        ((kind, item),) = part.items()
        if not isinstance(item, str) or not item:
            raise PartError(f"part {k} {kind}: expected a non-empty string")
        out.append((kind, item))
    return out


def _manifest_lines(path: str) -> list[tuple[int, str]]:
    try:
        with FileSystems.open(path) as f:
            data = f.read()
    except Exception as exc:  # Beam wraps a missing file and a denied one alike
        raise InputError(f"--input {path}: cannot read the manifest ({exc})") from None
    text = data.decode("utf-8", errors="replace")
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _resolve(root: str, item: str) -> str:
    return item if "://" in item or os.path.isabs(item) else FileSystems.join(root, item)


def _local(path: str, stack) -> str:
    """A local path of `path` (a remote file is copied into a temporary one; ffmpeg reads files)."""
    if "://" not in path:
        return path
    tmp = stack.enter_context(tempfile.NamedTemporaryFile(suffix=os.path.splitext(path)[1]))  # noqa: SIM115
    with FileSystems.open(path) as f:
        tmp.write(f.read())
    tmp.flush()
    return tmp.name


def decode_part(kind: str, item: str, root: str, media: Media):
    """One part's features: the text, audio frames, image patches or `VideoFeatures`."""
    import contextlib

    if kind == "text":
        return item
    path = _resolve(root, item)
    if kind == "video" and "://" not in path and os.path.isdir(path):
        return media.video(path)
    try:
        if kind == "video":
            if not FileSystems.exists(path):
                raise FileNotFoundError(path)
            with contextlib.ExitStack() as stack:
                return media.video(_local(path, stack))
        with FileSystems.open(path) as f:
            data = f.read()
    except OSError as exc:  # missing or unreadable
        raise MediaError(f"missing or unreadable file ({type(exc).__name__})") from None
    except Exception as exc:  # Beam's filesystems wrap a missing file in their own errors
        if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
            raise MediaError("missing file") from None
        raise
    return media.audio(data) if kind == "audio" else media.patches(data)


# -------------------------------------------------------------------------------------------------
# The pipeline
# -------------------------------------------------------------------------------------------------


class _Decode(beam.DoFn):
    """(line number, text) -> (example id, {"split", "parts": [(modality, features)]}) or rejected."""

    REJECTED = "rejected"

    def __init__(self, manifest: str, media: Media, eval_fraction: float):
        self._manifest, self._media, self._eval = manifest, media, eval_fraction
        self._root = os.path.dirname(manifest)
        self._parts = {m: beam.metrics.Metrics.counter("omni", f"{m}_parts") for m in MODALITIES}

    def process(self, element):
        number, text = element
        try:
            parts = parse_line(text)
            decoded = []
            for k, (kind, item) in enumerate(parts, 1):
                try:
                    decoded.append((kind, decode_part(kind, item, self._root, self._media)))
                except MediaError as exc:
                    raise PartError(f"part {k} {kind} {item!r}: {exc}") from None
        except PartError as exc:
            yield beam.pvalue.TaggedOutput(
                self.REJECTED, Rejected(self._manifest, number, str(exc), text[:300])
            )
            return
        for kind, _ in decoded:
            self._parts[kind].inc()
        split = "eval" if _hash(text) < self._eval else "train"
        yield f"{number:09d}", {"split": split, "parts": decoded}


def _rows(element, kind: str):
    """(example id, example) -> (block key, rows) for the `kind` codebook (videos feed both)."""
    key, example = element
    for k, (part, value) in enumerate(example["parts"]):
        if part == kind:
            yield f"{key}/{k}", value
        elif part == "video":
            chunks = value.frames if kind == "image" else [a for a in value.audio if len(a)]
            if chunks:
                yield f"{key}/{k}", np.concatenate(chunks)


class _Tokenize(beam.DoFn):
    """(example id, example) -> ((split, shard), (id, {"tokens", "modalities"}, tokens per modality))."""

    def __init__(self, model_path: str | None, vocab: Vocabulary, config: OmniIngestConfig, eval_shards: int):
        self._path, self._vocab, self._config, self._eval_shards = model_path, vocab, config, eval_shards
        self._tokens = {m: beam.metrics.Metrics.counter("omni", f"{m}_tokens") for m in MODALITIES}

    def setup(self):
        self._sp = None
        if self._path:
            import sentencepiece as spm

            with FileSystems.open(self._path) as f:
                self._sp = spm.SentencePieceProcessor(model_proto=f.read())

    def process(self, element, audio, image):
        key, example = element
        books = {"audio": audio["centroids"], "image": image["centroids"]}
        tokens, modalities, counts = [], [], dict.fromkeys(MODALITIES, 0)
        for part in example["parts"]:
            ids, kind = encode_part(part, self._vocab, self._sp, books)
            tokens += ids
            modalities += [MODALITY_ID[kind]] * len(ids)
            counts[kind] += len(ids)
            self._tokens[kind].inc(len(ids))
        tokens.append(self._vocab.special("<end>"))
        modalities.append(modalities[-1])
        split = example["split"]
        shards = self._eval_shards if split == "eval" else self._config.shards
        shard = int(_hash(key + "/shard") * shards)
        yield (split, shard), (key, {"tokens": tokens, "modalities": modalities}, counts)


def _pack_shard(element, seq_len: int):
    (split, _), examples = element
    docs = [stream for _, stream, _ in sorted(examples, key=lambda e: e[0])]  # the same rows on any runner
    for row in pack(docs, seq_len):
        yield beam.pvalue.TaggedOutput(split, row)


class _SumCounts(beam.CombineFn):
    def create_accumulator(self):
        return dict.fromkeys(MODALITIES, 0)

    def add_input(self, acc, counts):
        return {m: acc[m] + counts[m] for m in MODALITIES}

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            out = self.add_input(out, a)
        return out

    def extract_output(self, acc):
        return acc


def _write_codebooks(_, audio: dict, image: dict, path: str) -> str:
    buffer = io.BytesIO()
    np.savez(  # float64, as the pipeline assigned codes with them: a prompt gets the codes ingest gave
        buffer,
        audio=np.asarray(audio["centroids"], np.float64),
        image=np.asarray(image["centroids"], np.float64),
        audio_init=np.asarray(audio["init"], np.float64),
        image_init=np.asarray(image["init"], np.float64),
    )
    with FileSystems.create(path) as f:
        f.write(buffer.getvalue())
    return path


def _report(
    counts, reasons, tokens, parts, audio, image, config: OmniIngestConfig, vocab: Vocabulary
) -> dict:
    rows = counts["train_rows"] + counts["eval_rows"]
    total = sum(tokens.values())
    report = {
        "examples": counts["examples"],
        "tokenized": counts["tokenized"],
        "rejected": counts["rejected"],
        "parts": parts,
        "tokens": tokens,
        "total_tokens": total,
        "train_rows": counts["train_rows"],
        "eval_rows": counts["eval_rows"],
        "seq_len": config.seq_len,
        "packing_efficiency": round(total / (rows * config.seq_len), 4) if rows else None,
        "vocab_size": vocab.size,
        "codebooks": {
            name: {
                "codes": len(state["centroids"]),
                "inertia": [round(float(i), 2) for i in state["inertia"]],
            }
            for name, state in (("audio", audio), ("image", image))
        },
        "rejected_reasons": reasons,
    }
    reconcile(report, "examples", ("tokenized", "rejected"))
    return report


def _reason(reason: str) -> str:
    """ "part 2 audio 'x.wav': not a WAV file (...)" -> "not a WAV file"."""
    return reason_kind(reason.split(": ", 1)[-1])


def _text_sample(lines, limit_bytes: int = 20_000_000) -> list[str]:
    sample, size = [], 0
    for _, text in lines:
        try:
            parts = parse_line(text)
        except PartError:
            continue
        for kind, value in parts:
            if kind == "text":
                sample += [s for s in value.splitlines() if s.strip()]
                size += len(value)
        if size >= limit_bytes:
            break
    return sample


def build_omni_ingest(pipeline: beam.Pipeline, config: OmniIngestConfig) -> dict:
    if not config.input:
        raise ConfigError("--input is required")
    if (
        config.seq_len < 8
        or config.codebook_size < 2
        or config.shards < 1
        or not 0 <= config.eval_fraction < 1
    ):
        raise ConfigError("--seq-len >= 8, --codebook-size >= 2, --shards >= 1, --eval-fraction in [0, 1)")
    media = media_of(config)
    try:
        media.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out = config.output.rstrip("/")
    lines = _manifest_lines(config.input)
    if not lines:
        raise InputError(f"--input {config.input}: the manifest holds no examples")

    sentences = _text_sample(lines)
    model_path = None
    text_size = 3  # padding, unknown, end: no text in the manifest, no text vocabulary
    if sentences:
        import sentencepiece as spm

        proto = learn_vocabulary(sentences, config.text_vocab_size, source=f"--input {config.input}")
        model_path = f"{out}/{TOKENIZER}"
        with FileSystems.create(model_path) as f:  # into the staged output, before the workers start
            f.write(proto)
        text_size = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    vocab = Vocabulary(text_size, config.codebook_size, media)
    with FileSystems.create(f"{out}/{VOCAB}") as f:
        f.write(json.dumps(vocab.to_json(), indent=2).encode())
    spec = omni_spec(config.seq_len)
    eval_shards = max(1, round(config.shards * config.eval_fraction)) if config.eval_fraction else 1

    manifest = pipeline | "ManifestLines" >> beam.Create(lines) | "Spread" >> beam.Reshuffle()
    decode = _Decode(config.input, media, config.eval_fraction)
    decoded = manifest | "Decode" >> beam.ParDo(decode).with_outputs(_Decode.REJECTED, main="examples")
    examples = decoded.examples
    books = {}
    for kind, dim in (("audio", media.n_mels), ("image", media.patch_dim)):
        books[kind] = (
            examples
            | f"{kind.title()}Rows" >> beam.FlatMap(_rows, kind)
            | f"{kind.title()}Codebook"
            >> KMeans(
                k=config.codebook_size,
                dim=dim,
                iterations=config.kmeans_iterations,
                sample_size=config.kmeans_sample,
                seed=config.seed,
            )
        )
    audio, image = (beam.pvalue.AsSingleton(books[k]) for k in ("audio", "image"))
    (
        pipeline
        | "Once" >> beam.Create([None])
        | "WriteCodebooks" >> beam.Map(_write_codebooks, audio, image, f"{out}/{CODEBOOKS}")
    )
    tokenized = examples | "Tokenize" >> beam.ParDo(
        _Tokenize(model_path, vocab, config, eval_shards), audio, image
    )
    rows = (
        tokenized
        | "ByShard" >> beam.GroupByKey()
        | "Pack" >> beam.FlatMap(_pack_shard, config.seq_len).with_outputs("train", "eval")
    )
    rows.train | "WriteTrain" >> WriteTFRecordShards(spec, f"{out}/train", config.shards)
    rows.eval | "WriteEval" >> WriteTFRecordShards(spec, f"{out}/eval", eval_shards)
    pipeline | "WriteSpec" >> WriteSpec(out, {"train": spec, "eval": spec})
    decoded.rejected | "WriteRejected" >> WriteJsonLines(f"{out}/rejected/rejected")

    # The examples are counted where they are read, not as a Flatten of the two outputs: the portable
    # Flink runner's fuser fails on a PCollection that feeds both a Flatten and a GroupByKey ("consumed
    # but never produced", apache/beam#34647), as `rejected` would.
    counts = {
        "examples": manifest,
        "tokenized": tokenized,
        "rejected": decoded.rejected,
        "train_rows": rows.train,
        "eval_rows": rows.eval,
    } | "Counts" >> CountAll()
    tokens = (
        tokenized
        | "TokenCounts" >> beam.Map(lambda kv: kv[1][2])
        | "SumTokens" >> beam.CombineGlobally(_SumCounts())
    )
    parts = (
        examples
        | "PartCounts" >> beam.Map(lambda kv: {m: sum(p == m for p, _ in kv[1]["parts"]) for m in MODALITIES})
        | "SumParts" >> beam.CombineGlobally(_SumCounts())
    )
    reasons = decoded.rejected | "Reasons" >> ReasonCounts(_reason)
    report = counts | "Report" >> beam.Map(
        _report,
        beam.pvalue.AsSingleton(reasons),
        beam.pvalue.AsSingleton(tokens),
        beam.pvalue.AsSingleton(parts),
        audio,
        image,
        config,
        vocab,
    )
    report | "WriteReport" >> WriteJson(f"{out}/report.json")
    return {"report": report, "codebooks": books}
