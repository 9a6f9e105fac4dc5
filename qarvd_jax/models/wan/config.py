"""Typed configuration of the Self-Forcing causal Wan2.1 DiT (CausalWanModel)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["WanDiTConfig", "PRESETS", "BUILTIN_WEIGHT_PRESETS", "check_preset"]

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class WanDiTConfig:
    """Architecture, geometry and dtype policy of a CausalWanModel.

    Architecture fields mirror the PyTorch constructor (``dim``, ``ffn_dim``, ...). The rest:

    * ``num_frame_per_block``: latent frames per autoregressive chunk (block-causal mask unit).
    * ``local_attn_size``: attention window in latent frames (-1 = global); ``sink_size``: frames
      kept for ever at the start of a rolling KV cache.
    * ``param_dtype`` / ``dtype``: storage and compute dtypes. Higher-precision islands (sinusoid,
      RoPE, norm statistics, softmax, flow -> x0) always run in float32.
    * ``matmul_precision``: ``jax.lax.Precision`` name for dense layers and attention ("default",
      "high", "highest"); "highest" gives float32 parity on TPU/GPU.
    * ``attention``: name of the attention implementation (see ``qarvd_jax.models.wan.attention``).
    """

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    rope_max_positions: int = 1024
    num_frame_per_block: int = 3
    local_attn_size: int = -1
    sink_size: int = 0
    param_dtype: str = "float32"
    dtype: str = "float32"
    matmul_precision: str = "default"
    attention: str = "reference"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        problems = []
        if self.dim % self.num_heads:
            problems.append(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        elif (self.dim // self.num_heads) % 2:
            problems.append(f"head_dim={self.dim // self.num_heads} must be even for RoPE")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size={self.patch_size} must be three positive ints (t, h, w)")
        if self.freq_dim % 2:
            problems.append(f"freq_dim={self.freq_dim} must be even")
        if self.num_frame_per_block < 1:
            problems.append(f"num_frame_per_block={self.num_frame_per_block} must be >= 1")
        if self.local_attn_size != -1 and self.local_attn_size < 1:
            problems.append(f"local_attn_size={self.local_attn_size} must be -1 (global) or >= 1")
        if self.sink_size < 0 or (self.local_attn_size != -1 and self.sink_size >= self.local_attn_size):
            problems.append(f"sink_size={self.sink_size} must be >= 0 and < local_attn_size={self.local_attn_size}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {_DTYPES}")
        if self.matmul_precision not in ("default", "high", "highest"):
            problems.append(f"matmul_precision={self.matmul_precision!r} is not one of default/high/highest")
        if problems:
            raise ValueError("invalid WanDiTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_features(self) -> int:
        """Features per token going into / out of the patch embedding and head."""
        return math.prod(self.patch_size)

    def rope_split(self) -> tuple[int, int, int]:
        """Complex pairs per axis (t, h, w): c - 2*(c//3), c//3, c//3 with c = head_dim/2."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)

    def frame_seq_length(self, latent_height: int, latent_width: int) -> int:
        """Tokens per latent frame for a latent of the given spatial size."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ValueError(f"latent size {latent_height}x{latent_width} is not a multiple of the patch size "
                             f"{ph}x{pw}")
        return (latent_height // ph) * (latent_width // pw)

    def replace(self, **changes: Any) -> "WanDiTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanDiTConfig":
        """Build from a dict; unknown keys are an error (naming them), so typos never pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown WanDiTConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_fixture_json(cls, cfg: dict[str, Any], **overrides: Any) -> "WanDiTConfig":
        """Build from a golden-fixture ``config.json`` (its ``model`` and ``video`` sections)."""
        m = cfg["model"]
        v = cfg.get("video", {})
        kwargs = dict(
            dim=m["dim"], ffn_dim=m["ffn_dim"], num_heads=m["num_heads"], num_layers=m["num_layers"],
            in_dim=m["in_dim"], out_dim=m["out_dim"], text_dim=m["text_dim"], text_len=m["text_len"],
            freq_dim=m["freq_dim"], patch_size=tuple(m["patch_size"]), eps=m["eps"],
            qk_norm=m.get("qk_norm", True), cross_attn_norm=m.get("cross_attn_norm", True),
            rope_theta=m.get("rope_theta", 10000.0), rope_max_positions=m.get("rope_max_positions", 1024),
            num_frame_per_block=v.get("num_frame_per_block", 3),
            local_attn_size=m.get("local_attn_size", -1), sink_size=m.get("sink_size", 0))
        if "head_dim" in m and m["dim"] // m["num_heads"] != m["head_dim"]:
            raise ValueError(f"fixture config: head_dim {m['head_dim']} != dim/num_heads")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def selfforcing_1_3b(cls, **overrides: Any) -> "WanDiTConfig":
        """The real Self-Forcing Wan2.1-T2V-1.3B backbone (bf16 compute, as the original runs).

        Attention defaults to ``blockwise`` (online softmax over key blocks): the reference would
        materialise 7.4 GB of logits per layer for a 4680-token chunk against a 32760-token cache."""
        base = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_dim=4096, text_len=512,
                    param_dtype="bfloat16", dtype="bfloat16", attention="blockwise")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides: Any) -> "WanDiTConfig":
        """The ``selfforcing_tiny`` golden-fixture model (float32)."""
        base = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16)
        base.update(overrides)
        return cls(**base)


def _testbed(**overrides: Any) -> WanDiTConfig:
    """The trained testbed DiT (:mod:`qarvd_jax.testbed`: dim 128, 4 blocks, weights in the package)."""
    from qarvd_jax.testbed.config import dit_config

    return dit_config(**overrides)


PRESETS = {
    "selfforcing_1_3b": WanDiTConfig.selfforcing_1_3b,
    "1.3b": WanDiTConfig.selfforcing_1_3b,
    "tiny": WanDiTConfig.tiny,
    "testbed": _testbed,
}
# Presets whose weights ship with the package (they run without --checkpoint); the others need one.
# ``tiny`` is random (seeded); ``testbed`` is trained (scripts/train_testbed.py).
BUILTIN_WEIGHT_PRESETS = ("tiny", "testbed")


def check_preset(preset: str | None, has_checkpoint: bool) -> None:
    """A clear error for an unknown ``--preset`` (listing the known ones) and for a preset without built-in
    weights given without ``--checkpoint``; ``None`` is the default (built-in tiny, or 1.3B with a checkpoint)."""
    if preset is None:
        return
    if preset not in PRESETS:
        raise ValueError(f"unknown --preset {preset!r}; known presets: {', '.join(sorted(PRESETS))} (with built-in "
                         f"weights: {', '.join(BUILTIN_WEIGHT_PRESETS)})")
    if not has_checkpoint and preset not in BUILTIN_WEIGHT_PRESETS:
        raise ValueError(f"--preset {preset} has no built-in weights: pass its --checkpoint (presets that run "
                         f"without one: {', '.join(BUILTIN_WEIGHT_PRESETS)})")
