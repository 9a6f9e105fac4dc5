"""Step 1 of Q-ARVD: chunk-wise sensitivity (qarvd_method.md section 3).

On a quantized model (dual-scale split, RTN weights, activation ranges calibrated with uniform chunk
weights), quantize **only chunk k** (weights and activations on every pass of that chunk: the
denoising steps and the KV-cache refresh) and run every other chunk in full precision, with the same
noise. ``e_k`` is the MSE of the whole final latent video against the full-precision run, over N
prompts; ``s = e / sum(e)``.

Quantization is switched per chunk by swapping the state's flag leaves, so one compiled chunk
function serves the reference run and all k. As in the original, the text embedding and the
cross-attention K/V projections run once per video, at chunk 0: when chunk 0 is the quantized one they
are quantized too and stay so for the whole video (their error adds to ``e_0``); for k > 0 they are full
precision.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qarvd_jax.quant.qlinear import with_quant_flags

__all__ = ["chunk_sensitivity", "write_sensitivity", "plot_sensitivity", "load_sensitivity"]


def load_sensitivity(path: str | None = None, values: str | None = None, num_chunks: int | None = None):
    """The sensitivity vector from a ``sensitivity.json`` (its ``"sensitivity"`` list) or from a
    comma-separated string such as ``"0.546,0.167,0.119"`` (e.g. a published vector); checked by
    :func:`~qarvd_jax.quant.objective.validate_sensitivity`. Neither given: ``None`` (uniform weights).
    """
    from qarvd_jax.quant.objective import validate_sensitivity

    if path and values:
        raise ValueError("give either --sensitivity FILE or --sensitivity-values, not both")
    if values is not None:
        try:
            parsed = [float(v) for v in str(values).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--sensitivity-values {values!r}: expected comma-separated numbers, "
                             "e.g. 0.546,0.167,0.119") from None
        return validate_sensitivity(parsed, num_chunks, "--sensitivity-values")
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sensitivity file not found: {path} (produce it with `qarvd sensitivity`)")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(data, dict) or "sensitivity" not in data:
        raise ValueError(f"{path}: no 'sensitivity' entry (not a `qarvd sensitivity` output)")
    return validate_sensitivity(data["sensitivity"], num_chunks, path)


def chunk_sensitivity(pipeline, prompt_embeds: np.ndarray, seeds, latent_shape) -> dict:
    """Sensitivity of every chunk of a calibrated quantized model.

    Args:
      pipeline: :class:`CausalInferencePipeline` over the quantized model (its state: calibrated).
      prompt_embeds: [N, L, text_dim]; seeds: N seeds (noise and re-noising draws).
      latent_shape: (F, C, h, w).

    Returns:
      ``{"sensitivity": [s_k], "errors": [e_k], "num_prompts": N}``; s sums to 1.
    """
    params = pipeline.params
    q_state, fp_state = with_quant_flags(params, True), with_quant_flags(params, False)
    num_chunks = latent_shape[0] // pipeline.model_config.num_frame_per_block
    sq_err = np.zeros(num_chunks)
    count = 0
    dtype = jnp.dtype(pipeline.model_config.dtype)
    for emb, seed in tqdm(list(zip(prompt_embeds, seeds)), desc="sensitivity prompts"):
        emb = jnp.asarray(emb, dtype)[None]
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1 << 20), (1, *latent_shape), dtype)
        ref = pipeline.generate(noise, emb, seed=seed, params_for_chunk=lambda c: fp_state, cross_params=fp_state)
        for k in range(num_chunks):
            out = pipeline.generate(noise, emb, seed=seed, cross_params=q_state if k == 0 else fp_state,
                                    params_for_chunk=lambda c, k=k: q_state if c == k else fp_state)
            sq_err[k] += float(jnp.sum(jnp.square(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        count += int(np.prod(ref.shape))
    errors = sq_err / count
    total = errors.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"chunk errors {errors.tolist()} cannot be normalised (is quantization enabled?)")
    return {"sensitivity": (errors / total).tolist(), "errors": errors.tolist(), "num_prompts": len(seeds)}


def write_sensitivity(result: dict, json_path: str, png_path: str | None = None) -> None:
    """JSON (atomic) and an optional bar plot of the normalised sensitivity."""
    from convert.state_dict_io import atomic_output

    with atomic_output(json_path, overwrite=True) as tmp:
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)
    if png_path:
        plot_sensitivity(result["sensitivity"], png_path)


def plot_sensitivity(sensitivity, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.asarray(sensitivity)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(s) + 2), 3))
    ax.bar(np.arange(len(s)), s, color="tab:blue")
    for i, v in enumerate(s):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("chunk")
    ax.set_ylabel("normalised sensitivity")
    ax.set_title("Chunk-wise sensitivity (MSE of the final latents, chunk k quantized)")
    ax.set_xticks(np.arange(len(s)))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)

