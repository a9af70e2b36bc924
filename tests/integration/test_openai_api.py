"""The OpenAI-compatible routes (/openai/v1) through the whole app, in-process."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.support.access import access_lines, capture_access_log
from tests.support.textgen import write_text_model

QUICK = " brown fox jumps over the lazy dog again."  # the tiny model after "the quick"
COMPLETIONS = "/openai/v1/completions"
CHAT = "/openai/v1/chat/completions"


@pytest.fixture
def text_models(models_dir: Path, tiny_gpt2: Path) -> Path:
    """The demo models and the tiny GPT-2 as ``tiny``."""
    write_text_model(models_dir, "tiny", source=tiny_gpt2)
    return models_dir


@pytest.fixture
def serve(serve: Callable[..., Any], text_models: Path) -> Callable[..., Any]:
    def run(**overrides: Any) -> Any:
        overrides.setdefault("models", ["iris", "tiny"])
        overrides.setdefault("workers", 0)
        return serve(**overrides)

    return run


def events(text: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body; ``[DONE]`` stays a string."""
    out: list[Any] = []
    for line in text.split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate(s: Any, prompt: str, parameters: dict[str, Any] | None = None) -> str:
    """What the served model gives for ``prompt`` alone, one token at a time."""
    text: str = s.app.registry.get("tiny").model.generate(prompt, parameters)
    return text


