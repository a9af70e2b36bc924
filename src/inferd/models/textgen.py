"""Text generation: ``runtime = "transformers"``, ``task = "text-generation"``.

The version folder is a causal language model and its tokenizer as written by
``save_pretrained``; it is read with ``local_files_only`` (nothing is fetched, and no code from
the folder is run). A request's text is produced one token at a time with the model's key/value
cache, so each piece can be stored and sent as soon as it exists and a cancel stops the work
within one token.

torch and transformers come with the ``text`` extra (``pip install 'inferd[text]'``). This
module imports them only when a model loads, so the rest of inferd works without them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from inferd.errors import BadRequest, ModelLoadError, ValidationFailed
from inferd.models.base import Capabilities, FloatArray
from inferd.models.sampling import GenerationSettings, output_cache, pick_token, split_at_stop
from inferd.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "DECODE_CONTEXT",
    "PARAMETERS",
    "FinishReason",
    "GenerationSettings",
    "IncrementalDecoder",
    "TextGenerationModel",
    "TextStream",
]

PARAMETERS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
"""The request parameters a text model accepts; any other name is refused."""

FinishReason = Literal["eos", "length", "stop", "cancelled"]
"""Why a stream ended: the model's end-of-sequence token, ``max_new_tokens`` or the model's
context length, a stop string, or ``should_stop()``."""

_MAX_STOP_STRINGS = 16
_MAX_STOP_CHARS = 256
_MAX_SEED = 2**64 - 1  # torch seeds are unsigned 64-bit
DECODE_CONTEXT = 8
"""Prompt tokens decoded together with the generated ones, so that a generated token's leading
space (SentencePiece) or a word boundary comes out as it would in the full text, while each
step still decodes only a short sequence's worth of context."""
_REPLACEMENT = "\ufffd"  # what a decoder gives for the first bytes of an unfinished character
_ERROR_CHARS = 300
_WARM_UP_PROMPT = "Hello"
# Files one of which a saved tokenizer has: the fast format, or a slow tokenizer's vocabulary.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


class IncrementalDecoder:
    """Turns generated token ids into text pieces that never split a character.

    Each step decodes the whole generated sequence (after a few context tokens) and returns
    only what is new, so a character whose bytes span several tokens comes out once it is
    complete, and a decoder that joins tokens with spaces or merges word pieces gives exactly
    the text that decoding all the ids at once would.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids)
        self._n_context = len(self._ids)
        self._prefix = self._decode(self._ids)
        self._emitted = ""

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of tokenization spaces: it rewrites text already emitted (" ." -> ".").
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text

    def _text(self) -> str:
        full = self._decode(self._ids)
        if full.startswith(self._prefix):
            return full[len(self._prefix) :]
        # Decoders are prefix-stable in practice; should one not be, decode the generated ids
        # alone rather than repeat the context or lose generated text.
        return self._decode(self._ids[self._n_context :])

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        text = self._text()
        if text.endswith(_REPLACEMENT):
            return ""  # wait for the rest of the character's bytes
        return self._advance(text)

    def flush(self) -> str:
        """What is left at the end, unfinished characters included."""
        return self._advance(self._text())

    def _advance(self, text: str) -> str:
        new = text[len(self._emitted) :]
        self._emitted = text
        return new


class TextStream(Iterator[str]):
    """The text pieces of one generation, computed as they are asked for.

    Iterating runs the model: one forward pass per token, reusing the key/value cache. After
    the last piece, :attr:`finish_reason` says why it ended and :attr:`tokens` how many tokens
    were generated. A stop string and anything after it are not yielded.
    """

    def __init__(
        self,
        model: TextGenerationModel,
        prompt_ids: list[int],
        settings: GenerationSettings,
        should_stop: Callable[[], bool] | None,
        budget: int,
    ) -> None:
        self.settings = settings
        self.tokens = 0
        """Tokens generated so far (the end-of-sequence token not counted)."""
        self.finish_reason: FinishReason | None = None
        """Set when the stream ends."""
        # Taken now, so a stream already started finishes even if the model is unloaded.
        self._net = model.model
        self._tokenizer = model.tokenizer
        self._device = model.device
        self._eos_ids = model.eos_ids
        self._cache_argument = model.cache_argument
        self._last_logits = model.last_logits
        self._pieces = self._run(prompt_ids, should_stop, budget)

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating; the key/value cache is released."""
        self._pieces.close()

    def _run(
        self, prompt_ids: list[int], should_stop: Callable[[], bool] | None, budget: int
    ) -> Generator[str, None, None]:
        import torch

        settings, net, device = self.settings, self._net, self._device
        generator: torch.Generator | None = None
        if not settings.greedy:
            generator = torch.Generator(device=device)
            if settings.seed is not None:
                generator.manual_seed(settings.seed)
            else:
                generator.seed()
        decoder = IncrementalDecoder(self._tokenizer, prompt_ids[-DECODE_CONTEXT:])
        stops = settings.stop
        pending = ""  # decoded text held back because it may be the start of a stop string
        next_input = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        past: Any = None
        while True:
            if should_stop is not None and should_stop():
                self.finish_reason = "cancelled"
                return
            if self.tokens >= budget:
                self.finish_reason = "length"
                break
            # Inference mode per step, not around the loop: a generator's ``with`` block would
            # stay open in the consumer's code between pieces.
            with torch.inference_mode():
                out = net(
                    input_ids=next_input,
                    use_cache=True,
                    **{self._cache_argument: past},
                    **self._last_logits,
                )
                past = output_cache(out)
                token = pick_token(out.logits[0, -1, :], settings, generator)
            if token in self._eos_ids:
                self.finish_reason = "eos"
                break
            self.tokens += 1
            next_input = torch.tensor([[token]], dtype=torch.long, device=device)
            pending += decoder.push(token)
            out_text, pending, hit = split_at_stop(pending, stops)
            if out_text:
                yield out_text
            if hit:
                self.finish_reason = "stop"
                return
        rest, _, hit = split_at_stop(pending + decoder.flush(), stops, final=True)
        if hit:
            self.finish_reason = "stop"
        if rest:
            yield rest


