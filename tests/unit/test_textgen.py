"""The text-generation runtime and its spec: streaming, stopping, sampling, refusals."""

from __future__ import annotations

import math
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from inferd.errors import BadRequest, ModelLoadError, ValidationFailed
from inferd.models.base import Model, StreamingModel
from inferd.models.repository import ModelRepository
from inferd.models.spec import ModelSpec, load_spec
from inferd.models.textgen import IncrementalDecoder, TextGenerationModel
from tests.support.textgen import build_tiny_model, write_text_model

QUICK = " brown fox jumps over the lazy dog again."  # what the tiny model learned after "the quick"


def _offline(mp: pytest.MonkeyPatch) -> None:
    """No model hub, and no network at all: a connection attempt fails the test."""
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 and its tokenizer, built once; copy before changing it."""
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2") / "model")


@pytest.fixture(scope="session")
def text_repo(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A model repository holding the tiny model as ``tiny``."""
    root = tmp_path_factory.mktemp("text-models")
    write_text_model(root, "tiny", source=tiny_model)
    return root


def _load(root: Path, name: str = "tiny") -> TextGenerationModel:
    entry = ModelRepository(root).get(name)
    model = TextGenerationModel(entry.spec, entry.latest, entry.artifact(entry.latest))
    model.load()
    return model


@pytest.fixture(scope="session")
def model(text_repo: Path) -> Iterator[TextGenerationModel]:
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp)
        loaded = _load(text_repo)
    yield loaded
    loaded.unload()


class Counter:
    """A ``should_stop`` that turns True after ``allow`` calls, counting every call."""

    def __init__(self, allow: int) -> None:
        self.allow = allow
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls > self.allow


def _count_forwards(model: TextGenerationModel) -> tuple[list[int], Callable[[], None]]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    handle = model.model.register_forward_hook(hook)
    return calls, handle.remove


# ---------------------------------------------------------------------------- loading
def test_loads_from_the_version_folder_without_network(model: TextGenerationModel) -> None:
    assert model.device is not None
    assert model.device.type == "cpu"
    assert model.context_length == 128
    assert model.tokenizer.eos_token_id in model.eos_ids
    assert not model.model.training
    assert model.classes() is None
    assert isinstance(model, StreamingModel)
    assert isinstance(model, Model)


def test_repository_serves_the_version_folder_itself(text_repo: Path) -> None:
    entry = ModelRepository(text_repo).get("tiny")

    assert entry.spec.artifact_name is None
    assert entry.artifact(1) == text_repo.resolve() / "tiny" / "1"


def test_warm_up_runs(model: TextGenerationModel) -> None:
    model.warm_up()


def test_missing_folder_names_the_path(text_repo: Path, tmp_path: Path) -> None:
    spec = ModelRepository(text_repo).get("tiny").spec
    gone = tmp_path / "nothing-here"

    with pytest.raises(ModelLoadError) as info:
        TextGenerationModel(spec, 1, gone).load()

    assert str(gone) in info.value.message
    assert "'tiny' version 1" in info.value.message


def _drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _garble_weights(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x00not a safetensors file" * 10)


def _garble_config(folder: Path) -> None:
    (folder / "config.json").write_text("{ this is not json", encoding="utf-8")


def _garble_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("[1, 2", encoding="utf-8")


def _drop_tokenizer(folder: Path) -> None:
    # special_tokens_map.json is written by some transformers releases only.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


def _foreign_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.add_tokens([f"extra{i}" for i in range(20)])
    tokenizer.save_pretrained(folder)


def _drop_everything(folder: Path) -> None:
    for child in folder.iterdir():
        child.unlink()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_drop_weights, "model.safetensors"),
        (_garble_weights, "cannot read a causal language model from"),
        (_garble_config, "config.json' is not a valid JSON file"),
        (_garble_tokenizer, "tokenizer.json is corrupt"),
        (_drop_tokenizer, "no tokenizer files (tokenizer.json, "),
        (_drop_everything, "config.json is missing"),
        (_foreign_tokenizer, "has 420 tokens but the model embeds 400"),
    ],
)
def test_missing_or_corrupt_files_name_the_folder(
    text_repo: Path, tmp_path: Path, damage: Callable[[Path], None], says: str
) -> None:
    folder = tmp_path / "1"
    shutil.copytree(text_repo / "tiny" / "1", folder)
    damage(folder)
    spec = ModelRepository(text_repo).get("tiny").spec

    with pytest.raises(ModelLoadError) as info:
        TextGenerationModel(spec, 1, folder).load()

    assert info.value.message.startswith("model 'tiny' version 1: ")
    assert str(folder) in info.value.message
    assert says in info.value.message


