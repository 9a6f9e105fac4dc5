"""The testbed's architecture, geometry and sampler, and the loader of its shipped weights.

The testbed is a miniature Self-Forcing: a :class:`~qarvd_jax.models.wan.model.CausalWanModel`
(dim 128, 4 blocks), the Wan causal VAE at width 8 and the built-in tiny umT5 (frozen, random), trained
by ``scripts/train_testbed.py`` on :mod:`qarvd_jax.testbed.data`. Its weights ship in
``qarvd_jax/testbed/weights/`` as safetensors in the PyTorch key layouts (``dit``, ``vae``, ``umt5``),
loaded through the converters, with ``testbed.json`` recording the configs, the sampler, the latent
statistics, the recipe and the measured figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from qarvd_jax.models.umt5.config import UMT5Config
from qarvd_jax.models.wan.config import WanDiTConfig
from qarvd_jax.models.wan_vae.config import WanVAEConfig
from qarvd_jax.pipeline.causal_inference import InferenceConfig

__all__ = ["WEIGHTS_DIR", "resolve_weights_dir", "write_weights", "TestbedSpec", "dit_config", "vae_config",
           "umt5_config", "HEIGHT", "WIDTH", "sampling_steps", "default_sampler", "weights_available", "load_spec", "load_models", "held_out_prompts"]

# The shipped weights; ``QARVD_TESTBED_WEIGHTS`` points every command at another folder of the same four files
# (a testbed trained elsewhere with scripts/train_testbed.py --out DIR).
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def resolve_weights_dir() -> str:
    """``$QARVD_TESTBED_WEIGHTS`` if set, else the package's :data:`WEIGHTS_DIR`."""
    return os.environ.get("QARVD_TESTBED_WEIGHTS") or WEIGHTS_DIR
TEXT_LEN = 16
# Pixels per frame. With the VAE's spatial stride 4 the latent is 8 x 8 (16 DiT tokens per latent frame).
HEIGHT = WIDTH = 32


def dit_config(**overrides: Any) -> WanDiTConfig:
    """The testbed DiT: dim 128, 4 heads, 4 blocks, FFN 512, text from the tiny umT5 (64 features)."""
    base = dict(dim=128, ffn_dim=512, num_heads=4, num_layers=4, in_dim=16, out_dim=16, text_dim=64,
                text_len=TEXT_LEN, freq_dim=256)
    base.update(overrides)
    return WanDiTConfig(**base)


def vae_config(latent_mean=(0.0,) * 16, latent_std=(1.0,) * 16, **overrides: Any) -> WanVAEConfig:
    """The Wan causal VAE at width 8 with three stages (``dim_mult`` 1, 2, 4, both downsamplings temporal:
    strides 4 x 4 x 4, 16 latent channels): Wan's own blocks, caches and 1 + 4k frame rule, one spatial
    stage fewer than Wan2.1 (4 x 8 x 8), so that it trains to >= 28 dB on 2 CPU cores (docs/testbed.md)."""
    base = dict(dim=8, z_dim=16, dim_mult=(1, 2, 4), temperal_downsample=(True, True),
                latent_mean=tuple(latent_mean), latent_std=tuple(latent_std))
    base.update(overrides)
    return WanVAEConfig(**base)


def umt5_config() -> UMT5Config:
    """The built-in tiny umT5 (vocab 512, D 64, 3 layers) with the testbed's text length."""
    return UMT5Config.tiny(text_len=TEXT_LEN)


def sampling_steps(n: int) -> tuple[int, ...]:
    """``n`` evenly spaced timesteps ``1000, 1000 - 1000/n, ...`` (warped by the shifted tables)."""
    if n < 1:
        raise ValueError(f"sampling steps must be >= 1, got {n}")
    return tuple(int(round(1000 - i * 1000 / n)) for i in range(n))


def default_sampler(sampler: str = "euler", steps: int = 8, guidance_scale: float = 3.0) -> InferenceConfig:
    """The sampler the testbed is trained for (overridden by the recorded one in ``testbed.json``): the
    Euler sampler of the flow ODE over ``steps`` evenly spaced timesteps, shift 3, with classifier-free
    guidance ``guidance_scale`` (the DiT trains with caption dropout). The testbed DiT is trained by plain
    flow matching (no distillation), so Self-Forcing's few-step sampler, which re-noises each x0
    prediction with a fresh draw, returns the blurred posterior mean (docs/testbed.md)."""
    return InferenceConfig(denoising_step_list=sampling_steps(steps), timestep_shift=3.0, sampler=sampler,
                           guidance_scale=guidance_scale)


