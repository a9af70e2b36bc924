"""OpenAI's own Python SDK against a real ``inferd serve`` serving the tiny GPT-2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.e2e.conftest import run_cli
from tests.support.textgen import write_text_model

QUICK = " brown fox jumps over the lazy dog again."  # the tiny model after "the quick"


@pytest.fixture
def served(start_server: Any, tmp_path: Path, tiny_gpt2: Path) -> tuple[Any, str, Path]:
    """A server with keys required and the tiny model; a key with a budget of 40 tokens."""
    models = tmp_path / "models"
    write_text_model(models, "tiny", source=tiny_gpt2)
    config = tmp_path / "inferd.toml"
    config.write_text(
        f'models_dir = "{models}"\nauth = "required"\nkey_cache_seconds = 0\nworkers = 0\n'
    )
    created = run_cli(
        "keys", "create", "--user", "sam", "--scopes", "predict", "--daily-tokens", "40",
        "--config", str(config), cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    server = start_server(["--config", str(config)])
    server.wait_ready()
    return server, created.stdout.strip(), config


def test_the_openai_sdk_works_against_inferd(served: tuple[Any, str, Path]) -> None:
    server, key, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=key, max_retries=0)

    models = client.models.list()
    completion = client.completions.create(model="tiny", prompt="the quick", max_tokens=20)
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model="tiny", prompt="the quick", max_tokens=20, stream=True
        )
    ]
    short = client.completions.create(model="tiny", prompt="the quick", max_tokens=5)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "the quick"}], max_tokens=5
    )
    streamed_chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "the quick"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chat_chunks = list(streamed_chat)
    usage = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()

    assert [m.id for m in models.data] == ["tiny", "tiny:1"]
    assert completion.choices[0].text == QUICK
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 9
    assert "".join(pieces) == QUICK
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None
    assert short.usage.completion_tokens == 5
    assert QUICK.startswith(short.choices[0].text)
    assert chat.choices[0].message.role == "assistant"
    # The tiny model was trained on plain sentences, not chat transcripts: where it stops in
    # one is its own affair. The answer, its stream and the usage must agree.
    assert chat.usage is not None
    chat_tokens = chat.usage.completion_tokens
    assert 1 <= chat_tokens <= 5
    assert chat.choices[0].finish_reason in ("stop", "length")
    if chat.choices[0].finish_reason == "length":
        assert chat_tokens == 5
    content = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert content == chat.choices[0].message.content
    assert chat_chunks[-1].usage is not None
    assert chat_chunks[-1].usage.completion_tokens == chat_tokens
    # Completion tokens count against the key's daily budget: 9 + 9 + 5 + the two chats,
    # not what was reserved (max_tokens: 20 + 20 + 5 + 5 + 5).
    spent = 9 + 9 + 5 + 2 * chat_tokens
    assert usage["tokens_used_today"] == spent
    assert usage["models"]["tiny"]["tokens"] == spent


def test_errors_reach_the_sdk_as_its_exceptions(served: tuple[Any, str, Path]) -> None:
    server, key, _ = served
    client = openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key=key, max_retries=0)
    stranger = openai.OpenAI(
        base_url=f"{server.url}/openai/v1", api_key="inferd_nope", max_retries=0
    )

    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-4o", prompt="hi")
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model="tiny", prompt="hi", n=2)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with pytest.raises(openai.RateLimitError) as over:
        client.completions.create(model="tiny", prompt="the quick", max_tokens=41)
    fine = client.completions.create(model="tiny", prompt="the quick", max_tokens=40)

    assert unknown.value.status_code == 404
    assert unknown.value.code == "model_not_found"
    assert unknown.value.param == "model"
    assert several.value.param == "n"
    assert "n must be 1" in several.value.message
    assert over.value.code == "quota_exceeded"
    assert over.value.type == "insufficient_quota"
    assert fine.choices[0].text == QUICK
    assert key not in server.output()
