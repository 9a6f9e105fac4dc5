"""LPIPS v0.1 with the AlexNet trunk (``lpips.LPIPS(net='alex', spatial=True)``) in Flax NNX.

Images are channels-last ``[N, H, W, 3]`` in ``[-1, 1]`` (as the original's input after ``x * 2 - 1``).
Per image pair:

1. ScalingLayer ``(x - shift) / scale``;
2. torchvision AlexNet ``features`` at relu1..relu5 (conv 11/4 pad 2, [maxpool 3/2], conv 5 pad 2,
   [maxpool 3/2], conv 3 pad 1 x3; channels 64, 192, 384, 256, 256);
3. unit-normalise every layer over channels, ``x / (||x|| + 1e-10)``, square the difference;
4. 1x1 conv heads ``lin0..lin4`` (no bias);
5. ``spatial=True``: bilinearly upsample each 1-channel map to H x W (``align_corners=False``, torch's
   scale-factor arithmetic), sum the layers; the per-image value is the mean of that map.

Weights: the torchvision AlexNet state dict (``alexnet-owt-*.pth``: ``features.{0,3,6,8,10}.weight/bias``;
``classifier.*`` is ignored) and lpips' ``weights/v0.1/alex.pth`` (``lin{k}.model.1.weight`` ``[1, C, 1, 1]``,
``lin{k}.model.0.weight`` also accepted). A full LPIPS state dict whose trunk is under
``net.slice{1..5}.{idx}.*`` may be passed as the only file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.eval._weights import Slot, assign_strict, conv_slots, read_weights
from qarvd_jax.eval.metrics import resize_bilinear

__all__ = ["ALEX_LAYERS", "LPIPS", "AlexNetFeatures", "load_lpips", "lpips_from_state_dicts", "lpips_per_frame"]

# (torchvision features index, in, out, kernel, stride, padding, lpips slice) of the 5 convs
ALEX_LAYERS = ((0, 3, 64, 11, 4, 2, 1), (3, 64, 192, 5, 1, 2, 2), (6, 192, 384, 3, 1, 1, 3),
               (8, 384, 256, 3, 1, 1, 4), (10, 256, 256, 3, 1, 1, 5))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


def _unit_norm(f: jax.Array) -> jax.Array:
    """``lpips.normalize_tensor``: divide by the L2 norm over channels plus 1e-10."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + _EPS)


