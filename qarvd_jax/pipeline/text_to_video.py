"""Prompts -> mp4 videos: umT5 (once, cached, then freed) -> causal DiT (streaming) -> Wan VAE (streaming).

Output folder layout (read by ``qarvd evaluate`` and VBench's custom-input mode)::

    OUT/videos/<stem>.mp4      RGB uint8, 16 fps, H.264 (written atomically, one by one)
    OUT/latents/<stem>.npz     latents [F, C, h, w] float32, chunk_frames, seed, prompt, settings (JSON)
    OUT/generation.json        settings, seeds, prompts -> stems

``<stem>`` is ``<sanitised prompt>-<sample index>`` (VBench naming). Without checkpoints the built-in
tiny stack runs (random weights, toy tokenizer): the pipeline's CPU demo.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from convert.state_dict_io import atomic_output
from qarvd_jax.models.wan_vae import decode_chunks
from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline, InferenceConfig

__all__ = ["GenerateConfig", "read_prompts", "video_stem", "TextToVideo", "write_video"]

log = logging.getLogger(__name__)
FPS = 16


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of ``qarvd generate``. ``None`` geometry means the model's default (tiny or 1.3B).

    ``num_frames`` counts *latent* frames (21 -> 81 video frames, as Self-Forcing's inference.py);
    ``height``/``width`` are pixels (multiples of 8 x patch = 16).
    """

    seed: int = 0
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    dtype: str | None = None
    checkpoint: str | None = None
    preset: str | None = None
    t5: str | None = None
    tokenizer: str | None = None
    vae: str | None = None
    embed_cache_dir: str | None = None
    skip_existing: bool = False
    sampler: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)

    def __post_init__(self):
        from qarvd_jax.models.wan.config import check_preset

        for flag, value in (("--num-frames", self.num_frames), ("--height", self.height), ("--width", self.width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        check_preset(self.preset, bool(self.checkpoint))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines are skipped. Missing or empty file -> clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        prompts = [line.strip() for line in fh]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (it is empty or only blank lines)")
    return prompts


def video_stem(prompt: str, index: int, max_bytes: int = 180) -> str:
    """``<prompt>-<index>`` with path separators and control characters removed, truncated on a
    UTF-8 character boundary to ``max_bytes`` (file-name limits)."""
    safe = re.sub(r"[\x00-\x1f/\\]", " ", prompt).strip().strip(".") or "prompt"
    raw = safe.encode("utf-8")[:max_bytes]
    return f"{raw.decode('utf-8', errors='ignore').rstrip()}-{index}"


def write_video(path: str, frames: np.ndarray, fps: int = FPS) -> None:
    """Write uint8 frames [T, H, W, 3] as H.264 mp4 atomically (temp file, then rename)."""
    import imageio.v2 as imageio

    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    with atomic_output(path, overwrite=True) as tmp, warnings.catch_warnings():
        # imageio-ffmpeg runs ffmpeg in a subprocess; the fork happens before any JAX work in the child
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        tmp_mp4 = tmp + ".mp4"
        with imageio.get_writer(tmp_mp4, fps=fps, codec="libx264", macro_block_size=1,
                                ffmpeg_log_level="error", output_params=["-pix_fmt", "yuv420p"]) as w:
            for f in frames:
                w.append_data(f)
        os.replace(tmp_mp4, tmp)


def _to_uint8_frames(pixels: jax.Array) -> np.ndarray:
    """VAE pixels (B=1, 3, T, H, W) in ~[-1, 1] -> uint8 [T, H, W, 3]: clamp, [0, 1], x255 truncated
    (as the original's write_video)."""
    x = jnp.clip(pixels[0].astype(jnp.float32), -1.0, 1.0) * 0.5 + 0.5
    return np.asarray((x * 255.0).astype(jnp.uint8)).transpose(1, 2, 3, 0)


class TextToVideo:
    """The whole streaming text-to-video pipeline.

    Args:
      dit: a :class:`CausalWanModel` (possibly quantized).
      vae: a :class:`WanVAE`, or a zero-argument function building it on first use (steps that never
        decode, such as calibration, then skip loading it); ``vae_config`` is then required.
      encode_prompts: ``list[str] -> np.ndarray [n, text_len, text_dim]`` (already cached/freed is fine).
      sampler: scheduler settings.
    """

    def __init__(self, dit, vae, encode_prompts: Callable[[list[str]], np.ndarray],
                 sampler: InferenceConfig | None = None, vae_config=None, model_name: str | None = None):
        self.dit = dit
        self.model_name = model_name  # recorded in generation.json ("testbed": videos get a task score)
        self._vae = vae
        self.vae_config = vae_config if vae_config is not None else vae.config
        self.encode_prompts = encode_prompts
        self.pipeline = CausalInferencePipeline(dit, sampler or InferenceConfig())

    @property
    def vae(self):
        """The VAE, built on first access when a factory was given."""
        if callable(self._vae) and not hasattr(self._vae, "decode_chunk"):
            self._vae = self._vae()
        return self._vae

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.dit.config
        stride = self.vae_config.space_stride
        if height % stride or width % stride:
            raise ValueError(f"video size {height}x{width} is not a multiple of the VAE stride {stride}")
        h, w = height // stride, width // stride
        cfg.frame_seq_length(h, w)  # raises if not a multiple of the patch size
        if num_frames % cfg.num_frame_per_block:
            raise ValueError(f"num_frames={num_frames} latent frames is not a multiple of the chunk size "
                             f"{cfg.num_frame_per_block}")
        if num_frames > cfg.rope_max_positions:
            raise ValueError(f"num_frames={num_frames} exceeds the RoPE table ({cfg.rope_max_positions} frames)")
        return num_frames, cfg.in_dim, h, w

    def generate_one(self, prompt_embeds: np.ndarray, seed: int, shape, *, decode: bool = True,
                     chunk_bar: bool = True, params_for_chunk=None):
        """Latents [F, C, h, w] (np.float32) and, if ``decode``, uint8 frames [T, H, W, 3]."""
        dtype = jnp.dtype(self.dit.config.dtype)
        key = jax.random.key(seed)
        noise = jax.random.normal(jax.random.fold_in(key, 1 << 20), (1, *shape), dtype)
        emb = jnp.asarray(prompt_embeds[None], dtype)
        latents, frames, cache, bits = [], [], None, []
        num_chunks = shape[0] // self.dit.config.num_frame_per_block
        stream = self.pipeline.stream(noise, emb, seed=seed, params_for_chunk=params_for_chunk)
        for rec in tqdm(stream, total=num_chunks, desc="  chunks", leave=False, disable=not chunk_bar):
            latents.append(rec.output)
            if "bit_schedule" in rec.extras:
                bits.append(rec.extras["bit_schedule"])
            if decode:
                z = jnp.swapaxes(rec.output, 1, 2)  # (B, C, Fc, h, w)
                pixels, cache = decode_chunks(self.vae, [z], cache)
                frames.append(_to_uint8_frames(pixels))
        lat = np.asarray(jnp.concatenate(latents, axis=1)[0], np.float32)
        self.last_bit_schedule = bits or None  # δ-GBS (dvd-quant): activation bits [chunk][step]
        return lat, (np.concatenate(frames, axis=0) if decode else None)

    def run(self, prompts: Sequence[str], out_dir: str, *, seed: int = 0, num_frames: int, height: int,
            width: int, skip_existing: bool = False, settings: dict | None = None) -> dict:
        """Generate every prompt into ``out_dir``; returns the manifest written to generation.json."""
        shape = self.latent_shape(num_frames, height, width)
        vid_dir, lat_dir = os.path.join(out_dir, "videos"), os.path.join(out_dir, "latents")
        for d in (vid_dir, lat_dir):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as e:
                raise PermissionError(f"cannot create output folder {d}: {e.strerror or e}") from e
            if not os.access(d, os.W_OK):
                raise PermissionError(f"output folder {d} is not writable")
        run_settings = {**({"model": self.model_name} if self.model_name else {}),
                        "seed": seed, "num_frames": num_frames, "height": height, "width": width, "fps": FPS,
                        "dit": self.dit.config.to_dict(), "sampler": dataclasses.asdict(self.pipeline.config),
                        **(settings or {})}
        embeds = self.encode_prompts(list(prompts))
        counts: dict[str, int] = {}
        entries = []
        for i, prompt in enumerate(tqdm(prompts, desc="videos")):
            base = video_stem(prompt, 0)[:-2]
            idx = counts.get(base, 0)
            counts[base] = idx + 1
            stem = video_stem(prompt, idx)
            video_path = os.path.join(vid_dir, stem + ".mp4")
            latent_path = os.path.join(lat_dir, stem + ".npz")
            entry = {"prompt": prompt, "stem": stem, "seed": seed + i, "video": os.path.relpath(video_path, out_dir),
                     "latents": os.path.relpath(latent_path, out_dir)}
            entries.append(entry)
            recorded = _video_settings(run_settings, prompt, seed + i)
            if skip_existing and os.path.exists(video_path) and _recorded_settings(latent_path) == recorded:
                continue
            if skip_existing and os.path.exists(video_path):
                log.info("%s: regenerating, its recorded settings differ from this run's", stem)
            lat, frames = self.generate_one(embeds[i], seed + i, shape)
            if getattr(self, "last_bit_schedule", None):
                entry["bit_schedule"] = self.last_bit_schedule
            write_video(video_path, frames)
            with atomic_output(latent_path, overwrite=True) as tmp:  # last: records what the video was made with
                with open(tmp, "wb") as fh:
                    np.savez(fh, latents=lat, chunk_frames=self.dit.config.num_frame_per_block, seed=seed + i,
                             prompt=prompt, settings=recorded)
        manifest = {"settings": run_settings, "videos": entries}
        with atomic_output(os.path.join(out_dir, "generation.json"), overwrite=True) as tmp:
            with open(tmp, "w") as fh:
                json.dump(manifest, fh, indent=2)
        return manifest


def _video_settings(run_settings: dict, prompt: str, seed: int) -> str:
    """Everything one video depends on, as canonical JSON (stored in its latents .npz)."""
    per_video = {**run_settings, "seed": seed, "prompt": prompt}
    return json.dumps(per_video, sort_keys=True, separators=(",", ":"), default=str)


def _recorded_settings(latent_path: str) -> str | None:
    """The settings recorded beside an existing video (None if absent or unreadable: regenerate)."""
    try:
        with np.load(latent_path, allow_pickle=False) as z:
            return str(z["settings"]) if "settings" in z else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


# --------------------------------------------------------------------------------------- builders


def _tiny_defaults(cfg: GenerateConfig) -> GenerateConfig:
    return dataclasses.replace(cfg, num_frames=cfg.num_frames or 6, height=cfg.height or 64,
                               width=cfg.width or 64, dtype=cfg.dtype or "float32")


def _real_defaults(cfg: GenerateConfig) -> GenerateConfig:
    return dataclasses.replace(cfg, num_frames=cfg.num_frames or 21, height=cfg.height or 480,
                               width=cfg.width or 832, dtype=cfg.dtype or "bfloat16")


def embed_cache_dir(cfg: GenerateConfig, out_dir: str) -> str:
    """The prompt-embedding cache folder: ``cfg.embed_cache_dir``, else ``OUT/prompt_embeds_cache``; for a URL
    ``OUT`` (``gs://...``: QAT runs write there through etils.epath) a local folder keyed by the URL under the
    system temp dir, so the URL never becomes a local ``./gs:`` folder."""
    if cfg.embed_cache_dir:
        return cfg.embed_cache_dir
    if "://" in os.fspath(out_dir):
        import hashlib
        import tempfile

        key = hashlib.sha256(os.fspath(out_dir).encode()).hexdigest()[:16]
        path = os.path.join(tempfile.gettempdir(), "qarvd_prompt_embeds", key)
        log.info("--out %s is a URL: prompt embeddings are cached locally in %s (--embed-cache to choose)",
                 out_dir, path)
        return path
    return os.path.join(out_dir, "prompt_embeds_cache")


def build_text_to_video(cfg: GenerateConfig, out_dir: str, dit=None) -> tuple[TextToVideo, GenerateConfig]:
    """Load (or build the tiny random) encoder, DiT and VAE as ``cfg`` says.

    The text encoder is wrapped in an embedding cache and freed after the prompts are encoded.
    ``dit`` overrides the DiT (e.g. a quantized model).
    """
    from flax import nnx

    from convert.wan_dit import load_model
    from qarvd_jax.models.umt5 import ToyTokenizer, UMT5Config, UMT5Encoder, UMT5Tokenizer, load_umt5
    from qarvd_jax.models.umt5 import encode_with_cache, encoder_fingerprint, make_prompt_encoder
    from qarvd_jax.models.wan.config import PRESETS, WanDiTConfig
    from qarvd_jax.models.wan.model import CausalWanModel
    from qarvd_jax.models.wan.loading import model_from_params, model_params
    from qarvd_jax.models.wan_vae import (WanVAE, WanVAEConfig, load_wan_vae, to_torch_state_dict,
                                          wan_vae_from_state_dict)

    if cfg.preset == "testbed":
        return _build_testbed(cfg, out_dir, dit)
    real = bool(cfg.checkpoint or cfg.t5 or cfg.vae)
    if real and not (cfg.checkpoint and cfg.t5 and cfg.vae and cfg.tokenizer):
        missing = [n for n in ("checkpoint", "t5", "vae", "tokenizer") if not getattr(cfg, n)]
        raise ValueError(f"real-model generation needs --checkpoint, --t5, --vae and --tokenizer; missing: "
                         f"{', '.join('--' + m for m in missing)}")
    cfg = _real_defaults(cfg) if real else _tiny_defaults(cfg)
    dtype = cfg.dtype
    if dit is None:
        if real:
            base = PRESETS[cfg.preset or "selfforcing_1_3b"]()  # known: checked by GenerateConfig
            dit = load_model(cfg.checkpoint, base.replace(param_dtype=dtype, dtype=dtype))
        else:
            # random weights drawn in float32 and cast, so every --dtype runs the same tiny model
            fp32 = CausalWanModel(WanDiTConfig.tiny(), rngs=nnx.Rngs(cfg.seed))
            dit = model_from_params(model_params(fp32), WanDiTConfig.tiny(param_dtype=dtype, dtype=dtype))
    text_len, text_dim = dit.config.text_len, dit.config.text_dim
    if real:
        vae_config = WanVAEConfig.wan21().replace(param_dtype=dtype, dtype=dtype)

        def vae():
            return load_wan_vae(cfg.vae, WanVAEConfig.wan21(), dtype=dtype)
        t5_cfg = UMT5Config.umt5_xxl(text_len=text_len)
        encoder_id = encoder_fingerprint(cfg.t5, cfg.tokenizer, extra=dtype)

        def make_encoder():
            return make_prompt_encoder(load_umt5(cfg.t5, t5_cfg, dtype=dtype),
                                       UMT5Tokenizer.from_file(cfg.tokenizer, text_len=text_len), batch_size=4)
    else:
        vae_config = WanVAEConfig.tiny(param_dtype=dtype, dtype=dtype)

        def vae():
            vae32 = WanVAE(WanVAEConfig.tiny(), rngs=nnx.Rngs(cfg.seed + 1))
            if dtype == "float32":
                return vae32
            return wan_vae_from_state_dict(to_torch_state_dict(vae32), vae_config)
        t5_cfg = UMT5Config.tiny(dim=text_dim, dim_attn=text_dim, text_len=text_len)
        encoder_id = f"builtin-tiny-umt5-seed{cfg.seed}-dim{text_dim}"

        def make_encoder():
            return make_prompt_encoder(UMT5Encoder(t5_cfg, rngs=nnx.Rngs(cfg.seed + 2)),
                                       ToyTokenizer(t5_cfg.vocab_size, text_len))
    cache_dir = embed_cache_dir(cfg, out_dir)

    def encode(prompts: list[str]) -> np.ndarray:
        holder: dict = {}

        def run_encoder(missing):
            holder["enc"] = make_encoder()  # built only if something is not cached
            return holder["enc"](missing)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            out = encode_with_cache(prompts, run_encoder, cache_dir, encoder_id, text_len=text_len)
        holder.clear()
        gc.collect()  # the encoder (5.7B params for umT5-XXL) is gone before the DiT runs
        return out

    return TextToVideo(dit, vae, encode, cfg.sampler, vae_config=vae_config), cfg


def _build_testbed(cfg: GenerateConfig, out_dir: str, dit=None) -> tuple[TextToVideo, GenerateConfig]:
    """The trained testbed stack (:mod:`qarvd_jax.testbed`): its shipped DiT (or ``--checkpoint``, a DiT
    of the testbed architecture), VAE and umT5, its recorded sampler (the KV-cache format from ``cfg``)
    and geometry (21 latent frames, 64 x 64)."""
    from convert.wan_dit import load_model
    from qarvd_jax.models.umt5 import ToyTokenizer, encode_with_cache, make_prompt_encoder
    from qarvd_jax.testbed.config import TEXT_LEN, load_models

    if cfg.t5 or cfg.vae or cfg.tokenizer:
        raise ValueError("--preset testbed brings its own VAE, text encoder and tokenizer: drop --t5/--vae/--tokenizer")
    dtype = cfg.dtype or "float32"
    spec, shipped_dit, vae, t5 = load_models(dtype)
    if dit is None:
        dit = load_model(cfg.checkpoint, spec.dit.replace(param_dtype=dtype, dtype=dtype)) if cfg.checkpoint \
            else shipped_dit
    cfg = dataclasses.replace(cfg, num_frames=cfg.num_frames or spec.num_frames, height=cfg.height or spec.height,
                              width=cfg.width or spec.width, dtype=dtype)
    sampler = dataclasses.replace(spec.sampler, **{f.name: getattr(cfg.sampler, f.name)
                                                   for f in dataclasses.fields(cfg.sampler) if f.name.startswith("kv_")})
    encoder = make_prompt_encoder(t5, ToyTokenizer(t5.config.vocab_size, TEXT_LEN))
    cache_dir = embed_cache_dir(cfg, out_dir)
    encoder_id = f"builtin-testbed-umt5-{spec.info.get('umt5_sha256', 'untracked')[:16]}"

    def encode(prompts: list[str]) -> np.ndarray:
        return encode_with_cache(prompts, encoder, cache_dir, encoder_id, text_len=TEXT_LEN)

    return TextToVideo(dit, vae, encode, sampler, vae_config=vae.config, model_name="testbed"), cfg
