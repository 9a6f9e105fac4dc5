"""Configuration of the umT5 text encoder (Wan2.1 / Self-Forcing ``wan/modules/t5.py``, encoder only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["UMT5Config", "PAD_ID", "EOS_ID", "UNK_ID"]

# umT5 SentencePiece special ids (there is no BOS).
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2


def _as_dtype(value: Any, field: str) -> np.dtype:
    try:
        return np.dtype(jnp.dtype(value))
    except TypeError as e:
        raise ValueError(f"UMT5Config.{field}: not a dtype: {value!r}") from e


@dataclass(frozen=True)
class UMT5Config:
    """Shape and precision of a umT5 encoder.

    Attributes:
      vocab_size: rows of the token embedding.
      dim: model width D.
      dim_attn: width of q/k/v (``num_heads * head_dim``); 4096 for umT5-XXL.
      dim_ffn: hidden width of the gated-GELU feed-forward.
      num_heads: attention heads (head_dim = dim_attn // num_heads).
      num_layers: encoder blocks.
      num_buckets: relative-position buckets (half per direction, bidirectional).
      max_distance: relative distance at which the log buckets saturate (128 in the original).
      shared_pos: ``False`` (umT5): every block owns its bias table; ``True`` (classic T5): one table.
      text_len: padded prompt length (512 in Wan2.1).
      eps: RMS-norm epsilon.
      param_dtype: storage dtype of the parameters (bf16 to keep the 11.4 GB checkpoint as is).
      compute_dtype: activation dtype. RMS-norm statistics and the softmax always run in float32,
        as in the original. Self-Forcing's inference scripts cast the encoder to bfloat16, so
        ``bfloat16`` matches them (the ``umt5_xxl`` preset); ``float32`` compute with ``bfloat16``
        params reproduces the float32 ``WanTextEncoder`` (and the golden fixture) exactly.
      precision: ``jax.lax.Precision`` name for matmuls (``None`` = backend default; use
        ``'highest'`` for float32 parity on GPUs/TPUs, whose default may use reduced precision).
    """

    vocab_size: int
    dim: int
    dim_attn: int
    dim_ffn: int
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    shared_pos: bool = False
    text_len: int = 512
    eps: float = 1e-6
    param_dtype: Any = np.float32
    compute_dtype: Any = np.float32
    precision: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype, "param_dtype"))
        object.__setattr__(self, "compute_dtype", _as_dtype(self.compute_dtype, "compute_dtype"))
        for name in ("vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "num_layers", "num_buckets",
                     "max_distance", "text_len"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"UMT5Config.{name} must be a positive int, got {v!r}")
        if self.dim_attn % self.num_heads:
            raise ValueError(f"UMT5Config: dim_attn={self.dim_attn} is not divisible by num_heads={self.num_heads}")
        # Bidirectional buckets: num_buckets // 2 per sign (an odd count leaves the last row unused, as in the
        # original), of which max_exact = num_buckets // 4 are exact. The original's log-bucket formula divides by
        # max_exact and by log(max_distance / max_exact), so both must be positive.
        if self.num_buckets < 4:
            raise ValueError(f"UMT5Config: num_buckets={self.num_buckets} must be at least 4 (the original's "
                             "bidirectional log buckets divide by num_buckets // 4)")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"UMT5Config: max_distance={self.max_distance} must exceed num_buckets // 4 = "
                             f"{self.num_buckets // 4} (the original divides by log(max_distance / that))")
        if self.precision is not None and self.precision not in ("default", "high", "highest"):
            raise ValueError(f"UMT5Config.precision must be None, 'default', 'high' or 'highest', got {self.precision!r}")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def replace(self, **changes: Any) -> UMT5Config:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides: Any) -> UMT5Config:
        """The ``umt5_tiny`` golden fixture: vocab 512, D 64, 4 heads, 3 layers, FFN 160."""
        cfg = dict(vocab_size=512, dim=64, dim_attn=64, dim_ffn=160, num_heads=4, num_layers=3)
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def umt5_xxl(cls, **overrides: Any) -> UMT5Config:
        """The real umT5-XXL encoder of Wan2.1 (5,680,910,336 params; bf16 params by default)."""
        cfg = dict(vocab_size=256384, dim=4096, dim_attn=4096, dim_ffn=10240, num_heads=64, num_layers=24,
                   param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
        cfg.update(overrides)
        return cls(**cfg)

    @classmethod
    def from_original(cls, cfg: Mapping[str, Any], **overrides: Any) -> UMT5Config:
        """Build from the original ``umt5_xxl``-style kwargs (``encoder_layers``, ``vocab_size``, ...).

        ``decoder_layers`` and ``dropout`` are ignored (encoder only, eval mode).
        """
        known = {"vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "encoder_layers", "decoder_layers",
                 "num_buckets", "shared_pos", "dropout"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"UMT5Config.from_original: unknown keys {unknown}")
        missing = sorted({"vocab_size", "dim", "dim_attn", "dim_ffn", "num_heads", "encoder_layers"} - set(cfg))
        if missing:
            raise ValueError(f"UMT5Config.from_original: missing keys {missing}")
        kw = dict(vocab_size=int(cfg["vocab_size"]), dim=int(cfg["dim"]), dim_attn=int(cfg["dim_attn"]),
                  dim_ffn=int(cfg["dim_ffn"]), num_heads=int(cfg["num_heads"]),
                  num_layers=int(cfg["encoder_layers"]), num_buckets=int(cfg.get("num_buckets", 32)),
                  shared_pos=bool(cfg.get("shared_pos", False)))
        kw.update(overrides)
        return cls(**kw)

    def param_count(self) -> int:
        """Number of encoder parameters (174,912 for ``tiny()``, 5,680,910,336 for ``umt5_xxl()``)."""
        per_block = 2 * self.dim + 4 * self.dim * self.dim_attn + 3 * self.dim * self.dim_ffn
        pos = self.num_buckets * self.num_heads
        n = self.vocab_size * self.dim + self.num_layers * per_block + self.dim
        return n + (pos if self.shared_pos else self.num_layers * pos)