class AlexNetFeatures(nnx.Module):
    """torchvision AlexNet ``features`` up to relu5: ``[N, H, W, 3] -> [relu1, ..., relu5]`` (NHWC)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.convs = nnx.List([
            nnx.Conv(cin, cout, (k, k), strides=s, padding=((p, p), (p, p)),
                     precision=jax.lax.Precision.HIGHEST, rngs=rngs)
            for _, cin, cout, k, s, p, _ in ALEX_LAYERS])

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        feats = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # features.2 / features.5: MaxPool2d(3, stride 2), no padding, floor mode
                x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            x = jax.nn.relu(conv(x))
            feats.append(x)
        return feats


class LPIPS(nnx.Module):
    """LPIPS v0.1 (AlexNet, linear heads, ``spatial=True``). Build with :func:`load_lpips`."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.net = AlexNetFeatures(rngs=rngs)
        self.lins = nnx.List([nnx.Conv(c, 1, (1, 1), use_bias=False, precision=jax.lax.Precision.HIGHEST,
                                       rngs=rngs) for _, _, c, *_ in ALEX_LAYERS])

    def spatial_map(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """Distance map ``[N, H, W]`` of two image batches ``[N, H, W, 3]`` in [-1, 1]."""
        if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two [N, H, W, 3] batches of equal shape, got {x0.shape}, {x1.shape}")
        n, h, w, _ = x0.shape
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        feats0 = self.net((x0.astype(jnp.float32) - shift) / scale)
        feats1 = self.net((x1.astype(jnp.float32) - shift) / scale)
        total = jnp.zeros((n, h, w), jnp.float32)
        for f0, f1, lin in zip(feats0, feats1, self.lins):
            m = lin((_unit_norm(f0) - _unit_norm(f1)) ** 2)[..., 0]  # [N, h', w']
            fh, fw = m.shape[1:]
            total = total + resize_bilinear(m, (h, w), scale_hw=(h / fh, w / fw), axes=(1, 2))
        return total

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """Per-image LPIPS ``[N]``: the mean of :meth:`spatial_map` (as ``loss_fn(a, b).mean()``)."""
        return self.spatial_map(x0, x1).mean(axis=(1, 2))


@nnx.jit
def _lpips_jit(model: LPIPS, x0: jax.Array, x1: jax.Array) -> jax.Array:
    return model(x0 * 2.0 - 1.0, x1 * 2.0 - 1.0)


def lpips_per_frame(model: LPIPS, ref: np.ndarray, test: np.ndarray, batch: int = 4) -> np.ndarray:
    """LPIPS of every frame pair of two videos ``[T, H, W, 3]`` in [0, 1] -> float64 ``[T]``."""
    if np.shape(ref) != np.shape(test):
        raise ValueError(f"LPIPS: reference shape {np.shape(ref)} != test shape {np.shape(test)}")
    out = [np.asarray(_lpips_jit(model, jnp.asarray(ref[i:i + batch], jnp.float32),
                                 jnp.asarray(test[i:i + batch], jnp.float32)))
           for i in range(0, len(ref), batch)]
    return np.concatenate(out).astype(np.float64)


def _slots(model: LPIPS, trunk_prefix: str, lin_index: int) -> tuple[dict[str, Slot], dict[str, Slot]]:
    trunk: dict[str, Slot] = {}
    for (idx, *_, sl), conv in zip(ALEX_LAYERS, model.net.convs):
        name = f"features.{idx}" if trunk_prefix == "features" else f"net.slice{sl}.{idx}"
        trunk.update(conv_slots(name, conv))
    lins: dict[str, Slot] = {}
    for k, lin in enumerate(model.lins):
        lins.update(conv_slots(f"lin{k}.model.{lin_index}", lin))
    return trunk, lins


def lpips_from_state_dicts(lin_state: Mapping[str, np.ndarray], trunk_state: Mapping[str, np.ndarray] | None = None,
                           *, source: str = "LPIPS weights", trunk_source: str = "AlexNet weights") -> LPIPS:
    """Build :class:`LPIPS` from the linear heads' state dict and the AlexNet state dict.

    With ``trunk_state=None`` the trunk is read from ``lin_state`` (``net.slice*`` keys of a full
    LPIPS state dict). Strict: every tensor must be present with its exact shape.
    """
    model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0)))
    lin_index = 0 if "lin0.model.0.weight" in lin_state else 1
    if trunk_state is None:
        trunk, lins = _slots(model, "net", lin_index)
        assign_strict({**trunk, **lins}, lin_state, source)
    else:
        trunk, lins = _slots(model, "features", lin_index)
        assign_strict(lins, lin_state, source, ignore=("net.*",))
        assign_strict(trunk, trunk_state, trunk_source, ignore=("classifier.*",))
    return model


def load_lpips(lpips_weights: str | os.PathLike, alexnet_weights: str | os.PathLike | None = None) -> LPIPS:
    """Load LPIPS from ``alex.pth`` (linear heads) and ``alexnet-owt-*.pth`` (trunk); torch-free.

    Files may be ``.pt/.pth`` (torch zip format) or ``.safetensors``. Raises FileNotFoundError /
    ValueError naming the file on a missing file or a mismatching state dict.
    """
    lin_state = read_weights(lpips_weights, "LPIPS linear-head")
    if alexnet_weights is None and not any(k.startswith("net.slice") for k in lin_state):
        raise ValueError(f"{os.fspath(lpips_weights)} holds only the LPIPS linear heads; the AlexNet trunk "
                         "weights (torchvision alexnet-owt-*.pth) are needed as well")
    trunk_state = None if alexnet_weights is None else read_weights(alexnet_weights, "AlexNet")
    return lpips_from_state_dicts(lin_state, trunk_state, source=os.fspath(lpips_weights),
                                  trunk_source=os.fspath(alexnet_weights or lpips_weights))