_CAPABILITIES = Capabilities(streams=True, validates_requests=True, warms_up=True, device=None)


class TextGenerationModel:
    """A causal language model that streams its output token by token.

    ``predict`` is not supported: text models answer long-running requests
    (``POST /v1/requests``) through :meth:`stream`.
    """

    def __init__(self, spec: ModelSpec, version: int, path: Path) -> None:
        self.spec = spec
        self.version = version
        self.path = path
        self.model: Any = None
        """The loaded ``PreTrainedModel`` (None until :meth:`load`)."""
        self.tokenizer: Any = None
        """The loaded tokenizer (None until :meth:`load`)."""
        self.device: torch.device | None = None
        self.capabilities = _CAPABILITIES
        self.eos_ids: frozenset[int] = frozenset()
        self.context_length: int | None = None
        """The most tokens (prompt and output) the model reads, when its config says."""
        self.cache_argument = "past_key_values"
        """The name under which the model's ``forward`` takes its key/value cache: ``cache``
        in recent transformers releases, ``past_key_values`` before."""
        self.last_logits: dict[str, int] = {}
        """Passed to ``forward`` so it computes logits for the last position only, where the
        model can (``logits_to_keep``): a long prompt does not pay for the others."""

    @property
    def _where(self) -> str:
        return f"model {self.spec.name!r} version {self.version}"

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Read the tokenizer and model from the version folder onto the configured device."""
        where = self._where
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise ModelLoadError(
                f'{where}: runtime "transformers" needs torch and transformers; install them '
                f"with `pip install 'inferd[text]'` ({exc})"
            ) from exc
        folder = self.path
        if not folder.is_dir():
            raise ModelLoadError(f"{where}: model folder {folder} is missing or not a folder")
        device = _device(self.spec.generation.device, where)
        # Through Any: how much of these loaders is typed differs between transformers releases.
        auto_tokenizer: Any = transformers.AutoTokenizer
        auto_model: Any = transformers.AutoModelForCausalLM
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{where}: cannot read a model from {folder}: config.json is missing (the folder "
                "must hold a model and tokenizer written by save_pretrained)"
            )
        # Checked here: some transformers releases build an empty tokenizer when there is none.
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise ModelLoadError(
                f"{where}: cannot read a tokenizer from {folder}: no tokenizer files "
                f"({', '.join(_TOKENIZER_FILES)})"
            )
        try:
            tokenizer = auto_tokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as exc:  # missing or corrupt files raise OSError, ValueError, ...
            raise ModelLoadError(
                f"{where}: cannot read a tokenizer from {folder}: {_tokenizer_problem(folder, exc)}"
            ) from exc
        try:
            model = auto_model.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"{where}: cannot read a causal language model from {folder}: {_describe(exc)}"
            ) from exc
        # A tokenizer that does not fit the model would feed it out-of-range ids.
        embedded = model.get_input_embeddings().num_embeddings
        if not 1 < len(tokenizer) <= embedded:
            raise ModelLoadError(
                f"{where}: the tokenizer in {folder} has {len(tokenizer)} tokens but the model "
                f"embeds {embedded}; they do not belong together"
            )
        model.to(device)
        model.eval()
        eos: set[int] = set()
        for ids in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(ids, int):
                eos.add(ids)
            elif isinstance(ids, list):
                eos.update(i for i in ids if isinstance(i, int))
        length = getattr(model.config, "max_position_embeddings", None)
        self.tokenizer, self.model, self.device = tokenizer, model, torch.device(device)
        self.capabilities = dataclasses.replace(_CAPABILITIES, device=str(device))
        self.eos_ids = frozenset(eos)
        self.context_length = length if isinstance(length, int) and length > 0 else None
        forward = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}

    def warm_up(self) -> None:
        """One short generation, so the first request does not pay for lazy initialisation;
        raises ModelLoadError when the model's output is unusable."""
        import torch

        self._require_loaded()
        ids = self.prompt_ids(_WARM_UP_PROMPT)
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits
        if not bool(torch.isfinite(logits).all()):
            raise ModelLoadError(f"{self._where}: warm-up gave non-finite logits")
        # Built directly, not from parameters: the warm-up must not depend on input limits.
        gen = self.spec.generation
        settings = GenerationSettings(
            prompt=_WARM_UP_PROMPT,
            max_new_tokens=2,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            seed=0,
            stop=(),
        )
        for _ in self._open(settings, None):
            pass

    def unload(self) -> None:
        """Drop the model and tokenizer; on a GPU, hand the cached memory back."""
        on_cuda = self.device is not None and self.device.type == "cuda"
        self.model = None
        self.tokenizer = None
        if on_cuda:
            import torch

            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ requests
    def validate_request(self, input: Any, parameters: dict[str, Any]) -> None:
        """Raise ValidationFailed for a bad prompt or parameters; called before queueing."""
        settings = self.request_settings(input, parameters)
        if self.tokenizer is not None:
            self.budget(self.prompt_ids(settings.prompt), settings)

    def request_settings(self, input: Any, parameters: dict[str, Any] | None) -> GenerationSettings:
        """Check ``input`` and ``parameters`` and merge them with the spec's ``[generation]``."""
        where = f"model {self.spec.name!r}"
        if not isinstance(input, str):
            raise ValidationFailed(
                f"input for {where} must be a string (the prompt), not {_json_type(input)}"
            )
        limit = self.spec.input.max_chars
        if len(input) > limit:
            raise ValidationFailed(
                f"input for {where} is {len(input)} characters; the limit is {limit}"
            )
        params = {} if parameters is None else parameters
        if not isinstance(params, dict):
            raise ValidationFailed(f"parameters must be an object, not {_json_type(params)}")
        unknown = sorted(str(name) for name in params if name not in PARAMETERS)
        if unknown:
            raise ValidationFailed(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                f"for {where}; it takes {', '.join(PARAMETERS)}"
            )
        gen = self.spec.generation
        cap = gen.max_new_tokens_limit
        max_new_tokens = _int(params, "max_new_tokens", gen.max_new_tokens, 1, cap)
        temperature = _float(params, "temperature", gen.temperature)
        if temperature < 0:
            raise ValidationFailed(f"parameters.temperature must be >= 0, got {temperature}")
        top_k = _int(params, "top_k", gen.top_k, 0, None)
        top_p = _float(params, "top_p", gen.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValidationFailed(f"parameters.top_p must be in (0, 1], got {top_p}")
        seed = _int(params, "seed", None, 0, _MAX_SEED) if "seed" in params else None
        return GenerationSettings(
            prompt=input,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=tuple(dict.fromkeys([*gen.stop, *_stop_strings(params.get("stop"))])),
        )

    def stream(
        self,
        input: Any,
        parameters: dict[str, Any] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TextStream:
        """Generate text for the prompt ``input``, yielding it piece by piece.

        ``parameters`` may set ``max_new_tokens``, ``temperature`` (0 is greedy), ``top_k``,
        ``top_p``, ``seed`` (makes sampling reproducible) and ``stop`` (a list of strings
        added to the spec's). Bad input raises ValidationFailed here, before anything runs.
        ``should_stop`` is called before each token; when it returns True the stream ends.
        """
        self._require_loaded()
        return self._open(self.request_settings(input, parameters), should_stop)

    def generate(self, input: Any, parameters: dict[str, Any] | None = None) -> str:
        """The whole text :meth:`stream` would yield, at once."""
        return "".join(self.stream(input, parameters))

    def predict(self, batch: FloatArray) -> FloatArray:
        """Not supported: text models take prompts, not rows of numbers."""
        raise BadRequest(
            f"model {self.spec.name!r} generates text and has no /predict; submit a request "
            'to POST /v1/requests with {"model": ..., "input": "<prompt>"}'
        )

    def classes(self) -> list[int | str] | None:
        """Text models have no classes."""
        return None

    # ------------------------------------------------------------------ internals
    def _require_loaded(self) -> None:
        if self.model is None or self.tokenizer is None:
            raise ModelLoadError(f"{self._where} is not loaded")

    def _open(
        self, settings: GenerationSettings, should_stop: Callable[[], bool] | None
    ) -> TextStream:
        ids = self.prompt_ids(settings.prompt)
        return TextStream(self, ids, settings, should_stop, self.budget(ids, settings))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids of ``prompt`` (the start token for an empty one)."""
        ids: list[int] = list(self.tokenizer.encode(prompt))
        if ids:
            return ids
        # An empty prompt: start from the beginning-of-sequence token, as unconditional
        # generation does; GPT-2-style models use their end-of-text token for it.
        for start in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if isinstance(start, int):
                return [start]
        raise ValidationFailed(f"model {self.spec.name!r} needs a non-empty prompt")

    def budget(self, prompt_ids: list[int], settings: GenerationSettings) -> int:
        """Tokens this request may generate: ``max_new_tokens`` within the context length."""
        length = self.context_length
        if length is None:
            return settings.max_new_tokens
        if len(prompt_ids) > length:
            raise ValidationFailed(
                f"the prompt is {len(prompt_ids)} tokens; model {self.spec.name!r} reads at "
                f"most {length}"
            )
        # The last token generated is never fed back, hence the + 1.
        return min(settings.max_new_tokens, length - len(prompt_ids) + 1)


# ---------------------------------------------------------------------- helpers
def _device(wanted: str, where: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f'{where}: generation.device is "cuda" but no CUDA device is usable')
    return wanted


def _int(params: dict[str, Any], name: str, default: Any, low: int, high: int | None) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailed(f"parameters.{name} must be an integer, not {_json_type(value)}")
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValidationFailed(f"parameters.{name} must be {bound}, got {value}")
    return value


def _float(params: dict[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailed(f"parameters.{name} must be a number, not {_json_type(value)}")
    if not math.isfinite(value):
        raise ValidationFailed(f"parameters.{name} must be a finite number, got {value}")
    return float(value)


def _stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValidationFailed(
            f"parameters.stop must be a list of strings, not {_json_type(value)}"
        )
    if len(value) > _MAX_STOP_STRINGS:
        raise ValidationFailed(
            f"parameters.stop has {len(value)} strings; at most {_MAX_STOP_STRINGS} are allowed"
        )
    if any(not 1 <= len(s) <= _MAX_STOP_CHARS for s in value):
        raise ValidationFailed(
            f"parameters.stop strings must be 1 to {_MAX_STOP_CHARS} characters long"
        )
    return list(value)


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about request bodies."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _tokenizer_problem(folder: Path, exc: BaseException) -> str:
    """Why the tokenizer did not load, in words that point at the file.

    When ``tokenizer.json`` is missing or unreadable, transformers falls back to converting a
    slow tokenizer and reports that fallback's failure (often a missing protobuf), which says
    nothing about the folder; reading the file directly gives the real reason.
    """
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(path))
        except Exception as inner:
            return f"tokenizer.json is corrupt: {_describe(inner)}"
    return _describe(exc)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > _ERROR_CHARS:
        text = text[: _ERROR_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
