"""The traffic figures of /v1/stats that the console's Live view shows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.models import write_scripted_model


async def test_stats_show_split_cache_and_shadow(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "tr", 1)
    write_scripted_model(models_dir, "tr", 2)
    toml = models_dir / "tr" / "model.toml"
    toml.write_text(
        toml.read_text()
        + '[versions]\npolicy = "specific"\nversions = [1, 2]\ndefault = 1\n'
        + '[split]\nweights = { "1" = 75, "2" = 25 }\n'
        + "[cache]\nmax_entries = 10\n"
        + "[shadow]\nversion = 2\nmax_busy = 1.0\n"  # the client shares the loop
    )
    async with serve() as s:
        for _ in range(3):  # the row, pinned to version 1: a miss, then hits
            answer = await s.client.post(
                "/v1/models/tr/predict",
                json={"features": [1, 2, 3, 4]},
                headers={"X-Inferd-Variant": "1"},
            )
            assert answer.status_code == 200
            await s.app.plane.shadow.drain()
        stats = (await s.client.get("/v1/stats")).json()
        plain = stats["models"].get("iris", {})
    traffic = stats["models"]["tr"]["traffic"]
    assert traffic["split"] == {"1": 0.75, "2": 0.25}
    assert traffic["cache"] == {"hit": 2, "miss": 1, "hit_ratio": 0.6667}
    assert traffic["shadow"]["2"]["agree"] == 3
    assert traffic["shadow"]["2"]["agreement"] == 1.0
    assert "traffic" not in plain
