"""omni-ingest on media made here (espeak-ng speech, installed photographs, ffmpeg videos): order and
boundaries survive, codebooks equal numpy's k-means and beat random ones, damaged files reject their
example only, counts reconcile."""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil

import numpy as np
import pytest

from headrace.pipelines.omni import OmniIngestConfig, build_omni_ingest, dataset, media_of, parse_line
from headrace.pipelines.omni_data import espeak_available, write_manifest
from headrace.runners.beam_runner import run_pipeline
from headrace.transforms.kmeans import assign
from headrace.transforms.media import log_mel_distance, psnr
from headrace.transforms.omni_tokens import MODALITY_ID, OmniTokenizer, split_stream

from ..transforms.kmeans_reference import lloyd

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (make media-deps)")

DAMAGED = {  # manifest line -> the kind of reason it is rejected with
    '[{"audio": "media/truncated.wav"}, {"text": "cut short"}]': "corrupt WAV file",
    '[{"text": "a picture"}, {"audio": "media/cat-0.jpg"}]': "not a WAV file",
    '[{"image": "media/cat-0.wav"}]': "not an image",
    '[{"text": "gone"}, {"image": "media/nowhere.png"}]': "missing or unreadable file",
    '[{"video": "media/noise.mp4"}, {"text": "noise"}]': "video does not decode",
    '[{"text": "unclosed"': "line is not JSON",
    '[{"smell": "roses"}]': "not one of text, audio, image, video",
    "[]": 'line is not a list of parts (or {"parts"',
}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    manifest = write_manifest(root / "in", repeats=1, videos=1)
    good = manifest.read_text().splitlines()
    media = root / "in" / "media"
    (media / "truncated.wav").write_bytes((media / "cat-0.wav").read_bytes()[:60])
    (media / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    manifest.write_text("\n".join([*good[:5], *DAMAGED, *good[5:]]) + "\n")
    config = OmniIngestConfig(
        input=str(manifest), output=str(root / "out"), seq_len=512, codebook_size=64, kmeans_iterations=8,
        eval_fraction=0.2, shards=2,
    )  # fmt: skip
    run_pipeline(build_omni_ingest, config)
    return root, good, config


def _rows(out):
    return [
        {k: v.numpy() for k, v in batch.items()}
        for split in ("train", "eval")
        for batch in dataset(str(out), split, 1)
    ]


def _examples(rows):
    """Per packed example: (tokens, modality ids)."""
    out = []
    for row in rows:
        for s in range(1, int(row["segment_ids"].max()) + 1):
            at = row["segment_ids"][0] == s
            out.append((row["tokens"][0][at], row["modalities"][0][at]))
    return out


def test_counts_reconcile_and_damaged_files_reject_their_example(ingested):
    root, good, _ = ingested
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["examples"] == len(good) + len(DAMAGED)
    assert report["tokenized"] == len(good) and report["rejected"] == len(DAMAGED)
    kinds = collections.Counter(kind for line in good for kind, _ in parse_line(line))
    assert report["parts"] == {m: kinds[m] for m in MODALITY_ID} and kinds["video"] == 2
    assert sum(report["rejected_reasons"].values()) == len(DAMAGED)
    rejected = [
        json.loads(line)
        for f in (root / "out" / "rejected").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    by_text = {r["text"]: r for r in rejected}
    for line, reason in DAMAGED.items():
        r = by_text[line]
        assert reason in r["reason"], (line, r["reason"])
        assert r["source"].endswith("manifest.jsonl") and r["line"] > 5
    # A bad part names its place and file.
    assert by_text[next(iter(DAMAGED))]["reason"].startswith("part 1 audio 'media/truncated.wav': ")
    assert sum(report["tokens"].values()) == report["total_tokens"] > 0


def test_modality_order_and_boundaries_survive_ingest(ingested):
    root, good, _ = ingested
    tok = OmniTokenizer(root / "out")
    got = collections.Counter()
    for tokens, modalities in _examples(_rows(root / "out")):
        parts = split_stream(tokens, tok.vocab)
        assert tokens[-1] == tok.vocab.special("<end>")
        signature = []
        for kind, body in parts:
            begin = int(np.flatnonzero(tokens == tok.vocab.begin(kind))[0])
            assert modalities[begin] == MODALITY_ID[kind]
            signature.append((kind, tok.decode_text(body) if kind == "text" else len(body)))
        # Each part's tokens carry its modality id, from its begin token to its end token.
        assert (modalities > 0).all()
        got[tuple(signature)] += 1
    media = tok.media
    expected = collections.Counter()
    for line in good:
        signature = []
        for kind, item in parse_line(line):
            path = root / "in" / item
            if kind == "text":
                signature.append((kind, item))
            elif kind == "audio":
                signature.append((kind, len(media.audio(path.read_bytes()))))
            elif kind == "image":
                signature.append((kind, media.patches_per_image))
            else:
                video = media.video(str(path))
                signature.append(
                    (kind, len(video.frames) * (1 + media.patches_per_image) + sum(map(len, video.audio)))
                )
        expected[tuple(signature)] += 1
    assert got == expected


def test_packing_keeps_examples_apart(ingested):
    root, good, _config = ingested
    rows = _rows(root / "out")
    examples = _examples(rows)
    assert len(examples) == len(good)  # each example is one segment: none split, none merged
    for row in rows:
        seg, pos = row["segment_ids"][0], row["positions"][0]
        for s in range(1, int(seg.max()) + 1):
            assert np.array_equal(pos[seg == s], np.arange((seg == s).sum()))
        assert (row["tokens"][0][seg == 0] == 0).all()


def _rows_of(root, good, kind):
    """Every row the `kind` codebook was learned from (audio parts and video tracks, or images and
    video frames), with the front ends the pipeline used."""
    media = media_of(OmniIngestConfig())
    out = []
    for line in good:
        for part, item in parse_line(line):
            path = root / "in" / item
            if part == kind:
                out.append(
                    media.audio(path.read_bytes()) if kind == "audio" else media.patches(path.read_bytes())
                )
            elif part == "video":
                v = media.video(str(path))
                out += v.frames if kind == "image" else [a for a in v.audio if len(a)]
    return np.concatenate(out)


@pytest.mark.parametrize("kind", ["audio", "image"])
def test_codebooks_equal_numpy_kmeans_from_the_same_seeds(ingested, kind):
    root, good, config = ingested
    books = np.load(root / "out" / "codebooks.npz")
    rows = _rows_of(root, good, kind)
    centroids, _ = lloyd(rows, books[f"{kind}_init"], config.kmeans_iterations)
    assert len(centroids) == config.codebook_size
    np.testing.assert_allclose(books[kind], centroids, rtol=1e-7, atol=1e-7)


def test_tokenise_then_detokenise_beats_a_random_codebook(ingested):
    root, good, config = ingested
    tok = OmniTokenizer(root / "out")
    rng = np.random.default_rng(0)
    # Images: PSNR of patches rebuilt from their codes.
    patches = _rows_of(root, good, "image")
    random_book = patches[rng.choice(len(patches), config.codebook_size, replace=False)]
    ours = psnr(patches, tok.codebooks["image"][assign(patches, tok.codebooks["image"])[0]])
    theirs = psnr(patches, random_book[assign(patches, random_book)[0]])
    assert ours > 18.0 and ours > theirs + 1.0, (ours, theirs)  # measured 18.4 vs 16.4 dB at K = 64
    # Audio: log-mel distance of frames rebuilt from their codes.
    frames = _rows_of(root, good, "audio")
    random_book = frames[rng.choice(len(frames), config.codebook_size, replace=False)]
    ours = log_mel_distance(frames, tok.codebooks["audio"][assign(frames, tok.codebooks["audio"])[0]])
    theirs = log_mel_distance(frames, random_book[assign(frames, random_book)[0]])
    assert ours < 0.6 and ours < 0.9 * theirs, (ours, theirs)
    # A whole utterance, codes -> log-mel -> Griffin-Lim -> samples -> log-mel again, and a whole image.
    wav = (root / "in" / "media" / "cat-0.wav").read_bytes()
    heard = tok.media.log_mel(tok.decode_audio(tok.audio(wav)))
    assert log_mel_distance(tok.media.audio(wav), heard) < 1.0
    png = (root / "in" / "media" / "astronaut-0.png").read_bytes()
    assert psnr(tok.media.image_array(png), tok.decode_image(tok.image(png))) > 16.0  # measured 17.1


def test_a_manifest_of_only_pictures_needs_no_text(tmp_path, ingested):
    root, _, _ = ingested
    shutil.copy(root / "in" / "media" / "astronaut-0.png", tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text('[{"image": "a.png"}]\n[{"image": "a.png"}, {"image": "a.png"}]\n')
    config = OmniIngestConfig(input=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), codebook_size=8)
    run_pipeline(build_omni_ingest, config)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tokenized"] == 2 and report["tokens"]["image"] == 3 * 66 and report["tokens"]["text"] == 0
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def _rows_by_layout(out, split):
    """Every row of a split, decoded, sorted by its layout (modalities, segments, positions): Beam's file
    sink does not order a shard's records, and two processes may serialize an Example differently."""
    import tensorflow as tf

    from headrace.pipelines.omni import omni_spec

    spec = omni_spec(512)
    rows = [
        spec.decode(r.numpy())
        for f in sorted(out.glob(f"{split}-*.tfrecord"))
        for r in tf.data.TFRecordDataset(str(f))
    ]
    key = lambda r: tuple(tuple(r[k].tolist()) for k in ("modalities", "segment_ids", "positions"))
    return sorted(rows, key=key), [key(r) for r in sorted(rows, key=key)]


@pytest.mark.flink
def test_flink_gives_the_same_output(ingested, tmp_path, flink):
    root, _, config = ingested
    out = tmp_path / "flink"
    run_pipeline(
        build_omni_ingest,
        dataclasses.replace(config, output=str(out)),
        runner="FlinkRunner",
        beam_args=[*flink, "--parallelism=2"],
    )
    ours = root / "out"
    assert json.loads((out / "report.json").read_text()) == json.loads((ours / "report.json").read_text())
    a, b = np.load(out / "codebooks.npz"), np.load(ours / "codebooks.npz")
    for name in ("audio", "image", "audio_init", "image_init"):
        np.testing.assert_array_equal(a[name], b[name])  # exact sums: the same codebook on any runner
    for split in ("train", "eval"):
        theirs, layout = _rows_by_layout(out, split)
        mine, my_layout = _rows_by_layout(ours, split)
        assert layout == my_layout  # the same examples, packed into the same rows
        a, b = (np.concatenate([r["tokens"] for r in rows]) for rows in (theirs, mine))
        # Before the log-mel projection became an elementwise sum (BLAS rounds by thread), a handful of
        # tokens differed in some runs; since, the run checked gave every token equal. The share is
        # asserted until more runs show equality holds.
        assert np.mean(a == b) > 0.99
    assert (out / "tokenizer.model").read_bytes() == (ours / "tokenizer.model").read_bytes()
