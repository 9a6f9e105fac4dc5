"""On-disk cache of prompt embeddings, so the 5.7B umT5 encoder runs once per prompt set.

One ``.npz`` file per prompt, named by ``sha256(json([format, cleaned prompt, text_len, encoder_id,
dtype]))``. The cleaned prompt is what the tokenizer sees, so prompts that differ only in
whitespace or HTML escaping share an entry. ``encoder_id`` must identify everything else that
changes the numbers: the checkpoint, the tokenizer and the compute dtype; see
:func:`encoder_fingerprint`.

Stored content: the ``[text_len, D]`` prompt embedding **without its trailing all-zero rows**
(rows ``>= seq_len`` are exactly zero in ``prompt_embeds``), plus a JSON header that is checked on
read. Re-padding with zeros restores the array bit for bit, whatever it holds. bfloat16 is stored
as its uint16 bit pattern. Files are written to a temporary name in the cache folder and moved into
place with ``os.replace``, so readers never see a partial file; unreadable or mismatching files are
treated as misses (with a warning) and rewritten.

Typical use (the encoder is only built when something is missing)::

    def encode(prompts):
        model = load_umt5(ckpt)                      # 11.4 GB, freed when ``encode`` returns
        return make_prompt_encoder(model, tok)(prompts)
    embeds = encode_with_cache(prompts, encode, "cache/t5", encoder_fingerprint(ckpt, tok_json, extra="bf16"))
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qarvd_jax.models.umt5.tokenizer import clean_prompt

__all__ = ["CACHE_FORMAT", "encoder_fingerprint", "PromptEmbedCache", "encode_with_cache"]

CACHE_FORMAT = "qarvd-umt5-embed-v1"
_BF16 = np.dtype(ml_dtypes.bfloat16)


def encoder_fingerprint(*paths: str | os.PathLike | None, extra: str = "") -> str:
    """Identity string for the cache key: ``abs path|size|mtime_ns`` of each file, plus ``extra``.

    Pass the checkpoint and the tokenizer file, and put anything else that changes the output in
    ``extra`` (compute dtype, config name). Cheap: only ``os.stat`` is called.
    """
    parts = []
    for p in paths:
        if p is None:
            continue
        p = os.path.abspath(os.fspath(p))
        st = os.stat(p)
        parts.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
    parts.append(extra)
    return "::".join(parts)


def _dtype_name(dtype: Any) -> str:
    return np.dtype(jnp.dtype(dtype)).name


class PromptEmbedCache:
    """A folder of cached prompt embeddings for one encoder identity, text length and dtype.

    Args:
      cache_dir: folder (created on first write).
      encoder_id: identity string of the encoder (see :func:`encoder_fingerprint`).
      text_len: padded length L of the embeddings.
      dtype: storage / return dtype (float32, bfloat16, float16).
      clean: cleaning mode applied to prompts before hashing (the tokenizer's mode).
    """

    def __init__(self, cache_dir: str | os.PathLike, encoder_id: str, *, text_len: int = 512,
                 dtype: Any = np.float32, clean: str | None = "whitespace"):
        if not isinstance(encoder_id, str) or not encoder_id:
            raise ValueError("encoder_id must be a non-empty string")
        self.cache_dir = os.fspath(cache_dir)
        self.encoder_id = encoder_id
        self.text_len = int(text_len)
        self.dtype = np.dtype(jnp.dtype(dtype))
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16), _BF16):
            raise ValueError(f"unsupported cache dtype {self.dtype}; use float32, float16 or bfloat16")
        self.clean = clean

    def key(self, prompt: str) -> str:
        """Hex sha256 of the cleaned prompt, text_len, encoder id and dtype."""
        blob = json.dumps([CACHE_FORMAT, clean_prompt(prompt, self.clean), self.text_len, self.encoder_id,
                           self.dtype.name], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, prompt: str) -> str:
        return os.path.join(self.cache_dir, self.key(prompt) + ".npz")

    def _header(self, prompt: str, dim: int) -> dict:
        return {"format": CACHE_FORMAT, "prompt": clean_prompt(prompt, self.clean), "text_len": self.text_len,
                "encoder_id": self.encoder_id, "dtype": self.dtype.name, "dim": int(dim)}

    def get(self, prompt: str) -> np.ndarray | None:
        """The cached ``[text_len, D]`` embedding, or None on a miss (or an unreadable file)."""
        path = self.path(prompt)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                rows = z["embeds"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=2)
            return None
        want = self._header(prompt, header.get("dim", -1))
        if header != want or rows.ndim != 2 or rows.shape[0] > self.text_len or rows.shape[1] != want["dim"]:
            warnings.warn(f"ignoring cache file {path}: header {header} does not match {want}", stacklevel=2)
            return None
        if self.dtype == _BF16:
            rows = rows.view(_BF16)
        out = np.zeros((self.text_len, rows.shape[1]), self.dtype)
        out[:rows.shape[0]] = rows
        return out

    def put(self, prompt: str, embeds: np.ndarray) -> str:
        """Store one ``[text_len, D]`` embedding (cast to the cache dtype) atomically; returns the path."""
        embeds = np.asarray(embeds)
        if embeds.ndim != 2 or embeds.shape[0] != self.text_len:
            raise ValueError(f"embeddings must be [text_len={self.text_len}, D], got {embeds.shape}")
        embeds = embeds.astype(self.dtype, copy=False)
        nonzero = np.flatnonzero(np.any(embeds != 0, axis=1))
        rows = embeds[:(nonzero[-1] + 1 if nonzero.size else 0)]
        if self.dtype == _BF16:
            rows = rows.view(np.uint16)
        header = json.dumps(self._header(prompt, embeds.shape[1]), ensure_ascii=False)
        os.makedirs(self.cache_dir, exist_ok=True)
        final = self.path(prompt)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, embeds=np.ascontiguousarray(rows), header=np.array(header))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return final


def encode_with_cache(prompts: Sequence[str], encode_fn: Callable[[list[str]], Any], cache_dir: str | os.PathLike,
                      encoder_id: str, *, text_len: int = 512, dtype: Any = np.float32,
                      clean: str | None = "whitespace") -> np.ndarray:
    """Prompt embeddings ``[B, text_len, D]`` (``dtype``), encoding only prompts not in the cache.

    ``encode_fn(list_of_prompts) -> [n, text_len, D]`` is called at most once, with the missing
    prompts (one raw prompt per distinct cleaned prompt, in first-seen order; the tokenizer does
    the cleaning), and is not called at all when everything is cached. Its rows are stored, then
    returned from the same values the cache would give back.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of str, not a str")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    cache = PromptEmbedCache(cache_dir, encoder_id, text_len=text_len, dtype=dtype, clean=clean)
    keys = [cache.key(p) for p in prompts]
    found: dict[str, np.ndarray] = {}
    missing: dict[str, str] = {}  # key -> first raw prompt
    for key, prompt in zip(keys, prompts):
        if key in found or key in missing:
            continue
        hit = cache.get(prompt)
        if hit is None:
            missing[key] = prompt
        else:
            found[key] = hit
    if missing:
        todo = list(missing.values())
        out = np.asarray(encode_fn(todo))
        if out.ndim != 3 or out.shape[:2] != (len(todo), text_len):
            raise ValueError(f"encode_fn returned shape {out.shape}, expected [{len(todo)}, {text_len}, D]")
        for (key, prompt), emb in zip(missing.items(), out):
            cache.put(prompt, emb)
            found[key] = emb.astype(cache.dtype, copy=True)
        del out
    dims = {v.shape[1] for v in found.values()}
    if len(dims) != 1:
        raise ValueError(f"cached embeddings have different widths {sorted(dims)}; is encoder_id unique per model?")
    return np.stack([found[k] for k in keys])
