"""What the request path pays per observation: in-process metric values against
prometheus-client's multiprocess mode (values in mmap'ed files, PROMETHEUS_MULTIPROC_DIR).

Each request observes about two histograms and a counter (request latency, HTTP duration,
requests by status); this times that set, per mode, in a fresh interpreter each (the value
class is chosen when prometheus_client is imported), and the cost of one scrape.

    .venv/bin/python bench/metrics_cost.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, os
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import multiprocess
sys.path.insert(0, sys.argv[1])
from inferd.metrics import LATENCY_BUCKETS
r = CollectorRegistry()
lat = Histogram("lat", "l", ("model", "version"), buckets=LATENCY_BUCKETS, registry=r)
dur = Histogram("dur", "d", ("endpoint", "method"), buckets=LATENCY_BUCKETS, registry=r)
req = Counter("req", "r", ("endpoint", "method", "status"), registry=r)
a, b = lat.labels("iris", "1"), dur.labels("/predict", "POST")
c = req.labels("/predict", "POST", "200")
n = 200_000
best = float("inf")
for _ in range(5):
    t = time.perf_counter()
    for i in range(n):
        a.observe(0.0004); b.observe(0.0005); c.inc()
    best = min(best, (time.perf_counter() - t) / n)
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    scrape_registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(scrape_registry)
else:
    scrape_registry = r
t = time.perf_counter()
for _ in range(20):
    generate_latest(scrape_registry)
print(json.dumps({"per_request_us": best * 1e6, "scrape_ms": (time.perf_counter() - t) / 20 * 1e3}))
"""


def run(multiproc: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with tempfile.TemporaryDirectory() as folder:
        if multiproc:
            env["PROMETHEUS_MULTIPROC_DIR"] = folder
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, src], env=env, capture_output=True, text=True, check=True
        )
    return dict(json.loads(out.stdout))


def main() -> None:
    inproc, mmap = run(False), run(True)
    print("per request: 2 histogram observations + 1 counter increment (best of 5)")
    print(f"  in-process values : {inproc['per_request_us']:.2f} µs")
    print(f"  multiprocess mmap : {mmap['per_request_us']:.2f} µs "
          f"({mmap['per_request_us'] / inproc['per_request_us']:.1f}x)")  # fmt: skip
    print("one scrape of these three families (one process's files):")
    print(f"  in-process {inproc['scrape_ms']:.2f} ms, multiprocess {mmap['scrape_ms']:.2f} ms")


if __name__ == "__main__":
    main()
