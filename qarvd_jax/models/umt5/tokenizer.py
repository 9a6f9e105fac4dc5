"""Prompt cleaning and tokenization for the umT5 encoder (Wan2.1 ``wan/modules/tokenizers.py``).

Wan calls the HF umT5 tokenizer with ``padding='max_length', truncation=True, max_length=512,
add_special_tokens=True`` after the ``'whitespace'`` clean. This module reproduces that with the
``tokenizers`` library and a local ``tokenizer.json`` (never downloaded here):

* clean: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace runs to one space, strip;
* encode without special tokens, keep the first ``text_len - 1`` tokens, append ``</s>`` (what the
  T5 post-processor ``$A </s>`` plus HF truncation give), pad with ``<pad>`` to ``text_len``;
* ``mask`` is 1 for real tokens including ``</s>``.

:class:`ToyTokenizer` is a file-free stand-in with the same API and special ids for tiny models.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import string
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from qarvd_jax.models.umt5.config import EOS_ID, PAD_ID

__all__ = [
    "CLEAN_MODES",
    "PromptTruncatedWarning",
    "Tokenized",
    "basic_clean",
    "whitespace_clean",
    "canonicalize",
    "clean_prompt",
    "UMT5Tokenizer",
    "ToyTokenizer",
]

CLEAN_MODES = (None, "whitespace", "lower", "canonicalize")

# The original uses the third-party ``regex`` module, whose ``\s`` is the Unicode White_Space
# property. Python's ``re`` ``\s`` also matches U+001C..U+001F, so spell the class out.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


class PromptTruncatedWarning(UserWarning):
    """A prompt had more than ``text_len`` tokens (``</s>`` included) and was cut."""


class Tokenized(NamedTuple):
    """Tokenizer output: ``ids`` and ``mask``, both ``[B, text_len]`` int32 (unpacks as a pair)."""

    ids: np.ndarray
    mask: np.ndarray


def basic_clean(text: str) -> str:
    """``ftfy.fix_text``, then ``html.unescape`` twice (double-escaped entities), then strip."""
    import ftfy

    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    """Collapse every whitespace run to a single space and strip."""
    return _WHITESPACE_RUN.sub(" ", text).strip()


def canonicalize(text: str) -> str:
    """The original's ``'canonicalize'`` mode (unused by Wan): ``_`` -> space, drop ASCII punctuation,
    lowercase, collapse whitespace."""
    text = text.replace("_", " ").translate(_PUNCT_TABLE).lower()
    return _WHITESPACE_RUN.sub(" ", text).strip()


def clean_prompt(text: str, mode: str | None = "whitespace") -> str:
    """Clean one prompt like ``HuggingfaceTokenizer._clean``; Wan uses ``'whitespace'``.

    No lowercasing and no punctuation removal in ``'whitespace'`` mode. ``None`` returns the text as is.
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    if mode is None:
        return text
    if mode == "whitespace":
        return whitespace_clean(basic_clean(text))
    if mode == "lower":
        return whitespace_clean(basic_clean(text)).lower()
    if mode == "canonicalize":
        return canonicalize(basic_clean(text))
    raise ValueError(f"unknown clean mode {mode!r}; expected one of {CLEAN_MODES}")


class _PromptTokenizer:
    """Shared cleaning / truncation / padding; subclasses implement :meth:`_encode_raw`."""

    def __init__(self, text_len: int, clean: str | None, pad_id: int, eos_id: int):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {CLEAN_MODES}")
        self.text_len = int(text_len)
        self.clean = clean
        self.pad_id = int(pad_id)
        self.eos_id = int(eos_id)

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each cleaned text, without special tokens."""
        raise NotImplementedError

    def clean_text(self, text: str) -> str:
        return clean_prompt(text, self.clean)

    def __call__(self, prompts: str | Sequence[str]) -> Tokenized:
        """Tokenize ``prompts`` (a str or a sequence of str) to ``Tokenized(ids, mask)``, ``[B, text_len]`` int32.

        Warns with :class:`PromptTruncatedWarning`, naming the prompt index and its token count,
        for every prompt longer than ``text_len`` tokens (``</s>`` included).
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be str; prompt {bad[0]} is {type(prompts[bad[0]]).__name__}")
        raw = self._encode_raw([self.clean_text(p) for p in prompts])
        ids = np.full((len(prompts), self.text_len), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(prompts), self.text_len), dtype=np.int32)
        for i, toks in enumerate(raw):
            n = len(toks) + 1
            if n > self.text_len:
                warnings.warn(f"prompt {i} has {n} tokens (with </s>), more than text_len={self.text_len}; "
                              f"truncated to {self.text_len}", PromptTruncatedWarning, stacklevel=2)
                toks = toks[:self.text_len - 1]
                n = self.text_len
            ids[i, :n - 1] = toks
            ids[i, n - 1] = self.eos_id
            mask[i, :n] = 1
        return Tokenized(ids, mask)


class UMT5Tokenizer(_PromptTokenizer):
    """The umT5 tokenizer from a local HF ``tokenizer.json`` (e.g. ``<Wan2.1-T2V-1.3B>/google/umt5-xxl/tokenizer.json``).

    Call with a prompt or a list of prompts -> ``Tokenized(ids, mask)``, both ``[B, text_len]`` int32.
    """

    def __init__(self, tokenizer, *, text_len: int = 512, clean: str | None = "whitespace",
                 pad_token: str = "<pad>", eos_token: str = "</s>"):
        pad_id, eos_id = tokenizer.token_to_id(pad_token), tokenizer.token_to_id(eos_token)
        if pad_id is None or eos_id is None:
            raise ValueError(f"tokenizer has no {pad_token!r} / {eos_token!r} token (ids {pad_id} / {eos_id})")
        if (pad_id, eos_id) != (PAD_ID, EOS_ID):
            warnings.warn(f"tokenizer ids pad={pad_id}, eos={eos_id} differ from umT5's pad={PAD_ID}, eos={EOS_ID}",
                          stacklevel=2)
        super().__init__(text_len, clean, pad_id, eos_id)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | os.PathLike, text_len: int = 512, *, clean: str | None = "whitespace",
                  **kwargs) -> UMT5Tokenizer:
        """Load ``tokenizer.json`` (a file, or a folder holding one). Never downloads anything."""
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer.json not found: {path} (pass a local HF tokenizer.json; "
                                    "for umT5 it sits in <Wan2.1-T2V-1.3B>/google/umt5-xxl/)")
        return cls(Tokenizer.from_file(path), text_len=text_len, clean=clean, **kwargs)

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


class ToyTokenizer(_PromptTokenizer):
    """Deterministic file-free tokenizer for tiny random models (demos and tests only).

    Splits the cleaned text into words and single punctuation marks and maps each piece to
    ``3 + blake2b(piece) mod (vocab_size - 3)``, so ids avoid pad=0, eos=1, unk=2 and the same
    piece always gets the same id. Same call API and output as :class:`UMT5Tokenizer`.
    """

    _PIECES = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int = 512, text_len: int = 512, *, clean: str | None = "whitespace"):
        if vocab_size < 4:
            raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
        super().__init__(text_len, clean, PAD_ID, EOS_ID)
        self.vocab_size = int(vocab_size)

    def _piece_id(self, piece: str) -> int:
        h = int.from_bytes(hashlib.blake2b(piece.encode("utf-8"), digest_size=8).digest(), "little")
        return 3 + h % (self.vocab_size - 3)

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        return [[self._piece_id(p) for p in self._PIECES.findall(t)] for t in texts]