def test_cuda_device_without_a_gpu_is_refused(text_repo: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is available here")
    entry = ModelRepository(text_repo).get("tiny")
    spec = entry.spec.model_copy(
        update={"generation": entry.spec.generation.model_copy(update={"device": "cuda"})}
    )

    with pytest.raises(ModelLoadError, match='device is "cuda" but no CUDA device'):
        TextGenerationModel(spec, 1, entry.artifact(1)).load()


def test_requests_before_load_and_after_unload_are_refused(text_repo: Path) -> None:
    entry = ModelRepository(text_repo).get("tiny")
    fresh = TextGenerationModel(entry.spec, 1, entry.artifact(1))

    with pytest.raises(ModelLoadError, match="is not loaded"):
        fresh.stream("the quick", {})
    fresh.load()
    assert fresh.generate("a stitch") == " in time saves nine."
    started = fresh.stream("a stitch")
    first = next(started)
    fresh.unload()
    with pytest.raises(ModelLoadError, match="is not loaded"):
        fresh.generate("a stitch")
    # A stream under way keeps what it needs and finishes.
    assert first + "".join(started) == " in time saves nine."


def test_predict_points_to_long_running_requests(model: TextGenerationModel) -> None:
    import numpy as np

    with pytest.raises(BadRequest, match="/v1/requests"):
        model.predict(np.zeros((1, 1)))


# ---------------------------------------------------------------------------- greedy output
def test_stream_yields_pieces_that_join_to_generate(model: TextGenerationModel) -> None:
    stream = model.stream("the quick", {})
    pieces = list(stream)

    assert len(pieces) > 3
    assert all(pieces)
    assert "".join(pieces) == model.generate("the quick") == QUICK
    assert stream.finish_reason == "eos"
    assert stream.tokens == len(pieces)


def test_greedy_is_deterministic_across_runs_and_loads(
    model: TextGenerationModel, text_repo: Path
) -> None:
    first = model.generate("the café", {"max_new_tokens": 20})
    again = model.generate("the café", {"max_new_tokens": 20})
    other = _load(text_repo)
    try:
        from_other = other.generate("the café", {"max_new_tokens": 20})
    finally:
        other.unload()

    assert first == again == from_other == " on the corner serves crème brûlée."


def test_max_new_tokens_is_respected(model: TextGenerationModel) -> None:
    forwards, remove = _count_forwards(model)
    try:
        stream = model.stream("the quick", {"max_new_tokens": 3})
        text = "".join(stream)
    finally:
        remove()

    assert stream.tokens == 3
    assert forwards[0] == 3
    assert stream.finish_reason == "length"
    assert text == " brown fox jumps"


def test_spec_default_for_max_new_tokens(text_repo: Path, tiny_model: Path, tmp_path: Path) -> None:
    write_text_model(tmp_path, "short", source=tiny_model, generation="max_new_tokens = 2")
    short = _load(tmp_path, "short")
    try:
        stream = short.stream("the quick", {})
        assert "".join(stream) == " brown fox"
        assert stream.tokens == 2
    finally:
        short.unload()


def test_generation_ends_at_the_context_length(model: TextGenerationModel) -> None:
    prompt = "zq" * 63  # one token per character: 126 of the 128 positions
    assert len(model.tokenizer.encode(prompt)) == 126

    stream = model.stream(prompt, {"max_new_tokens": 50})
    list(stream)

    assert stream.tokens <= 3
    assert stream.finish_reason in ("length", "eos")


def test_empty_prompt_starts_from_the_start_token(model: TextGenerationModel) -> None:
    stream = model.stream("", {"max_new_tokens": 5})
    list(stream)

    assert stream.finish_reason in ("length", "eos")


# ---------------------------------------------------------------------------- stopping
def test_should_stop_ends_the_stream_within_one_token(model: TextGenerationModel) -> None:
    should_stop = Counter(allow=3)
    forwards, remove = _count_forwards(model)
    try:
        stream = model.stream("the quick", {"max_new_tokens": 30}, should_stop)
        pieces = list(stream)
    finally:
        remove()

    assert stream.tokens == 3
    assert forwards[0] == 3  # no forward pass after should_stop() said True
    assert should_stop.calls == 4
    assert stream.finish_reason == "cancelled"
    assert "".join(pieces) == " brown fox jumps"


def test_cancel_while_consuming(model: TextGenerationModel) -> None:
    cancelled = False
    stream = model.stream("the quick", {}, lambda: cancelled)
    first = next(stream)
    cancelled = True

    assert first == " brown"
    assert list(stream) == []
    assert stream.tokens == 1
    assert stream.finish_reason == "cancelled"


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["lazy"], " brown fox jumps over the "),
        (["s over t"], " brown fox jump"),  # spans three tokens
        (["dog", "fox"], " brown "),  # the earliest match wins
        ([" brown"], ""),
    ],
)
def test_stop_strings_end_before_the_match(
    model: TextGenerationModel, stop: list[str], expected: str
) -> None:
    stream = model.stream("the quick", {"stop": stop})
    pieces = list(stream)

    assert "".join(pieces) == expected
    assert stream.finish_reason == "stop"
    assert all(s not in piece for piece in pieces for s in stop)


