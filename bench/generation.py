"""Text generation: tokens per second with continuous batching versus one sequence at a time.

The tiny GPT-2 of the tests (tests/support/textgen.py: two layers, built here in seconds, no
download) is loaded once; then, for each number of concurrent streams (1, 4, 16), every
stream is a client in a closed loop that submits ``--requests`` generations one after the
other (corpus prompts, sampled at temperature 1 with a seed of their own, up to
``--max-tokens`` tokens, so lengths differ and sequences join and leave all the time), run

* **batched**: through a :class:`~inferd.generation.GenerationScheduler` with
  ``max_sequences = 16`` (continuous batching, as the OpenAI-compatible routes serve);
* **one at a time**: through the same scheduler with ``max_sequences = 1``;
* **stream**: through ``TextGenerationModel.stream`` in a thread, one at a time, as the
  workers of long-running requests run text models today.

A seed gives the same tokens whichever way a sequence runs, so every mode generates exactly
the same tokens; tokens/s is tokens generated over wall time. ``--rounds`` rounds run every
mode at every concurrency in turn; the medians are reported, and the ratio of the medians.

    .venv/bin/python bench/generation.py                    # ~1.5 minutes on 2 CPUs
    .venv/bin/python bench/generation.py --torch-threads 1  # one torch thread
    .venv/bin/python bench/generation.py --rounds 1 --requests 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.textgen import CORPUS, build_tiny_model, write_text_model  # noqa: E402

from inferd.concurrency import run_blocking  # noqa: E402
from inferd.generation import GenerationRequest, GenerationScheduler  # noqa: E402
from inferd.generation.engine import TorchEngine  # noqa: E402
from inferd.models.repository import ModelRepository  # noqa: E402
from inferd.models.textgen import TextGenerationModel  # noqa: E402

MODES = ("batched", "one at a time", "stream")
PROMPTS = [" ".join(line.split()[:2]) for line in CORPUS]


def load(folder: Path) -> TextGenerationModel:
    write_text_model(folder, "tiny", source=build_tiny_model(folder / "source"))
    entry = ModelRepository(folder).get("tiny")
    model = TextGenerationModel(entry.spec, 1, entry.artifact(1))
    model.load()
    return model


def workload(model: TextGenerationModel, streams: int, requests: int, max_tokens: int) -> Any:
    """Each stream's generations: the same for every mode."""
    plan = []
    for s in range(streams):
        mine = []
        for r in range(requests):
            prompt = PROMPTS[(s * requests + r) % len(PROMPTS)]
            params = {"temperature": 1.0, "seed": 1000 * s + r, "max_new_tokens": max_tokens}
            settings = model.request_settings(prompt, params)
            ids = model.prompt_ids(prompt)
            mine.append(
                (prompt, params, GenerationRequest(ids, settings, model.budget(ids, settings)))
            )
        plan.append(mine)
    return plan


async def through_scheduler(
    model: TextGenerationModel, plan: Any, max_sequences: int
) -> tuple[int, float, list[float]]:
    scheduler = GenerationScheduler("tiny", max_sequences=max_sequences, max_queue=1024)
    scheduler.start(TorchEngine(model))
    await scheduler.generate(plan[0][0][2])  # the thread's first forward pass, not measured
    first_tokens: list[float] = []

    async def client(mine: Any) -> int:
        tokens = 0
        for _, _, request in mine:
            stream = scheduler.submit(request)
            waiting = True
            async for step in stream:
                if waiting and step.tokens:
                    first_tokens.append(step.at - stream.submitted_at)
                    waiting = False
            tokens += stream.tokens
        return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(client(mine) for mine in plan))
    elapsed = time.perf_counter() - started
    await scheduler.stop(5)
    return sum(counts), elapsed, first_tokens


async def through_stream(model: TextGenerationModel, plan: Any) -> tuple[int, float, list[float]]:
    gate = threading.Lock()  # one generation at a time, as a worker's gate does
    first_tokens: list[float] = []

    def one(prompt: str, params: dict[str, Any]) -> int:
        submitted = time.perf_counter()
        with gate:
            stream = model.stream(prompt, params)
            for i, _ in enumerate(stream):
                if i == 0:
                    first_tokens.append(time.perf_counter() - submitted)
            return stream.tokens

    await run_blocking(one, *plan[0][0][:2])  # not measured
    first_tokens.clear()

    async def client(mine: Any) -> int:
        tokens = 0
        for prompt, params, _ in mine:
            tokens += await run_blocking(one, prompt, params)
        return tokens

    started = time.perf_counter()
    counts = await asyncio.gather(*(client(mine) for mine in plan))
    return sum(counts), time.perf_counter() - started, first_tokens


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,4,16", help="concurrent streams, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="generations per stream")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads; 0: torch's default"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: none)")
    args = parser.parse_args()
    levels = [int(n) for n in args.streams.split(",")]
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = load(Path(tmp))
        import torch

        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {model.device}"
        )
        runs: dict[tuple[str, int], list[dict[str, float]]] = {}
        for round_ in range(1, args.rounds + 1):
            for streams in levels:
                plan = workload(model, streams, args.requests, args.max_tokens)
                for mode in MODES:
                    if mode == "stream":
                        tokens, elapsed, firsts = await through_stream(model, plan)
                    else:
                        size = 16 if mode == "batched" else 1
                        tokens, elapsed, firsts = await through_scheduler(model, plan, size)
                    result = {
                        "tokens": tokens,
                        "seconds": elapsed,
                        "tokens_per_s": tokens / elapsed,
                        "first_token_p50_ms": statistics.median(firsts) * 1000,
                    }
                    runs.setdefault((mode, streams), []).append(result)
                    print(
                        f"round {round_} streams {streams:2d} {mode:13s} {tokens:5d} tokens "
                        f"{elapsed:6.2f} s {result['tokens_per_s']:8.1f} tokens/s, first token "
                        f"p50 {result['first_token_p50_ms']:.1f} ms",
                        flush=True,
                    )
        model.unload()

    def median(mode: str, streams: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[(mode, streams)])

    print()
    print("| streams | batched tokens/s | one at a time | stream() | batched / one at a time |"
          " first token p50: batched | one at a time |")  # fmt: skip
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for streams in levels:
        b = median("batched", streams, "tokens_per_s")
        o = median("one at a time", streams, "tokens_per_s")
        t = median("stream", streams, "tokens_per_s")
        fb = median("batched", streams, "first_token_p50_ms")
        fo = median("one at a time", streams, "first_token_p50_ms")
        row = [f"{b:.0f}", f"{o:.0f}", f"{t:.0f}", f"{b / o:.2f}x", f"{fb:.1f} ms", f"{fo:.1f} ms"]
        print(f"| {streams} | " + " | ".join(row) + " |")
    if args.out is not None:
        args.out.write_text(
            json.dumps({f"{m}/{n}": r for (m, n), r in runs.items()}, indent=2), encoding="utf-8"
        )


if __name__ == "__main__":
    asyncio.run(main())
