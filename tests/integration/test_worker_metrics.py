"""``inferd worker`` serves its metrics when asked to: the work it did, to autoscale on."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import httpx

from inferd.backends import prepare_database
from inferd.jobs.sql import SqlStore
from inferd.worker_process import run_worker
from tests.integration.test_queue_controls import metric


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_worker_exports_the_tokens_it_processed(make_settings: Callable[..., Any]) -> None:
    port = _free_port()
    settings = make_settings(worker_metrics_port=port, poll_seconds=0.05)
    await prepare_database(settings)
    store = await SqlStore.connect(settings.effective_database_url)
    try:
        for _ in range(2):
            await store.create(
                user="alice",
                model="iris",
                input={"instances": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]},
                parameters={},
            )
    finally:
        await store.close()
    worker = asyncio.create_task(run_worker(settings, 1))
    url = f"http://127.0.0.1:{port}/metrics"
    text = ""
    try:
        async with httpx.AsyncClient() as client:
            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            # the tokens are counted as a chunk is written, the run when the job settles: wait
            # for both before stopping the worker, or the scrape can fall between the two
            while (
                metric(text, "inference_tokens_processed_total", model="iris") < 4
                or metric(text, "inference_job_runs_total", model="iris", outcome="succeeded") < 2
            ):
                assert loop.time() < end, text[-2000:]
                assert not worker.done(), worker
                await asyncio.sleep(0.05)
                try:
                    text = (await client.get(url)).text
                except httpx.TransportError:
                    text = ""  # not serving yet
    finally:
        if not worker.done():
            os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler: stop cleanly
        ran = await asyncio.wait_for(worker, 30)
    assert ran == 2
    assert metric(text, "inference_job_runs_total", model="iris", outcome="succeeded") == 2
