"""`headrace train omni` and `headrace generate omni` on streams ingested from media made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from headrace.pipelines.omni import OmniIngestConfig, build_omni_ingest
from headrace.pipelines.omni_data import espeak_available, write_manifest
from headrace.runners import cli
from headrace.runners.beam_runner import run_pipeline
from headrace.runners.generate_omni import OmniGenerateConfig, Responder

pytestmark = pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (make media-deps)")

SMALL = ["--layers", "1", "--d-model", "32", "--heads", "4", "--ffn", "64", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni-train")
    manifest = write_manifest(root / "in", repeats=1, videos=1)
    data = root / "data"
    run_pipeline(
        build_omni_ingest,
        OmniIngestConfig(
            input=str(manifest), output=str(data), seq_len=256, codebook_size=32, eval_fraction=0.2
        ),
    )
    model = root / "model"
    argv = ["train", "omni", "--data", str(data), "--output", str(model), "--mesh", "batch=4,model=2"]
    assert cli.main([*argv, "--steps", "40", "--learning-rate", "0.01", *SMALL]) == 0
    return root, data, model


def test_omni_trains_on_the_mesh_with_one_table_and_reports_each_modality(trained):
    _, data, model = trained
    m = json.loads((model / "metrics.json").read_text())
    vocab = json.loads((data / "vocab.json").read_text())
    assert m["steps"] == 40 and m["devices"] == 8 and m["attention"] == "talking_heads"
    assert m["model"]["vocab_size"] % 64 == 0 and m["model"]["vocab_size"] >= vocab["size"]
    assert m["loss_last"] < m["loss_first"] - 1.0  # from about log(vocab)
    for kind in ("text", "audio"):
        assert 1 < m[f"perplexity_{kind}"] < vocab["size"] and m[f"eval_tokens_{kind}"] > 0
    weights = np.load(model / "weights.npz")
    assert weights["embedding"].shape == (m["model"]["vocab_size"], 32)  # every modality's rows in one table
    for name in ("vocab.json", "codebooks.npz", "tokenizer.model", "curves.png", "resolved_config.json"):
        assert (model / name).is_file(), name
    assert list((model / "tensorboard").glob("events.*"))


def test_a_text_ingest_output_is_refused_by_name(tmp_path, trained, capsys):
    _, _data, _ = trained
    argv = ["train", "omni", "--data", str(tmp_path), "--output", str(tmp_path / "m"), "--mesh", ""]
    assert cli.main([*argv, "--steps", "1"]) == 1
    assert "no vocab.json" in capsys.readouterr().err


def _greedy_check(responder: Responder, prompt_len: int, result: dict, kind: str):
    """Every greedy token equals the argmax of the cache-free forward pass over what came before."""
    ids = [*result["prompt"], *result["ids"]]
    logits = responder.model(tf.constant([ids]), tf.ones([1, len(ids)], tf.int32), tf.range(len(ids))[None])
    mask = responder.allowed(kind)
    for i, token in enumerate(result["ids"]):
        row = np.where(mask, logits[0, prompt_len - 1 + i].numpy(), -np.inf)
        if i < result["min_tokens"]:
            row[responder.vocab.end(kind)] = -np.inf
        assert int(np.argmax(row)) == token, i


@pytest.mark.parametrize("kind", ["text", "audio", "image"])
def test_generate_answers_a_spoken_prompt_in_each_modality(trained, tmp_path, kind):
    root, _, model = trained
    responder = Responder(str(model))
    wav = root / "in" / "media" / "cat-0.wav"
    config = OmniGenerateConfig(
        model=str(model), prompt_audio=str(wav), respond_with=kind, temperature=0, output=str(tmp_path)
    )
    result = responder.answer(config)
    assert result["ids"] == responder.answer(config)["ids"]  # greedy: the same answer twice
    vocab = responder.vocab
    start, stop = vocab.range(kind)
    assert result["tokens"] >= 1 and all(start <= t < stop for t in result["ids"])
    assert result["prompt"][0] == vocab.begin("audio") and result["prompt"][-1] == vocab.begin(kind)
    _greedy_check(responder, len(result["prompt"]), result, kind)
    assert 0 < result["time_to_first_token_s"] <= result["seconds"]
    responder.write(result, config)
    assert (tmp_path / "prompt.wav").is_file()
    if kind == "image":
        from PIL import Image

        assert result["tokens"] == vocab.media.patches_per_image
        assert Image.open(tmp_path / "answer.png").size == (64, 64)
    if kind == "audio":
        from headrace.transforms.media import read_wav

        assert result["tokens"] >= config.first_audio_frames
        assert 0 < result["time_to_first_audio_s"] <= result["seconds"]
        samples, rate = read_wav((tmp_path / "answer.wav").read_bytes())
        assert rate == 16000 and len(samples) == 320 * (result["tokens"] - 1)
    if kind == "text":
        assert (tmp_path / "answer.txt").read_text().strip() == result["text"].strip()


def test_generate_cli_streams_and_names_a_bad_prompt(trained, tmp_path, capsys):
    root, _, model = trained
    argv = ["generate", "omni", "--model", str(model), "--prompt-text", "say a cat sitting on a chair"]
    assert cli.main([*argv, "--respond-with", "audio", "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "answer.wav").is_file()
    image = root / "in" / "media" / "astronaut-0.png"
    assert cli.main(["generate", "omni", "--model", str(model), "--prompt-audio", str(image)]) == 1
    assert "prompt: not a WAV file" in capsys.readouterr().err
    assert cli.main([*argv, "--respond-with", "smell"]) == 2
