"""Calibration batches from texts: tokenized with a Hugging Face ``tokenizer.json``.

:func:`text_batches` yields int64 ``input_ids``, ``attention_mask`` (and ``token_type_ids``)
of shape ``[batch, length]``; ``compress calib text`` writes them as ``.npz`` files. The
``tokenizers`` package is needed (the ``hf`` extra) and imported only when used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.config import StageConfig, option
from compress.errors import CalibrationError, ConfigError, MissingDependencyError

#: Largest ``TextOptions.max_length`` (tokens): a bound on what one batch allocates.
MAX_TEXT_LENGTH = 1 << 16


@dataclass(frozen=True, kw_only=True)
class TextOptions(StageConfig):
    """Tokenization of calibration texts; the fields are the flags of ``compress calib text``.

    Attributes:
        max_length: tokens per text at most (special tokens included); longer texts are truncated.
        batch_size: texts per batch (the last batch may be smaller).
        pad_to_max: pad every batch to ``max_length`` instead of to its longest text.
        token_type_ids: also write ``token_type_ids`` (BERT-style models take it). It has no
            generated flag: ``compress calib text`` turns it off with ``--no-token-type-ids``.

    Raises:
        ConfigError: a value out of range, named by its flag (``--max-length``, ``--batch-size``).
    """

    max_length: int = option(128, minimum=2, metavar="N",
                             help="truncate texts to N tokens, special tokens included (default: 128)")
    batch_size: int = option(8, minimum=1, metavar="N", help="texts per file (default: 8)")
    pad_to_max: bool = option(False, help="pad every batch to --max-length (default: to the longest text of the batch)")
    token_type_ids: bool = option(True, flag="", help="write token_type_ids (BERT-style models take it)")

    def __post_init__(self) -> None:
        if not 2 <= self.max_length <= MAX_TEXT_LENGTH:
            raise ConfigError(f"--max-length must be between 2 and {MAX_TEXT_LENGTH} tokens, got {self.max_length}",
                              hint="e.g. --max-length 128 (special tokens included)")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be a positive number of samples, got {self.batch_size}",
                              hint="e.g. --batch-size 8")


def split_texts(text: str) -> list[str]:
    """One calibration text per non-empty line of ``text`` (lines are stripped)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a folder holding one.

    Raises:
        MissingDependencyError: the ``tokenizers`` package is not installed.
        ConfigError: no tokenizer.json there, or it cannot be parsed.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise MissingDependencyError("tokenizers", purpose="'compress calib text'", extra="hf") from None
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"tokenizer not found: {file}",
                          hint="pass --tokenizer a tokenizer.json file or a folder holding one (a Hugging Face model folder)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a plain Exception for bad JSON
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{file} is not a valid tokenizer.json: {first}",
                          hint="pass the tokenizer.json saved by a Hugging Face fast tokenizer") from None


def _pad_settings(tok: Any) -> tuple[int, str, int]:
    current = tok.padding
    if current:
        return int(current["pad_id"]), str(current["pad_token"]), int(current["pad_type_id"])
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        tid = tok.token_to_id(token)
        if tid is not None:
            return int(tid), token, 0
    return 0, "[PAD]", 0


def text_batches(texts: Sequence[str], *, tokenizer: str | os.PathLike[str],
                 options: TextOptions | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Tokenize ``texts`` into batches of ``input_ids``, ``attention_mask`` (, ``token_type_ids``).

    Texts are truncated to ``max_length`` tokens (special tokens included) and padded on the
    right with the tokenizer's pad token to the longest text of the batch, or to
    ``max_length`` with ``pad_to_max``. All arrays are int64 ``[batch, length]``. The
    tokenizer is loaded (and errors raised) before the first batch is asked for.

    Raises:
        CalibrationError: ``texts`` is empty.
        MissingDependencyError, ConfigError: see :func:`load_tokenizer`.
    """
    opts = options or TextOptions()
    if not texts:
        raise CalibrationError("no texts to tokenize", hint="give one text per non-empty line")
    tok = load_tokenizer(tokenizer)
    pad_id, pad_token, pad_type_id = _pad_settings(tok)
    tok.enable_truncation(max_length=opts.max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token, pad_type_id=pad_type_id,
                       length=opts.max_length if opts.pad_to_max else None)
    texts = list(texts)

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(texts), opts.batch_size):
            enc = tok.encode_batch(texts[start : start + opts.batch_size])
            batch = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                     "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
            if opts.token_type_ids:
                batch["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
            yield batch

    return generate()
