"""Wan2.1 3D causal VAE (encoder + decoder with the causal feature cache) in Flax NNX."""

from qarvd_jax.models.wan_vae.config import LATENT_MEAN, LATENT_STD, WanVAEConfig
from qarvd_jax.models.wan_vae.model import (
    Decoder3d,
    Encoder3d,
    FeatureCache,
    WanVAE,
    decode_chunk_jit,
    decode_chunks,
)
from qarvd_jax.models.wan_vae.params import load_wan_vae, to_torch_state_dict, wan_vae_from_state_dict

__all__ = [
    "LATENT_MEAN",
    "LATENT_STD",
    "Decoder3d",
    "Encoder3d",
    "FeatureCache",
    "WanVAE",
    "WanVAEConfig",
    "decode_chunk_jit",
    "decode_chunks",
    "load_wan_vae",
    "to_torch_state_dict",
    "wan_vae_from_state_dict",
]
