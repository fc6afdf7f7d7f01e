"""Benchmark: the sequence path on real text the OS ships (Debian's /usr/share/doc/*/copyright files).

    python bench/lm.py [--input '/usr/share/doc/*/copyright'] [--steps 200] [--seed 0]

Prints, from one run:
  ingest    text-ingest (FnApiRunner): documents/s and tokens/s, the whole pipeline (vocabulary included)
  train     tokens/s of `train lm`, multi-head vs talking-heads, on 1 device and on the 8-device
            batch=4,model=2 mesh (ratio = talking-heads / multi-head in the same run)
  quality   eval perplexity after --steps at the same width and seed, multi-head vs talking-heads
  generate  time to first token and tokens/s of `generate lm` (greedy, 48 tokens)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", default="/usr/share/doc/*/copyright")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from headrace.core import mesh

    mesh.configure_virtual_devices(8)
    from headrace.pipelines.text import TextIngestConfig, build_text_ingest
    from headrace.runners.beam_runner import run_pipeline
    from headrace.runners.generate_lm import GenerateConfig, generate
    from headrace.runners.train_lm import LMTrainConfig, train_and_evaluate

    work = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    try:
        rows = work / "rows"
        start = time.perf_counter()
        config = TextIngestConfig(
            input=args.input, output=str(rows), vocab_size=2048, seq_len=128, sample_bytes=4_000_000
        )
        run_pipeline(build_text_ingest, config)
        seconds = time.perf_counter() - start
        report = json.loads((rows / "report.json").read_text())
        print(
            f"ingest: {report['documents']} documents ({report['rejected']} rejected), {report['tokens']:,} tokens"
        )
        print(
            f"  {report['documents'] / seconds:,.1f} documents/s, {report['tokens'] / seconds:,.0f} tokens/s "
            f"in {seconds:.1f} s; packing efficiency {report['packing_efficiency']}"
        )

        results = {}
        for spec in ("", "batch=4,model=2"):
            for attention in ("multi_head", "talking_heads"):
                steps = args.steps if spec else max(20, args.steps // 4)
                out = work / f"{attention}-{spec or 'one'}"
                m = train_and_evaluate(
                    LMTrainConfig(
                        data=str(rows),
                        output=str(out),
                        attention=attention,
                        mesh=spec,
                        steps=steps,
                        seed=args.seed,
                        log_every_seconds=1e9,
                    )
                )
                results[(spec, attention)] = (m, out)
        print(f"train: 2 layers, d_model 128, 4 heads, batch 32 x 128 tokens, seed {args.seed}")
        print(f"  {'devices':<24} {'multi-head tok/s':>17} {'talking-heads tok/s':>20} {'ratio':>6}")
        for spec in ("", "batch=4,model=2"):
            mh, th = results[(spec, "multi_head")][0], results[(spec, "talking_heads")][0]
            name = "1 (plain TF)" if not spec else f"8 ({spec})"
            print(
                f"  {name:<24} {mh['tokens_per_sec']:>17,.0f} {th['tokens_per_sec']:>20,.0f} "
                f"{th['tokens_per_sec'] / mh['tokens_per_sec']:>5.2f}x"
            )
        mh, th = (
            results[("batch=4,model=2", "multi_head")][0],
            results[("batch=4,model=2", "talking_heads")][0],
        )
        print(f"quality after {mh['steps']} steps (eval tokens {mh['eval_tokens']:,}):")
        print(
            f"  multi-head perplexity {mh['perplexity']:.2f}, talking-heads {th['perplexity']:.2f} "
            f"(ratio {th['perplexity'] / mh['perplexity']:.3f})"
        )

        model = results[("batch=4,model=2", "talking_heads")][1]
        with contextlib.redirect_stdout(io.StringIO()):
            g = generate(
                GenerateConfig(
                    model=str(model), prompt="Permission is hereby granted", max_tokens=48, temperature=0
                )
            )
        print(
            f"generate: {g['tokens']} tokens, first after {g['time_to_first_token_s']:.3f} s, "
            f"{g['tokens_per_sec']} tokens/s; text: {g['text'][:80]!r}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
