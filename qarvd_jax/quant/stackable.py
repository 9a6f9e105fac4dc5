"""Fixed-shape "mask form" of dual-scale layers, so that the transformer blocks stack for ``lax.scan`` (QAT).

A dual-scale QuantLinear gathers its K outlier input channels (``outlier_idx`` [K], ``normal_idx`` [in-K]),
and K differs from block to block, so the blocks' states have different shapes and cannot be stacked. The
mask form computes the same layer with arrays whose shapes do not depend on K
(:func:`qarvd_jax.quant.qlinear.qlinear_apply`, module docstring of :mod:`qarvd_jax.quant.qlinear`): a
``group_mask`` [in] float32 leaf (1.0 = outlier channel, group 0; 0.0 = normal, group 1) instead of the
two index arrays, and a config with ``group_mask=True`` and ``n_outlier=0``.

:func:`to_mask_form` converts, for every layer *position* (the name without its block index,
``blocks.*.ffn.0``) where any block's layer is dual-scale, the layer of every block at that position, so
all blocks get one config per position (up to the layer's name) and one state structure:

* a dual-scale layer: the mask from its outlier indices; its steps and zero points [2, ...] unchanged;
* a single-scale layer (*promoted*): an all-zero mask (every channel in group 1) and its steps and zero
  points duplicated into both groups ([1, ...] -> [2, ...]; group 0 is unused and gets no gradient).

The mask form's config is the layer's own with ``n_outlier=0``, ``group_mask=True`` and the
``chunk_weighting`` of the position's first dual-scale layer (a calibration setting, unused in training,
that otherwise differs between single- and dual-scale layers); the original config is kept on the layer as
``unmasked_cfg`` (a static attribute, so it travels with the graph definition).

:func:`from_mask_form` restores the original configs and index arrays exactly (K = mask.sum(), sorted
indices); promoted layers take back the group-1 parameters. Only training sees the mask form: calibration,
AdaRound, saving (``LayerQuantConfig.to_dict``) and the integer export need the gathered form.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.quant.qlinear import QuantLinear, QuantState, iter_quant_layers, mask_form_specs

__all__ = ["layer_position", "to_mask_form", "from_mask_form", "mask_form_layers", "shallow_copy"]

_GROUP_LEAVES = ("w_scale", "w_zero", "a_scale", "a_zero")
_BLOCK = re.compile(r"^blocks\.\d+\.")


def layer_position(name: str) -> str:
    """The layer's name with the block index replaced by ``*`` (``blocks.3.ffn.0`` -> ``blocks.*.ffn.0``)."""
    return _BLOCK.sub("blocks.*.", name)


def _concrete(x, what: str) -> np.ndarray:
    if isinstance(x, jax.ShapeDtypeStruct):
        raise ValueError(f"{what} is abstract; the mask form needs concrete outlier indices")
    return np.asarray(jax.device_get(x))


def _mask_of(name: str, layer: QuantLinear) -> np.ndarray:
    din = int(layer.kernel.shape[0])
    mask = np.zeros((din,), np.float32)
    if layer.cfg.n_outlier:
        o = _concrete(layer.outlier_idx[...], f"{name}: outlier_idx")
        n = _concrete(layer.normal_idx[...], f"{name}: normal_idx")
        if (o.shape != (layer.cfg.n_outlier,) or np.any(np.diff(o) <= 0)
                or not np.array_equal(n, np.setdiff1d(np.arange(din), o))):
            raise ValueError(f"{name}: outlier_idx / normal_idx are not sorted complementary index sets of the "
                             f"{din} input channels (the mask form could not restore them exactly)")
        mask[o] = 1.0
    return mask


def _duplicate(x):
    """[1, ...] -> [2, ...] (the same values in both groups)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((2, *x.shape[1:]), x.dtype)
    return jnp.concatenate([x, x], axis=0)


def to_mask_form(model: nnx.Module) -> list[str]:
    """Convert (in place) the layers of every block position holding a dual-scale layer to the mask form
    (module docstring). Layers outside the blocks and positions without dual-scale layers are unchanged; an
    already converted layer is left as is. Returns the names of the layers converted by this call."""
    layers = [(n, lyr) for n, lyr in iter_quant_layers(model) if _BLOCK.match(n)]
    ref = {}  # position -> the first dual-scale layer's config
    for name, lyr in layers:
        cfg = getattr(lyr, "unmasked_cfg", None) if lyr.cfg.group_mask else lyr.cfg
        if cfg is not None and cfg.n_outlier:
            ref.setdefault(layer_position(name), cfg)
    done = []
    for name, lyr in layers:
        pos = layer_position(name)
        if pos not in ref or lyr.cfg.group_mask:
            continue
        cfg = lyr.cfg
        mask_cfg = dataclasses.replace(cfg, n_outlier=0, group_mask=True, chunk_weighting=ref[pos].chunk_weighting)
        mask_form_specs(mask_cfg)  # a clear error for quantizers the mask form cannot express
        mask = _mask_of(name, lyr)
        if cfg.n_outlier:
            del lyr.outlier_idx, lyr.normal_idx
        else:
            for leaf in _GROUP_LEAVES:
                setattr(lyr, leaf, QuantState(_duplicate(getattr(lyr, leaf)[...])))
        lyr.group_mask = QuantState(jnp.asarray(mask))
        lyr.unmasked_cfg = cfg
        lyr.cfg = mask_cfg
        done.append(name)
    return done


def from_mask_form(model: nnx.Module) -> list[str]:
    """Inverse of :func:`to_mask_form` (in place): the original configs, ``outlier_idx`` (sorted, K =
    mask.sum()) and ``normal_idx`` of dual-scale layers, the group-1 parameters of promoted ones. The steps
    (trained or not) are kept. Returns the names of the layers converted back."""
    done = []
    for name, lyr in iter_quant_layers(model):
        if not lyr.cfg.group_mask:
            continue
        orig = getattr(lyr, "unmasked_cfg", None)
        if orig is None:
            raise ValueError(f"{name}: a mask-form layer without its original config (unmasked_cfg)")
        mask = _concrete(lyr.group_mask[...], f"{name}: group_mask")
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError(f"{name}: group_mask holds values other than 0 and 1")
        chans = np.flatnonzero(mask).astype(np.int32)
        if chans.size != orig.n_outlier:
            raise ValueError(f"{name}: the mask has {chans.size} outlier channels, the layer had {orig.n_outlier}")
        if orig.n_outlier:
            lyr.outlier_idx = QuantState(jnp.asarray(chans))
            lyr.normal_idx = QuantState(jnp.asarray(np.setdiff1d(np.arange(mask.size, dtype=np.int32), chans)))
        else:
            for leaf in _GROUP_LEAVES:
                setattr(lyr, leaf, QuantState(getattr(lyr, leaf)[...][1:2]))
        del lyr.group_mask, lyr.unmasked_cfg
        lyr.cfg = orig
        done.append(name)
    return done


def mask_form_layers(model: nnx.Module) -> list[str]:
    """Names of the model's layers in the mask form."""
    return [n for n, lyr in iter_quant_layers(model) if lyr.cfg.group_mask]


def shallow_copy(model: nnx.Module) -> nnx.Module:
    """A new module graph sharing ``model``'s arrays (no copy of the weights): convert it without touching
    ``model``."""
    return nnx.merge(*nnx.split(model))
