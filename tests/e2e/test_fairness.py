"""Fair sharing with real processes: four keys at 1x keep their p99 beside one key at 10x.

``bench/fairness.py`` run short: an ``inferd serve`` with keys required and a model whose every
batch takes 20 ms (400 rows a second at most), four light keys at 40 requests a second each,
alone, then beside a heavy key at 400 a second (560 asked in all), then the same load on a server
with fair sharing off. Each light key's p99 beside the heavy key stays within 2x of its p99
alone and none of its requests fails; in one queue they fail or wait (the load is real).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_four_keys_keep_their_p99_beside_a_key_at_ten_times_their_load(tmp_path: Path) -> None:
    out = tmp_path / "fairness.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "fairness.py"),
            "--duration",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = result["phases"]
    for user in ("light1", "light2", "light3", "light4"):
        alone, fair = phases["alone"][user], phases["fair"][user]
        assert alone["statuses"] == {"200": alone["requests"]}, done.stdout
        assert fair["statuses"] == {"200": fair["requests"]}, done.stdout
        assert fair["p99_ms"] <= 2 * alone["p99_ms"], done.stdout
    # The heavy key was really over its share: refused or late, not the others.
    assert sum(n for s, n in phases["fair"]["heavy"]["statuses"].items() if s != "200") > 0
    one_queue = phases["one queue"]["light"]
    assert (
        one_queue["statuses"].get("200", 0) < one_queue["requests"]
        or one_queue["p99_ms"] > 2 * phases["alone"]["light"]["p99_ms"]
    ), done.stdout