def test_a_stop_string_that_never_completes_loses_no_text(model: TextGenerationModel) -> None:
    stream = model.stream("the quick", {"stop": ["the lazy cat", "again!"]})

    assert "".join(stream) == QUICK
    assert stream.finish_reason == "eos"


def test_stop_strings_from_the_spec_and_the_request_add_up(
    tiny_model: Path, tmp_path: Path
) -> None:
    write_text_model(tmp_path, "stopping", source=tiny_model, generation='stop = ["lazy"]')
    stopping = _load(tmp_path, "stopping")
    try:
        assert stopping.generate("the quick") == " brown fox jumps over the "
        assert stopping.generate("the quick", {"stop": ["jumps"]}) == " brown fox "
    finally:
        stopping.unload()


# ---------------------------------------------------------------------------- characters
def test_incremental_decoding_never_splits_a_character(model: TextGenerationModel) -> None:
    text = "smile 🙂 and 🌍 café crème"
    ids = model.tokenizer.encode(text)
    decoder = IncrementalDecoder(model.tokenizer)

    pieces = [decoder.push(i) for i in ids]

    assert "" in pieces  # an emoji spans two tokens: nothing comes out after the first
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_streamed_emoji_come_out_whole(model: TextGenerationModel) -> None:
    pieces = list(model.stream("smile", {}))

    assert "".join(pieces) == " 🙂 and the world smiles with you 🌍."
    assert all("\ufffd" not in piece for piece in pieces)
    assert " 🙂" in pieces


def test_decoder_keeps_the_context_out_of_the_output(model: TextGenerationModel) -> None:
    context = model.tokenizer.encode("the quick")
    decoder = IncrementalDecoder(model.tokenizer, context)

    out = [decoder.push(i) for i in model.tokenizer.encode(" brown fox")]

    assert out == [" brown", " fox"]


# ---------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible(model: TextGenerationModel) -> None:
    params = {"temperature": 1.5, "seed": 7, "max_new_tokens": 12}

    first = model.generate("hello", params)
    second = model.generate("hello", params)
    others = {model.generate("hello", {**params, "seed": seed}) for seed in range(8)}

    assert first == second
    assert len(others) > 1  # the seed matters: this is sampling, not greedy


