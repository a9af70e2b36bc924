"""What drift monitoring costs per call, in-process: ``Monitor.observe`` and ``Monitor.update``.

    python bench/drift_cost.py [--batches 2000] [--rows 1,16] [--repeat 5]

Uses the iris demo model and its reference.json (trained into a temporary folder). For each
batch size, ``observe`` is timed on ``--batches`` batches (what the request path pays per
answered batch), then one ``update`` bins them all (what the monitor task pays every
``drift_interval_seconds``), per batch and per row. The best of ``--repeat`` rounds is shown.
bench/run.py --targets inferd,inferd-nodrift measures the same on a real server under load.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from inferd.metrics import Metrics
from inferd.models.demo import train_demo
from inferd.models.loading import ModelState, prepare
from inferd.models.repository import ModelRepository
from inferd.monitoring import REFERENCE_FILE, Monitor, load_reference
from inferd.settings import Settings


def measure(batches: int, rows: int, repeat: int, folder: Path) -> dict[str, float]:
    settings = Settings(_env_file=None, data_dir=folder / "data")
    entry = ModelRepository(folder).read("iris")
    rng = np.random.default_rng(0)
    data = [rng.normal([5.8, 3.0, 3.8, 1.2], [0.8, 0.4, 1.8, 0.8], (rows, 4)) for _ in range(64)]
    outputs = [rng.dirichlet([1, 1, 1], rows) for _ in range(64)]
    best_observe = best_update = float("inf")
    for _ in range(repeat):
        metrics = Metrics(CollectorRegistry())
        loaded = prepare(entry, 1, settings, metrics)
        loaded.labels = ["setosa", "versicolor", "virginica"]
        reference = entry.folder / "1" / REFERENCE_FILE
        loaded.reference = load_reference(reference, entry.spec, loaded.labels)
        loaded.state = ModelState.READY
        monitor = Monitor(settings, metrics)
        observe = monitor.observe
        started = time.perf_counter()
        for i in range(batches):
            observe(loaded, data[i % 64], outputs[i % 64])
        best_observe = min(best_observe, (time.perf_counter() - started) / batches)
        started = time.perf_counter()
        monitor.update()
        best_update = min(best_update, time.perf_counter() - started)
    return {
        "observe_us_per_batch": best_observe * 1e6,
        "update_ms": best_update * 1e3,
        "update_us_per_batch": best_update / batches * 1e6,
        "update_us_per_row": best_update / (batches * rows) * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=2000, help="batches observed per update")
    p.add_argument("--rows", default="1,16", help="rows per batch, comma-separated")
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="inferd-drift-") as scratch:
        folder = Path(scratch)
        train_demo(folder)
        print("| rows/batch | observe µs/batch | update ms | update µs/batch | update µs/row |")
        print("|--:|--:|--:|--:|--:|")
        for rows in (int(r) for r in a.rows.split(",")):
            r = measure(a.batches, rows, a.repeat, folder)
            print(
                f"| {rows} | {r['observe_us_per_batch']:.2f} | {r['update_ms']:.2f} "
                f"| {r['update_us_per_batch']:.2f} | {r['update_us_per_row']:.3f} |"
            )


if __name__ == "__main__":
    main()
