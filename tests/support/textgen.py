"""A tiny causal language model for tests, built locally in a couple of seconds.

Nothing comes from a model hub: a byte-level BPE tokenizer is trained on the corpus below with
the ``tokenizers`` library, and a two-layer GPT-2 is fitted to the same corpus for a few dozen
steps from a fixed seed. Greedy generation from a corpus prefix then continues that sentence,
so tests can check real, deterministic output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

__all__ = ["CORPUS", "EOS", "build_tiny_model", "write_text_model"]

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"

# Non-ASCII words are here so the byte-level vocabulary has characters spread over several
# tokens: the incremental decoder must never emit half of one.
CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "the quick brown fox jumps over the lazy dog again.",
    "a stitch in time saves nine.",
    "all that glitters is not gold.",
    "the early bird catches the worm.",
    "an apple a day keeps the doctor away.",
    "the café on the corner serves crème brûlée.",
    "a naïve coöperative façade in zürich.",
    "smile 🙂 and the world smiles with you 🌍.",
    "numbers one two three four five six seven eight nine ten.",
]

_SEED = 1234
_TRAIN_STEPS = 60


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` (what GPT-2 uses, much smaller)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Through Any: this constructor is typed in some transformers releases and not in others.
    fast: Any = PreTrainedTokenizerFast
    wrapped: PreTrainedTokenizerFast = fast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    return wrapped


def build_tiny_model(folder: Path) -> Path:
    """Save a tokenizer and a tiny trained GPT-2 into ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    assert isinstance(eos_id, int)
    assert isinstance(pad_id, int)

    # Fork the RNG so building the model leaves the caller's global torch seed alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        config = GPT2Config(
            n_layer=2,
            n_head=2,
            n_embd=32,
            n_positions=128,
            vocab_size=len(tokenizer),
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
        )
        model: Any = GPT2LMHeadModel(config)  # Any: its methods' typing varies by release
        rows = [[*tokenizer.encode(line), eos_id] for line in CORPUS]
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])
        mask = (ids != pad_id).long()
        labels = ids.masked_fill(mask == 0, -100)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
        model.train()
        for _ in range(_TRAIN_STEPS):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text_model(
    root: Path, name: str, source: Path | None = None, generation: str = ""
) -> Path:
    """``root/name/model.toml`` (transformers, text-generation) and ``root/name/1/``.

    The version folder is a copy of ``source`` (an already built model) when given, else a
    freshly built tiny model. ``generation`` is extra TOML lines for the ``[generation]`` table.
    Returns the model folder ``root/name``.
    """
    import shutil

    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(
        "\n".join(
            [
                'runtime = "transformers"',
                'task = "text-generation"',
                'description = "A tiny GPT-2 for tests"',
                "[input]",
                'type = "text"',
                "max_chars = 512",
                "[generation]",
                'device = "cpu"',
                generation,
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    if source is not None:
        shutil.copytree(source, folder / "1")
    else:
        build_tiny_model(folder / "1")
    return folder