@dataclass(frozen=True)
class TestbedSpec:
    """Everything ``testbed.json`` records (the shipped weights' description)."""

    dit: WanDiTConfig
    vae: WanVAEConfig
    sampler: InferenceConfig
    num_frames: int = 21
    height: int = HEIGHT
    width: int = WIDTH
    umt5_seed: int = 0
    info: dict = field(default_factory=dict)  # recipe, data seed, measured figures, reference latents

    def to_json(self) -> dict:
        vae = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.vae).items()
               if k not in ("param_dtype", "dtype", "precision")}
        return {"dit": self.dit.to_dict(), "vae": vae, "sampler": dataclasses.asdict(self.sampler),
                "num_frames": self.num_frames, "height": self.height, "width": self.width,
                "umt5_seed": self.umt5_seed, **self.info}

    @classmethod
    def from_json(cls, d: dict) -> "TestbedSpec":
        d = dict(d)
        vae = d.pop("vae")
        sampler = d.pop("sampler")
        sampler["denoising_step_list"] = tuple(sampler["denoising_step_list"])
        known = {"num_frames", "height", "width", "umt5_seed"}
        return cls(dit=WanDiTConfig.from_dict(d.pop("dit")), vae=vae_config(**vae), sampler=InferenceConfig(**sampler),
                   **{k: d.pop(k) for k in known if k in d}, info=d)


def weights_available(weights_dir: str | None = None) -> bool:
    weights_dir = weights_dir or resolve_weights_dir()
    return all(os.path.isfile(os.path.join(weights_dir, n)) for n in
               ("testbed.json", "dit.safetensors", "vae.safetensors", "umt5.safetensors"))


def load_spec(weights_dir: str | None = None) -> TestbedSpec:
    """The recorded :class:`TestbedSpec`; a clear error when the weights are not there."""
    weights_dir = weights_dir or resolve_weights_dir()
    if not weights_available(weights_dir):
        raise FileNotFoundError(f"the testbed weights are not in {weights_dir} (testbed.json, dit/vae/umt5"
                                ".safetensors): train them with `python scripts/train_testbed.py`")
    with open(os.path.join(weights_dir, "testbed.json")) as fh:
        return TestbedSpec.from_json(json.load(fh))


def load_models(dtype: str = "float32", weights_dir: str | None = None):
    """``(spec, dit, vae, umt5)`` from the shipped safetensors, through the converters."""
    weights_dir = weights_dir or resolve_weights_dir()
    from convert.wan_dit import load_model
    from qarvd_jax.models.umt5 import load_umt5
    from qarvd_jax.models.wan_vae import load_wan_vae

    spec = load_spec(weights_dir)
    dit = load_model(os.path.join(weights_dir, "dit.safetensors"), spec.dit.replace(param_dtype=dtype, dtype=dtype))
    vae = load_wan_vae(os.path.join(weights_dir, "vae.safetensors"), spec.vae, dtype=dtype)
    t5 = load_umt5(os.path.join(weights_dir, "umt5.safetensors"), umt5_config(), dtype="float32")
    return spec, dit, vae, t5


def held_out_prompts(n: int | None = None) -> list[str]:
    """Held-out captions of the grammar (never trained on), in a fixed spread-out order."""
    from qarvd_jax.testbed.data import split_captions

    held = split_captions()[1]
    order = sorted(range(len(held)), key=lambda i: (i * 37) % len(held))
    texts = [held[i].text for i in order]
    return texts if n is None else texts[:n]


def write_weights(out_dir: str, spec: TestbedSpec, dit, vae, t5) -> None:
    """Write the four testbed files (PyTorch-layout safetensors + ``testbed.json``) into ``out_dir``."""
    import hashlib

    from convert.state_dict_io import write_state_dict
    from convert.wan_dit import export_torch
    from qarvd_jax.models import umt5
    from qarvd_jax.models.wan.loading import model_params
    from qarvd_jax.models.wan_vae import to_torch_state_dict

    os.makedirs(out_dir, exist_ok=True)
    export_torch(model_params(dit), dit.config, os.path.join(out_dir, "dit.safetensors"), overwrite=True)
    write_state_dict(to_torch_state_dict(vae), os.path.join(out_dir, "vae.safetensors"), overwrite=True)
    t5_path = write_state_dict(umt5.to_torch_state_dict(t5), os.path.join(out_dir, "umt5.safetensors"), overwrite=True)
    with open(t5_path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    with open(os.path.join(out_dir, "testbed.json"), "w") as fh:
        json.dump({**spec.to_json(), "umt5_sha256": sha}, fh, indent=2)