class Gate:
    """Holds a scheduler's thread after every step that leaves sequences in its batch, until
    :meth:`open`. Install it with :meth:`on`.

    A step that leaves none passes: the load's warm-up generation ends with such a step, and
    its thread may call the hook only after the server is up and the gate installed (a thread
    preempted between delivering the last token and calling ``on_step``)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self.held = threading.Event()  # a step of a running sequence has been held
        self._scheduler: Any = None

    def on(self, scheduler: Any) -> Any:
        self._scheduler = scheduler
        scheduler._on_step = self
        return scheduler

    def __call__(self, sequences: int, seconds: float) -> None:
        if not self._scheduler.active:
            return
        self.held.set()
        self._open.wait(30)

    def open(self) -> None:
        self._open.set()


async def until(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Wait for ``condition`` (generously: a loaded machine may take seconds to start a step)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------- completions
async def test_completion_is_the_models_generation_with_usage(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        r = await s.client.post(COMPLETIONS, json={"model": "tiny", "prompt": "the quick"})
        short = await s.client.post(
            COMPLETIONS, json={"model": "tiny:1", "prompt": "the quick", "max_tokens": 3}
        )
        stopped = await s.client.post(
            COMPLETIONS, json={"model": "tiny", "prompt": "the quick", "stop": "lazy"}
        )
        prompt_ids = s.app.registry.get("tiny").model.prompt_ids("the quick")
    body = r.json()
    assert r.status_code == 200
    assert body["id"] == f"cmpl-{r.headers['x-request-id']}"
    assert body["object"] == "text_completion"
    assert body["model"] == "tiny"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"text": QUICK, "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 9,
                             "total_tokens": len(prompt_ids) + 9}  # fmt: skip
    assert short.json()["choices"][0]["text"] == " brown fox jumps"
    assert short.json()["choices"][0]["finish_reason"] == "length"
    assert short.json()["usage"]["completion_tokens"] == 3
    assert stopped.json()["choices"][0]["text"] == " brown fox jumps over the "
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"


async def test_sampling_parameters_and_seed(serve: Callable[..., Any]) -> None:
    sampled = {"model": "tiny", "prompt": "hello", "temperature": 1.5, "seed": 7, "max_tokens": 12}
    async with serve() as s:
        answers = await asyncio.gather(
            *(s.client.post(COMPLETIONS, json=sampled) for _ in range(3)),
            *(s.client.post(COMPLETIONS, json={**sampled, "seed": seed}) for seed in range(6)),
            s.client.post(COMPLETIONS, json={**sampled, "top_p": 1e-6}),
        )
        alone = generate(s, "hello", {"temperature": 1.5, "seed": 7, "max_new_tokens": 12})
        greedy = generate(s, "hello", {"max_new_tokens": 12})
    texts = [a.json()["choices"][0]["text"] for a in answers]
    assert texts[0] == texts[1] == texts[2] == alone
    assert len(set(texts[3:9])) > 1
    assert texts[9] == greedy  # top_p that keeps one token is greedy


async def test_streamed_completion(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        r = await s.client.post(
            COMPLETIONS, json={"model": "tiny", "prompt": "the quick", "stream": True}
        )
        with_usage = await s.client.post(
            COMPLETIONS,
            json={
                "model": "tiny",
                "prompt": "the quick",
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert chunks[-1] == "[DONE]"
    pieces = [c["choices"][0]["text"] for c in chunks[:-1]]
    assert len(pieces) > 3
    assert "".join(pieces) == QUICK
    assert all(c["object"] == "text_completion" for c in chunks[:-1])
    assert {c["id"] for c in chunks[:-1]} == {f"cmpl-{r.headers['x-request-id']}"}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    usage = events(with_usage.text)
    assert usage[-1] == "[DONE]"
    assert usage[-2]["choices"] == []
    assert usage[-2]["usage"]["completion_tokens"] == 9
    assert all(c["usage"] is None for c in usage[:-2])


# ---------------------------------------------------------------------------- chat
async def test_chat_without_a_template_is_a_transcript(serve: Callable[..., Any]) -> None:
    parts = [{"type": "text", "text": "the "}, {"type": "text", "text": "q"}]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
    async with serve() as s:
        chat = await s.client.post(CHAT, json={"model": "tiny", "messages": messages})
        transcript = "system: be brief\nuser: the q\nassistant:"
        model = s.app.registry.get("tiny").model
        alone = model.stream(transcript, {"stop": ["\nuser:"]})
        text = "".join(alone)
        prompt_tokens = len(model.prompt_ids(transcript))
    body = chat.json()
    assert chat.status_code == 200
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    reason = "length" if alone.finish_reason == "length" else "stop"
    assert body["choices"][0]["finish_reason"] == reason
    assert body["usage"]["prompt_tokens"] == prompt_tokens


async def test_chat_uses_the_tokenizers_template(
    serve: Callable[..., Any], text_models: Path
) -> None:
    folder = text_models / "tiny" / "1"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system messages here') }}{% endif %}"
        "{{ m['role'] }} says {{ m['content'] }}. {% endfor %}"
        "{% if add_generation_prompt %}the quick{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    async with serve() as s:
        chat = await s.client.post(
            CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
        )
        refused = await s.client.post(
            CHAT, json={"model": "tiny", "messages": [{"role": "system", "content": "x"}]}
        )
        rendered = "user says hi. the quick"
        alone = generate(s, rendered)
        tokenizer = s.app.registry.get("tiny").model.tokenizer
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"] == alone
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert chat.json()["usage"]["prompt_tokens"] == expected
    assert refused.status_code == 400
    assert "no system messages here" in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "messages"


async def test_streamed_chat(serve: Callable[..., Any]) -> None:
    messages = [{"role": "user", "content": "the quick"}]
    async with serve() as s:
        whole = await s.client.post(CHAT, json={"model": "tiny", "messages": messages})
        streamed = await s.client.post(
            CHAT, json={"model": "tiny", "messages": messages, "stream": True}
        )
    chunks = events(streamed.text)
    assert chunks[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[-1] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    content = "".join(d.get("content", "") for d in deltas)
    assert content == whole.json()["choices"][0]["message"]["content"]


# ---------------------------------------------------------------------------- models
async def test_models_in_openais_shape(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        listed = await s.client.get("/openai/v1/models")
        one = await s.client.get("/openai/v1/models/tiny:1")
        tabular = await s.client.get("/openai/v1/models/iris")
        unknown = await s.client.get("/openai/v1/models/nope")
        own = await s.client.get("/v1/models/tiny")
    assert listed.json()["object"] == "list"
    assert [m["id"] for m in listed.json()["data"]] == ["tiny", "tiny:1"]
    assert all(m["object"] == "model" and m["owned_by"] == "inferd" for m in listed.json()["data"])
    assert one.json()["id"] == "tiny:1"
    assert tabular.status_code == 404
    assert tabular.json()["error"]["code"] == "model_not_found"
    assert "not a text-generation model" in tabular.json()["error"]["message"]
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": unknown.json()["error"]["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert own.json()["continuous_batching"]["max_sequences"] == 16
    assert "/openai/v1/chat/completions" in own.json()["openai_endpoints"]


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("route", "body", "status", "param", "message"),
    [
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "n": 2}, 400, "n", "n must be 1"),
        (COMPLETIONS, {"model": "nope", "prompt": "x"}, 404, "model", "'nope' is not served"),
        (COMPLETIONS, {"model": "iris", "prompt": "x"}, 404, "model", "not a text-generation"),
        (COMPLETIONS, {"model": "tiny:7", "prompt": "x"}, 404, "model", "no version 7"),
        (COMPLETIONS, {"prompt": "x"}, 400, "model", "model is required"),
        (COMPLETIONS, {"model": "tiny"}, 400, "prompt", "prompt is required"),
        (COMPLETIONS, {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
        (COMPLETIONS, {"model": "tiny", "prompt": [5000]}, 400, "prompt", "token ids must be"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature",
         "from 0 to 2"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens",
         "at least 1"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "max_tokens": 2000}, 400, "max_tokens",
         "at most 1024"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "seed": -1}, 400, "seed", "seed must be"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "stop": [1]}, 400, "stop", "strings"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "stop": ["a"] * 17}, 400, "stop",
         "at most 16"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "logprobs": 2}, 400, "logprobs",
         "not supported"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo", "echo"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "presence_penalty": 1}, 400,
         "presence_penalty", "not supported"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "beam_width": 2}, 400, "beam_width",
         "Unrecognized request argument"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x", "stream_options": {}}, 400,
         "stream_options", "only allowed when stream is true"),
        (COMPLETIONS, {"model": "tiny", "prompt": "x" * 600}, 400, "prompt", "the limit is 512"),
        (COMPLETIONS, {"model": "tiny", "prompt": "zq" * 200}, 400, "prompt", "reads at most 128"),
        (CHAT, {"model": "tiny", "messages": []}, 400, "messages", "non-empty list"),
        (CHAT, {"model": "tiny", "messages": [{"role": "bot", "content": "x"}]}, 400,
         "messages[0].role", "must be one of"),
        (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
         400, "messages[0].content", "images and audio are not supported"),
        (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
        (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"}}, 400, "response_format", "text"),
        (CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                "max_completion_tokens": 3}, 400, "max_completion_tokens", "differ"),
    ],
)  # fmt: skip
async def test_bad_requests_get_openai_errors(
    serve: Callable[..., Any],
    route: str,
    body: dict[str, Any],
    status: int,
    param: str,
    message: str,
) -> None:
    async with serve() as s:
        r = await s.client.post(route, json=body)
    error = r.json()["error"]
    assert r.status_code == status
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]


async def test_malformed_bodies(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        broken = await s.client.post(
            COMPLETIONS, content=b"{", headers={"content-type": "application/json"}
        )
        not_json = await s.client.post(
            COMPLETIONS, content=b"prompt=x", headers={"content-type": "text/plain"}
        )
        array = await s.client.post(COMPLETIONS, json=[1])
        too_big = await s.client.post(
            COMPLETIONS, json={"model": "tiny", "prompt": "x" * 2_000_000}
        )
        elsewhere = await s.client.get("/openai/v1/embeddings")
        wrong_method = await s.client.get(COMPLETIONS)
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json()["error"]["message"]
    assert not_json.status_code == 415
    assert not_json.json()["error"]["code"] == "unsupported_media_type"
    assert array.status_code == 400
    assert too_big.status_code == 413
    assert elsewhere.status_code == 404
    assert "POST /openai/v1/completions" in elsewhere.json()["error"]["message"]
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------- keys and budget
async def test_keys_scopes_and_the_daily_budget(serve: Callable[..., Any]) -> None:
    async with serve(auth="required") as s:
        key, _ = await s.app.keys.create("ann", ["predict"], daily_tokens=30)
        other, _ = await s.app.keys.create("bob", ["requests"])
        anonymous = await s.client.post(COMPLETIONS, json={"model": "tiny", "prompt": "x"})
        wrong_scope = await s.client.post(
            COMPLETIONS, json={"model": "tiny", "prompt": "x"}, headers=bearer(other)
        )
        served = await s.client.post(
            COMPLETIONS,
            json={"model": "tiny", "prompt": "the quick", "max_tokens": 20},
            headers=bearer(key),
        )
        after_one = (await s.client.get("/v1/usage", headers=bearer(key))).json()
        streamed = await s.client.post(
            CHAT,
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "the quick"}],
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers=bearer(key),
        )
        after_two = (await s.client.get("/v1/usage", headers=bearer(key))).json()
        over = await s.client.post(
            COMPLETIONS,
            json={"model": "tiny", "prompt": "the quick", "max_tokens": 50},
            headers=bearer(key),
        )
        after_refusal = (await s.client.get("/v1/usage", headers=bearer(key))).json()
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert set(anonymous.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong_scope.status_code == 403
    assert wrong_scope.json()["error"]["type"] == "permission_error"
    assert served.status_code == 200
    used = served.json()["usage"]["completion_tokens"]
    assert used == 9  # 20 were reserved; what was generated is kept
    assert after_one["tokens_used_today"] == 9
    assert after_one["models"]["tiny"]["tokens"] == 9
    assert '"daily";q=30' in served.headers["ratelimit-policy"]
    assert streamed.status_code == 200
    assert events(streamed.text)[-1] == "[DONE]"
    # Where the tiny model stops in a chat transcript (it was trained on plain sentences) is
    # its own affair; what counts is that the key pays what the stream says it generated.
    chat_tokens = events(streamed.text)[-2]["usage"]["completion_tokens"]
    assert 1 <= chat_tokens <= 4
    assert after_two["tokens_used_today"] == 9 + chat_tokens
    assert over.status_code == 429
    assert over.json()["error"]["type"] == "insufficient_quota"
    assert over.json()["error"]["code"] == "quota_exceeded"
    assert "retry-after" in over.headers
    assert after_refusal["tokens_used_today"] == 9 + chat_tokens


# ---------------------------------------------------------------------------- load
async def test_a_full_queue_is_shed_with_503(serve: Callable[..., Any]) -> None:
    gate = Gate()
    async with serve(generation_max_sequences=1, generation_max_queue=1) as s:
        scheduler = gate.on(s.app.registry.get("tiny").scheduler)  # holds its thread
        body = {"model": "tiny", "prompt": "the quick"}
        running = asyncio.create_task(s.client.post(COMPLETIONS, json=body))
        await until(lambda: scheduler.active == 1)
        queued = asyncio.create_task(s.client.post(COMPLETIONS, json=body))
        await until(lambda: scheduler.depth == 1)
        shed = await s.client.post(COMPLETIONS, json=body)
        gate.open()
        answers = await asyncio.gather(running, queued)
        metrics = (await s.client.get("/metrics")).text
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "1"
    assert shed.json()["error"]["type"] == "server_error"
    assert shed.json()["error"]["code"] == "overloaded"
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["choices"][0]["text"] for a in answers] == [QUICK, QUICK]
    assert 'inference_queue_rejections_total{model="tiny",reason="full",version="1"} 1.0' in metrics


async def test_unloading_lets_running_generations_finish(serve: Callable[..., Any]) -> None:
    gate = Gate()
    async with serve() as s:
        gate.on(s.app.registry.get("tiny").scheduler)
        running = asyncio.create_task(
            s.client.post(COMPLETIONS, json={"model": "tiny", "prompt": "the quick"})
        )
        await until(gate.held.is_set)  # mid-generation: held after its first step
        unloading = asyncio.create_task(s.app.registry.unload_model("tiny"))
        await until(lambda: not s.app.registry.versions("tiny"))
        refused = await s.client.post(COMPLETIONS, json={"model": "tiny", "prompt": "x"})
        gate.open()
        answer = await running
        await unloading
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["text"] == QUICK
    assert refused.status_code == 404


# ---------------------------------------------------------------------------- observability
async def test_metrics_and_access_log(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        sink = capture_access_log(s.app)
        await s.client.post(COMPLETIONS, json={"model": "tiny", "prompt": "the quick"})
        await s.client.post(COMPLETIONS, json={"model": "tiny", "prompt": "x", "n": 3})
        metrics = (await s.client.get("/metrics")).text
        lines = access_lines(s.app, sink)
    ok = next(x for x in lines if x["path"] == COMPLETIONS and x["status_code"] == 200)
    bad = next(x for x in lines if x["path"] == COMPLETIONS and x["status_code"] == 400)
    assert (ok["model"], ok["model_version"]) == ("tiny", "1")
    assert ok["queue_depth"] == 0
    assert "n must be 1" in bad["detail"]
    labels = 'model="tiny",version="1"'
    assert f"inference_generated_tokens_total{{{labels}}} 9.0" in metrics
    assert f"inference_time_to_first_token_seconds_count{{{labels}}} 1.0" in metrics
    assert f"inference_inter_token_latency_seconds_count{{{labels}}} 8.0" in metrics
    assert (
        'inference_generations_total{finish_reason="stop",model="tiny",version="1"} 1.0' in metrics
    )
    assert "inference_prompt_tokens_total{" + labels + "}" in metrics
    assert (
        'inference_requests_total{endpoint="/openai/v1/completions",method="POST",status="200"}'
        in metrics
    )
    assert f"inference_batch_size_count{{{labels}}}" in metrics  # steps, sequences per step


async def test_a_stream_whose_client_goes_away_stops_and_keeps_only_what_was_made(
    serve: Callable[..., Any],
) -> None:
    gate = Gate()
    async with serve(auth="required") as s:
        key, _ = await s.app.keys.create("ann", ["predict"], daily_tokens=100)
        scheduler = gate.on(s.app.registry.get("tiny").scheduler)
        # the first token comes, then the model's thread waits
        body = json.dumps(
            {"model": "tiny", "prompt": "the quick", "max_tokens": 50, "stream": True}
        ).encode()
        chunks: list[bytes] = []
        first_chunk = asyncio.Event()
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await first_chunk.wait()
            return {"type": "http.disconnect"}  # the client closes after one chunk

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                first_chunk.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn says
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": COMPLETIONS,
            "raw_path": COMPLETIONS.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"inferd"),
                (b"content-type", b"application/json"),
                (b"authorization", f"Bearer {key}".encode()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 80),
        }
        await asyncio.wait_for(s.app(scope, receive, send), 10)
        gate.open()
        await until(lambda: scheduler.active == 0)
        usage = (await s.client.get("/v1/usage", headers=bearer(key))).json()
        metrics = (await s.client.get("/metrics")).text
    assert len(chunks) == 1
    assert events(chunks[0].decode())[0]["choices"][0]["text"] == " brown"
    assert usage["tokens_used_today"] == 1  # 50 reserved, one made before the client left
    assert (
        'inference_generations_total{finish_reason="cancelled",model="tiny",version="1"} 1.0'
        in metrics
    )
