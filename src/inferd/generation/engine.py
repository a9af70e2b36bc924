"""The torch side of continuous batching: one batch of sequences with one key/value cache.

Sequences of different lengths share one cache, aligned on the right and padded on the left:
row ``i`` holds its ``n_i`` real positions in the last ``n_i`` columns of the cache. A decode
step feeds each row's last token with

* an attention mask that is 0 over each row's padding, 1 over its real positions and the new
  token, so padding is never attended to;
* position ids ``n_i`` per row (not the padded width), so each row sees the positions it would
  see alone.

A new sequence's prompt is run on its own (no padding: its first token comes from exactly the
computation it would get alone), then its cache joins the batch, padded on the left to the
batch's width (or the batch to its). When sequences leave, their rows are dropped and columns
that are padding for every remaining row are cut, so the cache is only as wide as the longest
sequence in it. The cache is rebuilt only when the batch changes; between changes it grows by
one column per step, as transformers' ``DynamicCache`` does.

This needs a model whose every layer attends to the whole sequence (GPT-2, Llama and most
causal language models). Models with sliding-window or recurrent layers keep per-layer state
that cannot be padded this way; they are run one sequence at a time (``max_sequences = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inferd.generation.scheduler import GenerationStream
from inferd.models.textgen import TextGenerationModel, output_cache, pick_token

if TYPE_CHECKING:
    import torch

__all__ = ["TorchEngine", "batchable"]


@dataclass(slots=True, eq=False)
class _Row:
    seq: GenerationStream
    generator: torch.Generator | None
    length: int
    """Positions of this sequence in the cache (prompt and tokens fed back)."""
    pending: int
    """The last token picked, to be fed at the next step."""
    cache: Any = None
    """Its own cache while it waits to join the batch."""


class TorchEngine:
    """A batch of sequences on one transformers causal language model.

    Built from a loaded :class:`~inferd.models.textgen.TextGenerationModel`; it keeps the
    model and tokenizer it was built with, so sequences under way finish even if the model
    object is unloaded. Not thread-safe: one scheduler thread drives it.
    """

    def __init__(self, model: TextGenerationModel) -> None:
        from transformers import DynamicCache

        if model.model is None or model.tokenizer is None or model.device is None:
            raise RuntimeError(f"model {model.spec.name!r} is not loaded")
        self._dynamic_cache = DynamicCache
        self.net: Any = model.model
        self.tokenizer: Any = model.tokenizer
        self.device: torch.device = model.device
        self.eos_ids = model.eos_ids
        self._cache_argument = model.cache_argument
        self.max_sequences: int | None = None if self._batchable() else 1
        self._rows: list[_Row] = []
        self._staged: list[_Row] = []
        self._cache: Any = None
        self._width = 0
        self.forwards = 0
        """Forward passes run (prompts and decode steps); tests read it."""

    def _batchable(self) -> bool:
        """What the model's config says, and whether its forward pass returns a
        ``DynamicCache`` whose layers can be padded and joined."""
        if not batchable(self.net.config):
            return False
        import torch

        start = next(iter(self.eos_ids), 0)
        with torch.inference_mode():
            out = self.net(input_ids=torch.tensor([[start]], device=self.device), use_cache=True)
        return isinstance(output_cache(out), self._dynamic_cache)

    @property
    def size(self) -> int:
        """Sequences in the batch (not counting those prefilled but not committed)."""
        return len(self._rows)

    @property
    def width(self) -> int:
        """Positions in the batch's cache: those of its longest sequence."""
        return self._width

    def prefill(self, seq: GenerationStream) -> int:
        import torch

        settings = seq.request.settings
        generator: torch.Generator | None = None
        if not settings.greedy:
            # As a sequence run alone does: the same seed gives the same draws, batched or not.
            generator = torch.Generator(device=self.device)
            if settings.seed is not None:
                generator.manual_seed(settings.seed)
            else:
                generator.seed()
        ids = torch.tensor([seq.request.prompt_ids], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.net(input_ids=ids, use_cache=True)
            token = pick_token(out.logits[0, -1, :], settings, generator)
        self.forwards += 1
        row = _Row(seq, generator, ids.shape[1], token, output_cache(out))
        self._staged.append(row)
        return token

    def decode(self) -> list[tuple[GenerationStream, int]]:
        import torch

        rows, width = self._rows, self._width
        if not rows:
            return []
        lengths = torch.tensor([r.length for r in rows], dtype=torch.long, device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        tokens = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
        with torch.inference_mode():
            out = self.net(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=lengths[:, None],
                use_cache=True,
                **{self._cache_argument: self._cache},
            )
            logits = out.logits[:, -1, :]
            best = logits.argmax(dim=-1).tolist()
            for i, row in enumerate(rows):
                if row.generator is not None:
                    best[i] = pick_token(logits[i], row.seq.request.settings, row.generator)
        self.forwards += 1
        self._cache = output_cache(out)
        self._width = width + 1
        for row, token in zip(rows, best, strict=True):
            row.length += 1
            row.pending = token
        return [(row.seq, row.pending) for row in rows]

    def commit(self, leaving: set[GenerationStream]) -> None:
        import torch

        keep = [r for r in self._rows if r.seq not in leaving]
        joining = [r for r in self._staged if r.seq not in leaving]
        self._staged = []
        if len(keep) == len(self._rows) and not joining:
            return
        if not keep and not joining:
            self.reset()
            return
        if not keep and len(joining) == 1:  # a batch of one: its own cache as it is
            row = joining[0]
            self._rows, self._cache, self._width, row.cache = [row], row.cache, row.length, None
            return
        width = max(r.length for r in (*keep, *joining))
        blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        if keep:
            kept = torch.tensor(
                [i for i, r in enumerate(self._rows) if r.seq not in leaving], device=self.device
            )
            blocks.append(
                [
                    (_fit(k.index_select(0, kept), width), _fit(v.index_select(0, kept), width))
                    for k, v in _layers(self._cache)
                ]
            )
        for row in joining:
            blocks.append([(_fit(k, width), _fit(v, width)) for k, v in _layers(row.cache)])
            row.cache = None
        cat = torch.cat
        layers = [
            (cat([b[i][0] for b in blocks]), cat([b[i][1] for b in blocks]))
            for i in range(len(blocks[0]))
        ]
        self._rows = [*keep, *joining]
        self._cache = self._make_cache(layers)
        self._width = width

    def reset(self) -> None:
        self._rows, self._staged, self._cache, self._width = [], [], None, 0

    def _make_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        cls = self._dynamic_cache
        legacy = getattr(cls, "from_legacy_cache", None)  # transformers 4: from tuples
        if legacy is not None:
            return legacy(tuple(layers))
        return cls(layers)


def batchable(config: Any) -> bool:
    """Whether every layer of the model attends to the whole sequence, so that sequences of
    different lengths can share a left-padded cache."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False):
        return False
    layer_types = getattr(text, "layer_types", None)
    if layer_types and any(kind != "full_attention" for kind in layer_types):
        return False
    window = getattr(text, "sliding_window", None)
    return not (window and getattr(text, "use_sliding_window", True))


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The key and value tensors of each layer, ``[batch, heads, positions, head_dim]``."""
    return [(entry[0], entry[1]) for entry in cache]


def _fit(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` (``[..., positions, head_dim]``) padded with zeros on the left, or cut on the
    left, to ``width`` positions. Only padding is ever cut: every row's real positions are its
    last ones, and ``width`` is at least the longest row."""
    import torch

    have = tensor.shape[-2]
    if have == width:
        return tensor
    if have > width:
        return tensor[..., have - width :, :]
    return torch.nn.functional.pad(tensor, (0, 0, width - have, 0))
