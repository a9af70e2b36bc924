"""CORS for browsers and the per-address limit of requests without a key, in-process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SETOSA = [5.1, 3.5, 1.4, 0.2]
ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-request-timeout-ms",
}


async def test_no_cors_headers_by_default(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        answer = await s.client.post(
            "/predict", json={"features": SETOSA}, headers={"Origin": ORIGIN}
        )
        preflight = await s.client.options("/predict", headers=PREFLIGHT)
    assert answer.status_code == 200
    assert "access-control-allow-origin" not in answer.headers
    assert "access-control-allow-origin" not in preflight.headers


async def test_cors_covers_the_lean_routes_and_preflight_before_auth(
    serve: Callable[..., Any],
) -> None:
    async with serve(auth="required", cors_origins=ORIGIN) as s:
        key, _ = await s.app.keys.create("web", ["predict"])
        preflight = await s.client.options("/v1/models/iris/predict", headers=PREFLIGHT)
        other = await s.client.options(
            "/predict", headers={**PREFLIGHT, "Origin": "https://evil.example.com"}
        )
        answer = await s.client.post(
            "/predict",
            json={"features": SETOSA},
            headers={"Origin": ORIGIN, "Authorization": f"Bearer {key}"},
        )
        refused = await s.client.post(
            "/predict", json={"features": SETOSA}, headers={"Origin": ORIGIN}
        )
        routed = await s.client.get("/v1/models", headers={"Origin": ORIGIN, "X-API-Key": key})
    assert preflight.status_code == 200  # answered before authentication
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-request-timeout-ms" in allowed
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in answer.headers["access-control-expose-headers"].lower()
    # A refusal is readable by the page too (it can show why).
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert routed.status_code == 200
    assert routed.headers["access-control-allow-origin"] == ORIGIN


async def test_requests_without_a_key_are_limited_per_address(serve: Callable[..., Any]) -> None:
    async with serve(auth="off", anonymous_rate="3/m") as s:
        answers = [await s.client.post("/predict", json={"features": SETOSA}) for _ in range(4)]
        health = [(await s.client.get("/health")).status_code for _ in range(5)]
        metrics = (await s.client.get("/metrics")).text
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-policy"] == '"rate";q=3;w=60'
    assert answers[0].headers["ratelimit"].startswith('"rate";r=2;')
    refused = answers[3]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "without an API key" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert health == [200] * 5  # public routes are not counted
    assert 'inference_limit_rejections_total{reason="address_rate"} 1.0' in metrics


async def test_forwarded_for_counts_only_from_a_trusted_proxy(serve: Callable[..., Any]) -> None:
    def via(address: str) -> dict[str, str]:
        return {"X-Forwarded-For": f"{address}, 127.0.0.1"}

    body = {"features": SETOSA}
    # The test client's peer is 127.0.0.1: trusted here, so each forwarded address has 2.
    async with serve(auth="off", anonymous_rate="2/m", trusted_proxies="127.0.0.1") as s:
        first = [(await s.client.post("/predict", json=body, headers=via("203.0.113.1")))
                 for _ in range(3)]  # fmt: skip
        second = await s.client.post("/predict", json=body, headers=via("203.0.113.2"))
    assert [a.status_code for a in first] == [200, 200, 429]
    assert second.status_code == 200
    # Not trusted: the header is ignored, and every request is the peer's.
    async with serve(auth="off", anonymous_rate="2/m") as s:
        codes = [
            (await s.client.post("/predict", json=body, headers=via(f"203.0.113.{i}"))).status_code
            for i in range(3)
        ]
    assert codes == [200, 200, 429]


async def test_with_auth_required_keyless_requests_are_counted_and_keys_are_not(
    serve: Callable[..., Any],
) -> None:
    async with serve(auth="required", anonymous_rate="2/m") as s:
        key, _ = await s.app.keys.create("alice", ["predict"])
        keyless = [
            (await s.client.post("/predict", json={"features": SETOSA})).status_code
            for _ in range(3)
        ]
        keyed = [
            (
                await s.client.post(
                    "/predict", json={"features": SETOSA}, headers={"X-API-Key": key}
                )
            ).status_code
            for _ in range(3)
        ]
    assert keyless == [401, 401, 429]
    assert keyed == [200, 200, 200]
