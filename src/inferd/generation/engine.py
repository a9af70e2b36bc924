"""The torch side of continuous batching: one batch of sequences with one key/value cache.

Sequences of different lengths share one cache, aligned on the right and padded on the left:
row ``i`` holds its ``n_i`` real positions in the last ``n_i`` columns of the cache. A decode
step feeds each row's last token with

* an attention mask that is 0 over each row's padding, 1 over its real positions and the new
  token, so padding is never attended to;
* position ids ``n_i`` per row (not the padded width), so each row sees the positions it would
  see alone.

The prompts of the sequences that join at one step are run together in one forward pass, padded
on the left the same way, with positions counted from each prompt's first token (a prompt that
joins alone is run as it is); then their cache joins the batch's, both padded on the left to
the wider of the two. When sequences leave, their rows are dropped and columns
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
from inferd.models.sampling import output_cache, pick_token
from inferd.models.textgen import TextGenerationModel

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


@dataclass(slots=True, eq=False)
class _Block:
    """Rows that share one cache, right-aligned in ``width`` positions: the batch, or the
    sequences prefilled together at one step until they join it."""

    rows: list[_Row]
    cache: Any
    width: int


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
        self._last_logits = model.last_logits
        self.max_sequences: int | None = None if self._batchable() else 1
        self._batch = _Block([], None, 0)
        self._staged: list[_Block] = []
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
        return len(self._batch.rows)

    @property
    def width(self) -> int:
        """Positions in the batch's cache: those of its longest sequence."""
        return self._batch.width

    def prefill(self, seqs: list[GenerationStream]) -> list[int]:
        """One forward pass over the prompts of ``seqs``, left-padded to the longest, with
        a mask over the padding and positions counted from each prompt's first token; a
        prompt alone is run as it is. They join the batch at the next :meth:`commit`."""
        import torch

        lengths = [len(seq.request.prompt_ids) for seq in seqs]
        width = max(lengths)
        rows = [seq.request.prompt_ids for seq in seqs]
        ids = torch.tensor(
            [[0] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device
        )
        padding: dict[str, Any] = {}
        if len(seqs) > 1:
            mask = torch.tensor(
                [[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long, device=ids.device
            )
            padding = {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        with torch.inference_mode():
            out = self.net(input_ids=ids, use_cache=True, **padding, **self._last_logits)
            logits = out.logits[:, -1, :]
            tokens: list[int] = logits.argmax(dim=-1).tolist()
            generators = [_generator(seq, self.device) for seq in seqs]
            for i, (seq, generator) in enumerate(zip(seqs, generators, strict=True)):
                if generator is not None:
                    tokens[i] = pick_token(logits[i], seq.request.settings, generator)
        self.forwards += 1
        block = [
            _Row(seq, generator, n, token)
            for seq, generator, n, token in zip(seqs, generators, lengths, tokens, strict=True)
        ]
        self._staged.append(_Block(block, output_cache(out), width))
        return tokens

    def decode(self) -> list[tuple[GenerationStream, int]]:
        import torch

        rows, width = self._batch.rows, self._batch.width
        if not rows:
            return []
        tokens = torch.tensor([[r.pending] for r in rows], dtype=torch.long, device=self.device)
        padding: dict[str, Any] = {}
        if any(r.length != width for r in rows):
            lengths = torch.tensor([r.length for r in rows], dtype=torch.long, device=self.device)
            columns = torch.arange(width + 1, device=self.device)
            mask = (columns[None, :] >= (width - lengths)[:, None]).long()
            padding = {"attention_mask": mask, "position_ids": lengths[:, None]}
        # Without padding (a batch of one, or rows of one length) the model's own causal mask
        # and positions are the same, and cheaper.
        with torch.inference_mode():
            out = self.net(
                input_ids=tokens,
                use_cache=True,
                **padding,
                **{self._cache_argument: self._batch.cache},
            )
            logits = out.logits[:, -1, :]
            best = logits.argmax(dim=-1).tolist()
            for i, row in enumerate(rows):
                if row.generator is not None:
                    best[i] = pick_token(logits[i], row.seq.request.settings, row.generator)
        self.forwards += 1
        self._batch.cache = output_cache(out)
        self._batch.width = width + 1
        for row, token in zip(rows, best, strict=True):
            row.length += 1
            row.pending = token
        return [(row.seq, row.pending) for row in rows]

    def commit(self, leaving: set[GenerationStream]) -> None:
        import torch

        blocks = [b for b in (self._batch, *self._staged) if b.rows]
        self._staged = []
        kept = [[i for i, r in enumerate(b.rows) if r.seq not in leaving] for b in blocks]
        parts = [(b, k) for b, k in zip(blocks, kept, strict=True) if k]
        if not parts:
            self.reset()
            return
        if len(parts) == 1 and len(parts[0][1]) == len(parts[0][0].rows):
            self._batch = parts[0][0]  # one block, whole: its cache as it is
            return
        rows = [b.rows[i] for b, k in parts for i in k]
        width = max(r.length for r in rows)
        pieces: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        for block, keep in parts:
            index = None
            if len(keep) < len(block.rows):
                index = torch.tensor(keep, device=self.device)
            layers = []
            for k, v in _layers(block.cache):
                if index is not None:
                    k, v = k.index_select(0, index), v.index_select(0, index)
                layers.append((_fit(k, width), _fit(v, width)))
            pieces.append(layers)
        merged = [
            (torch.cat([p[i][0] for p in pieces]), torch.cat([p[i][1] for p in pieces]))
            for i in range(len(pieces[0]))
        ]
        self._batch = _Block(rows, self._make_cache(merged), width)

    def reset(self) -> None:
        self._batch, self._staged = _Block([], None, 0), []

    def _make_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        cls = self._dynamic_cache
        legacy = getattr(cls, "from_legacy_cache", None)  # transformers 4: from tuples
        if legacy is not None:
            return legacy(tuple(layers))
        return cls(layers)


def _generator(seq: GenerationStream, device: torch.device) -> torch.Generator | None:
    """The sequence's own random generator (None when it is greedy): seeded as a sequence run
    alone is, so the same seed gives the same draws, batched or not."""
    import torch

    settings = seq.request.settings
    if settings.greedy:
        return None
    generator = torch.Generator(device=device)
    if settings.seed is not None:
        generator.manual_seed(settings.seed)
    else:
        generator.seed()
    return generator


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
