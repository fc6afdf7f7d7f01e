"""Benchmark: the sequence path on real text the OS ships (Debian's /usr/share/doc/*/copyright files).

    python bench/lm.py [--input '/usr/share/doc/*/copyright'] [--steps 40] [--quality-steps 800]
        [--seeds 0,1,2] [--heads 4]

Prints, from one run:
  ingest    text-ingest (FnApiRunner): documents/s and tokens/s, the whole pipeline (vocabulary included)
  train     tokens/s of `train lm`, multi-head vs talking-heads, on 1 device (plain TF) and on the
            8-device batch=4,model=2 mesh: a step's tokens over the median step time of --steps steps,
            the first (tracing) step left out; ratio = talking-heads / multi-head in the same run
  quality   eval perplexity after --quality-steps at the same width, for each seed, multi-head vs
            talking-heads on 1 device (the mesh gives the same numbers: tests/models/test_transformer.py),
            with the median over seeds and how many seeds talking-heads wins
  generate  time to first token and tokens/s of `generate lm` (greedy, 48 tokens), on the last
            talking-heads model of the quality runs
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

KINDS = ("multi_head", "talking_heads")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", default="/usr/share/doc/*/copyright")
    parser.add_argument("--steps", type=int, default=40, help="steps of each throughput run")
    parser.add_argument("--quality-steps", type=int, default=800, help="steps of each perplexity run")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the perplexity runs ('' skips them)")
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    from headrace.core import mesh

    mesh.configure_virtual_devices(8)
    from headrace.pipelines.text import TextIngestConfig, build_text_ingest
    from headrace.runners.beam_runner import run_pipeline
    from headrace.runners.generate_lm import GenerateConfig, generate
    from headrace.runners.train_lm import LMTrainConfig, train_and_evaluate

    work = Path(tempfile.mkdtemp(prefix="bench-lm-"))

    def train(attention: str, spec: str, steps: int, seed: int) -> tuple[dict, Path]:
        out = work / f"{attention}-{spec or 'one'}-{seed}-{steps}"
        config = LMTrainConfig(
            data=str(rows), output=str(out), attention=attention, mesh=spec, steps=steps,
            heads=args.heads, seed=seed, log_every_seconds=1e9,
        )  # fmt: skip
        return train_and_evaluate(config), out

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

        speed = {
            (spec, kind): train(kind, spec, args.steps, 0)
            for spec in ("", "batch=4,model=2")
            for kind in KINDS
        }
        print(
            f"train: 2 layers, d_model 128, {args.heads} heads, batch 32 x 128 tokens; "
            f"steady tokens/s over {args.steps} steps"
        )
        print(f"  {'devices':<24} {'multi-head tok/s':>17} {'talking-heads tok/s':>20} {'ratio':>6}")
        for spec in ("", "batch=4,model=2"):
            mh, th = (speed[(spec, kind)][0]["steady_tokens_per_sec"] for kind in KINDS)
            name = "1 (plain TF)" if not spec else f"8 ({spec})"
            print(f"  {name:<24} {mh:>17,.0f} {th:>20,.0f} {th / mh:>5.2f}x")

        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        if seeds:
            print(
                f"quality: eval perplexity after {args.quality_steps} steps, 1 device, same width "
                f"(d_model 128, {args.heads} heads)"
            )
            print(f"  {'seed':<6} {'multi-head':>11} {'talking-heads':>14} {'ratio':>6}   tokens/s MH / TH")
            rows_ = []
            for seed in seeds:
                (mh, _), (th, trained) = (train(kind, "", args.quality_steps, seed) for kind in KINDS)
                rows_.append((mh["perplexity"], th["perplexity"]))
                print(
                    f"  {seed:<6} {mh['perplexity']:>11.3f} {th['perplexity']:>14.3f} "
                    f"{th['perplexity'] / mh['perplexity']:>5.3f}x   "
                    f"{mh['steady_tokens_per_sec']:,.0f} / {th['steady_tokens_per_sec']:,.0f}"
                )
            mh_med = statistics.median(r[0] for r in rows_)
            th_med = statistics.median(r[1] for r in rows_)
            wins = sum(th < mh for mh, th in rows_)
            print(
                f"  {'median':<6} {mh_med:>11.3f} {th_med:>14.3f} {th_med / mh_med:>5.3f}x   "
                f"talking-heads lower in {wins} of {len(rows_)} seeds "
                f"(eval tokens {mh['eval_tokens']:,})"
            )

        # The generator on the last talking-heads model trained longest (the speed is the same for any).
        model = trained if seeds else speed[("batch=4,model=2", "talking_heads")][1]
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