@pytest.mark.parametrize("narrow", [{"top_k": 1}, {"top_p": 1e-6}])
def test_sampling_narrowed_to_one_token_is_greedy(
    model: TextGenerationModel, narrow: dict[str, Any]
) -> None:
    params = {"temperature": 2.0, "max_new_tokens": 10, **narrow}

    assert model.generate("the quick", params) == model.generate(
        "the quick", {"max_new_tokens": 10}
    )


def test_sampling_with_top_k_and_top_p(model: TextGenerationModel) -> None:
    stream = model.stream(
        "the", {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 3, "max_new_tokens": 8}
    )
    text = "".join(stream)

    assert stream.tokens <= 8
    assert "\ufffd" not in text


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("input", "parameters", "message"),
    [
        ({"prompt": "hi"}, {}, "must be a string (the prompt), not an object"),
        (None, {}, "must be a string (the prompt), not null"),
        ("x" * 513, {}, "is 513 characters; the limit is 512"),
        ("hi", {"temp": 1, "beam": 2}, "unknown parameters beam, temp for model 'tiny'"),
        ("hi", {"max_tokens": 5}, "unknown parameter max_tokens for model 'tiny'; it takes"),
        ("hi", {"max_new_tokens": 0}, "max_new_tokens must be from 1 to 1024, got 0"),
        ("hi", {"max_new_tokens": 1025}, "max_new_tokens must be from 1 to 1024, got 1025"),
        ("hi", {"max_new_tokens": "5"}, "max_new_tokens must be an integer, not a string"),
        ("hi", {"max_new_tokens": True}, "max_new_tokens must be an integer, not a boolean"),
        ("hi", {"max_new_tokens": 2.0}, "max_new_tokens must be an integer, not a number"),
        ("hi", {"temperature": -0.5}, "temperature must be >= 0, got -0.5"),
        ("hi", {"temperature": "hot"}, "temperature must be a number, not a string"),
        ("hi", {"temperature": math.nan}, "temperature must be a finite number"),
        ("hi", {"top_k": -1}, "top_k must be >= 0, got -1"),
        ("hi", {"top_p": 0}, "top_p must be in (0, 1], got 0.0"),
        ("hi", {"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ("hi", {"seed": -1}, "seed must be from 0 to"),
        ("hi", {"seed": "x"}, "seed must be an integer, not a string"),
        ("hi", {"stop": "\n"}, "stop must be a list of strings, not a string"),
        ("hi", {"stop": [1]}, "stop must be a list of strings, not an array"),
        ("hi", {"stop": [""]}, "stop strings must be 1 to 256 characters long"),
        ("hi", {"stop": ["a"] * 17}, "stop has 17 strings; at most 16"),
        ("zq" * 200, {}, "the prompt is 400 tokens; model 'tiny' reads at most 128"),
    ],
)
def test_bad_requests_are_refused_before_anything_runs(
    model: TextGenerationModel, input: Any, parameters: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationFailed) as info:
        model.validate_request(input, parameters)
    assert message in info.value.message
    assert info.value.status_code == 422

    forwards, remove = _count_forwards(model)
    try:
        with pytest.raises(ValidationFailed):
            model.stream(input, parameters)  # raised by the call, not at the first piece
    finally:
        remove()
    assert forwards[0] == 0


def test_parameters_must_be_an_object(model: TextGenerationModel) -> None:
    with pytest.raises(ValidationFailed, match="parameters must be an object, not an array"):
        model.validate_request("hi", [1])  # type: ignore[arg-type]


def test_valid_request_passes(model: TextGenerationModel) -> None:
    model.validate_request(
        "hi",
        {"max_new_tokens": 1024, "temperature": 1, "top_k": 0, "top_p": 1, "seed": 2**64 - 1},
    )
    settings = model.request_settings("hi", {"stop": ["a", "a", "b"]})
    assert settings.stop == ("a", "b")
    assert settings.greedy


# ---------------------------------------------------------------------------- the spec
def _spec(toml: str, tmp_path: Path, name: str = "m") -> ModelSpec:
    path = tmp_path / "model.toml"
    path.write_text(toml, encoding="utf-8")
    return load_spec(path, name)


def test_text_spec_defaults(tmp_path: Path) -> None:
    spec = _spec('task = "text-generation"\n', tmp_path)

    assert spec.runtime == "transformers"
    assert spec.generates_text
    assert spec.input.type == "text"
    assert spec.input.max_chars == 8192
    assert spec.input.features == []
    assert spec.n_features == 0
    assert spec.artifact_name is None
    gen = spec.generation
    assert (gen.max_new_tokens, gen.max_new_tokens_limit) == (64, 1024)
    assert (gen.temperature, gen.top_k, gen.top_p) == (0.0, 0, 1.0)
    assert gen.stop == []
    assert gen.device == "auto"


def test_text_spec_in_full(tmp_path: Path) -> None:
    spec = _spec(
        'runtime = "transformers"\ntask = "text-generation"\n'
        "[input]\nmax_chars = 100\n"
        "[generation]\nmax_new_tokens = 8\nmax_new_tokens_limit = 16\ntemperature = 0.7\n"
        'top_k = 40\ntop_p = 0.95\nstop = ["\\n\\n"]\ndevice = "cpu"\n',
        tmp_path,
    )

    assert spec.input.type == "text"
    assert spec.input.max_chars == 100
    assert spec.generation.stop == ["\n\n"]
    assert spec.generation.top_k == 40


def test_python_runtime_may_generate_text(tmp_path: Path) -> None:
    spec = _spec('runtime = "python"\nclass = "a.b:C"\ntask = "text-generation"\n', tmp_path)

    assert spec.runtime == "python"
    assert spec.input.type == "text"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'runtime = "sklearn"\ntask = "text-generation"\n',
            'task "text-generation" needs runtime "transformers" or "python", not \'sklearn\'',
        ),
        (
            'runtime = "transformers"\n[input]\nfeatures = ["a"]\n',
            'runtime "transformers" serves task "text-generation" only',
        ),
        (
            'task = "text-generation"\n[input]\nfeatures = ["a"]\n',
            "input.features is for tabular input",
        ),
        (
            'task = "text-generation"\n[input]\ntype = "tabular"\nfeatures = ["a"]\n',
            'needs text input (input.type = "text")',
        ),
        ('task = "regression"\n[input]\ntype = "text"\n', "needs tabular input"),
        ("[input]\nfeatures = []\n", "input.features must name at least one feature"),
        ("[input]\n", "input.features must name at least one feature"),
        ('[input]\nfeatures = ["a"]\nmax_chars = 10\n', "input.max_chars is for text input"),
        ('[input]\nfeatures = ["a"]\n[generation]\n', "[generation] is for task"),
        ('task = "text-generation"\n[input]\nmax_chars = 0\n', "input.max_chars"),
        (
            'task = "text-generation"\n[generation]\nmax_new_tokens = 2000\n',
            "generation.max_new_tokens (2000) is over generation.max_new_tokens_limit (1024)",
        ),
        ('task = "text-generation"\n[generation]\ntop_p = 0\n', "generation.top_p"),
        ('task = "text-generation"\n[generation]\ntemperature = -1\n', "generation.temperature"),
        ('task = "text-generation"\n[generation]\ndevice = "tpu"\n', "generation.device"),
        ('task = "text-generation"\n[generation]\nstop = [""]\n', "must not be empty"),
        ('task = "text-generation"\n[generation]\nbeams = 4\n', "generation.beams"),
    ],
)
def test_spec_rules(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        _spec(toml, tmp_path)

    assert message in info.value.message
    assert str(tmp_path / "model.toml") in info.value.message


def test_tabular_spec_still_requires_input(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="input: Field required"):
        _spec('task = "classification"\n', tmp_path)
