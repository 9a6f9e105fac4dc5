"""Configuration of the Wan2.1 3D causal VAE (``WanVAE_`` in Wan / Self-Forcing ``wan/modules/vae.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["LATENT_MEAN", "LATENT_STD", "WanVAEConfig"]

# Per-channel latent statistics of the Wan2.1 VAE (``WanVAEWrapper.mean`` / ``.std``); the DiT works in
# the normalised space ``(mu - mean) / std``.
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

_PRECISIONS = (None, "default", "high", "highest", "bfloat16", "tensorfloat32", "float32")


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture and numerics of the Wan2.1 VAE.

    Architecture fields keep the original spelling (``temperal_downsample``) so the original cfg dict
    can be passed to :meth:`from_dict`. The decoder's temporal upsampling is the reverse of
    ``temperal_downsample``.

    Numerics: ``param_dtype`` is the storage dtype of the parameters, ``dtype`` the compute dtype
    (activations, feature cache, decoded pixels). ``precision`` is passed to every convolution and
    attention matmul; the default ``"highest"`` keeps float32 exact on GPUs/TPUs (no TF32 / bf16
    passes), use ``None`` for the backend default.
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32
    precision: str | None = "highest"

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latent_mean", "latent_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temperal_downsample", tuple(bool(b) for b in self.temperal_downsample))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.dim <= 0 or self.z_dim <= 0 or self.num_res_blocks <= 0:
            raise ValueError(f"dim, z_dim and num_res_blocks must be positive: {self}")
        if not self.dim_mult or any(m <= 0 for m in self.dim_mult):
            raise ValueError(f"dim_mult must be non-empty positive ints, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries (one per "
                             f"downsampling stage), got {self.temperal_downsample}")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean/latent_std need z_dim={self.z_dim} entries, got "
                             f"{len(self.latent_mean)} and {len(self.latent_std)}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        if len(self.dim_mult) > 4:
            # Decoder3d halves the input width of stages 1, 2 and 3 only (``if i == 1 or i == 2 or i == 3``),
            # so a fifth stage is built for C channels but receives the C // 2 of the Resample before it.
            raise ValueError(f"dim_mult={self.dim_mult}: the original Decoder3d supports at most 4 stages (it "
                             "halves the input width of stages 1-3 only, so stage 4 would get half its channels)")
        for i, width in enumerate(self.decoder_widths[1:-1]):
            # Every decoder stage but the last ends in a Resample whose conv maps C -> C // 2 (floor, as the
            # original ``nn.Conv2d(dim, dim // 2, ...)``); odd widths are fine, only an empty output is not.
            if width // 2 == 0:
                raise ValueError(f"decoder stage {i} has {width} channel(s): its upsampling conv would output "
                                 f"{width} // 2 = 0 channels (dim={self.dim}, dim_mult={self.dim_mult})")

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        """The original ``Decoder3d`` ``dims``: the middle width, then each stage's output width
        (``dim * m`` over ``[dim_mult[-1]] + dim_mult[::-1]``)."""
        return tuple(self.dim * m for m in (self.dim_mult[-1], *self.dim_mult[::-1]))

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        """Per decoder stage: does its Resample double time (``upsample3d``)?"""
        return self.temperal_downsample[::-1]

    @property
    def time_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def space_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def latent_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` as float32 numpy arrays of shape ``(z_dim,)``."""
        return np.asarray(self.latent_mean, np.float32), np.asarray(self.latent_std, np.float32)

    def replace(self, **changes) -> WanVAEConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **overrides) -> WanVAEConfig:
        """The golden-fixture model (``tests/fixtures/wan_vae_tiny``): the real layout with ``dim=4``."""
        return cls(dim=4, **overrides)

    @classmethod
    def wan21(cls, **overrides) -> WanVAEConfig:
        """The real ``Wan2.1_VAE.pth`` model (``_video_vae`` with ``z_dim=16``): 126.9M parameters."""
        return cls(**overrides)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], **overrides) -> WanVAEConfig:
        """Build from an original-style cfg dict (``dim, z_dim, dim_mult, ...``; ``dropout`` must be 0)."""
        cfg = dict(cfg)
        dropout = cfg.pop("dropout", 0.0)
        if dropout:
            raise ValueError(f"dropout={dropout}: this port is inference-only and needs dropout 0")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown WanVAEConfig fields {unknown}")
        cfg.update(overrides)
        return cls(**cfg)
