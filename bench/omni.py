"""Benchmark: the omni path on media made here (espeak-ng speech, installed photographs, ffmpeg videos).

    python bench/omni.py [--repeats 3] [--videos 4] [--steps 60] [--prompts 15]

Prints, from one run:
  ingest     omni-ingest (FnApiRunner, the whole pipeline: vocabulary, both k-means codebooks, tokenising,
             packing, writing): examples/s, and tokens/s per modality (the modality's tokens over the
             pipeline's wall time); beside it, the front end alone per modality (decoding and features,
             one process, no Beam): parts/s, what the pipeline's time is spent on
  train      tokens/s of `train omni` (talking-heads, 2 layers, d_model 128): a step's tokens over the
             median step time, the first (tracing) step left out, on 1 device and on batch=4,model=2
  answer     a short spoken prompt (espeak-ng, about 2 s) answered by a trained model, median and best
             of --prompts runs: time to first token (text answer) and to first audio sample (audio
             answer: the first 4 codes, 80 ms of sound, through Griffin-Lim), beside GPT-4o's published
             232 ms best / 320 ms average for speech in to speech out (ratio = ours / theirs). The clock
             starts with the WAV's bytes in hand, the model loaded and traced; it covers the log-mel front
             end, the codebook look-up, the prefill and the draws. Not the same task: GPT-4o's figure is
             for a large model answering a question, ours a 2-layer model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

GPT4O_BEST_S, GPT4O_MEAN_S = 0.232, 0.320


def _front_end(manifest: Path) -> dict[str, tuple[int, float]]:
    """Per modality (parts decoded, seconds) of the media front ends alone."""
    from headrace.pipelines.omni import OmniIngestConfig, decode_part, media_of, parse_line

    media = media_of(OmniIngestConfig())
    seen: dict[str, list[float]] = {}
    for line in manifest.read_text().splitlines():
        for kind, item in parse_line(line):
            t = time.perf_counter()
            decode_part(kind, item, str(manifest.parent), media)
            seen.setdefault(kind, []).append(time.perf_counter() - t)
    return {k: (len(v), sum(v)) for k, v in seen.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3, help="examples per photograph and kind")
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="steps of each training throughput run")
    parser.add_argument("--answer-steps", type=int, default=150, help="training of the model that answers")
    parser.add_argument("--prompts", type=int, default=15, help="timed answers (median and best)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from headrace.core import mesh

    mesh.configure_virtual_devices(8)
    from headrace.pipelines.omni import OmniIngestConfig, build_omni_ingest
    from headrace.pipelines.omni_data import espeak_available, speak, write_manifest
    from headrace.runners.beam_runner import run_pipeline
    from headrace.runners.generate_omni import OmniGenerateConfig, Responder
    from headrace.runners.train_omni import OmniTrainConfig, train_and_evaluate

    if not espeak_available():
        raise SystemExit("bench/omni.py: espeak-ng is not installed (make media-deps)")
    work = Path(tempfile.mkdtemp(prefix="bench-omni-"))
    try:
        manifest = write_manifest(work / "in", repeats=args.repeats, videos=args.videos)
        data = work / "data"
        t = time.perf_counter()
        run_pipeline(build_omni_ingest, OmniIngestConfig(input=str(manifest), output=str(data), seq_len=256))
        ingest_s = time.perf_counter() - t
        report = json.loads((data / "report.json").read_text())
        front = _front_end(manifest)

        def train(spec: str, steps: int, out: str) -> dict:
            return train_and_evaluate(
                OmniTrainConfig(
                    data=str(data),
                    output=str(work / out),
                    mesh=spec,
                    steps=steps,
                    batch_size=8,
                    learning_rate=0.01,
                )
            )

        one = train("", args.steps, "one")
        meshed = train("batch=4,model=2", args.steps, "mesh")
        answerer = train("", args.answer_steps, "answerer")

        wav = speak("what is in the picture", work / "prompt.wav")
        responder = Responder(str(work / "answerer"))
        firsts: dict[str, list[float]] = {"text": [], "audio": []}
        for i in range(args.prompts):
            for kind in firsts:
                config = OmniGenerateConfig(prompt_audio=str(wav), respond_with=kind, temperature=0.8, seed=i)
                result = responder.answer(config)
                firsts[kind].append(
                    result["time_to_first_token_s" if kind == "text" else "time_to_first_audio_s"]
                )
        prompt_tokens = result["prompt_tokens"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nomni-ingest: {report['examples']} examples, {report['total_tokens']:,} tokens in {ingest_s:.1f} s "
          f"({report['examples'] / ingest_s:.1f} examples/s, {report['total_tokens'] / ingest_s:,.0f} tokens/s)")  # fmt: skip
    print("\n| modality | parts | tokens | pipeline tokens/s | front end alone, parts/s |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("text", "audio", "image", "video"):
        n, seconds = front.get(kind, (0, 0.0))
        rate = f"{n / seconds:,.0f}" if seconds else "-"
        print(f"| {kind} | {report['parts'][kind]} | {report['tokens'][kind]:,} | "
              f"{report['tokens'][kind] / ingest_s:,.0f} | {rate} |")  # fmt: skip
    print("\n| train omni (talking-heads, 2 layers, d_model 128, batch 8 x 256) | tokens/s |")
    print("|---|---:|")
    print(f"| 1 device | {one['steady_tokens_per_sec']:,.0f} |")
    print(f"| batch=4,model=2 (8 virtual devices, 2 cores) | {meshed['steady_tokens_per_sec']:,.0f} |")
    print(f"\nanswering a {prompt_tokens}-token spoken prompt ({args.prompts} runs; model trained "
          f"{args.answer_steps} steps, eval perplexity {answerer['perplexity']:.2f}):")  # fmt: skip
    print(
        "\n| figure | ours median | ours best | GPT-4o average | GPT-4o best | median / 320 ms | best / 232 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, label in (("text", "time to first token"), ("audio", "time to first audio")):
        median, best = statistics.median(firsts[kind]), min(firsts[kind])
        print(f"| {label} | {median * 1000:.0f} ms | {best * 1000:.0f} ms | 320 ms | 232 ms | "
              f"{median / GPT4O_MEAN_S:.2f}x | {best / GPT4O_BEST_S:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
