"""Device mesh, logical-axis rules and the shardings of parameters, optimiser state and batches.

Mesh
----
Three named axes, always in this order: ``data`` (pure data parallelism), ``fsdp`` (data parallelism
with parameters and optimiser state sharded) and ``tensor`` (model parallelism of the linear
layers' output features). ``--mesh data=2,fsdp=4`` sets sizes; unnamed axes are 1 and the product
must equal the number of devices (all processes together).

Logical axes of the state (by leaf name; the same table applies to optimiser moments, which
mirror the parameter tree)
------------------------------------------------------------------------------------------------
=====================================  ================  ==================================
leaf                                   shape             logical axes
=====================================  ================  ==================================
Linear / QuantLinear ``kernel``        [in, out]         (weight_in, weight_out); row-parallel
                                                         ``o`` and ``ffn.2``: (row_in, row_out)
Linear / QuantLinear ``bias``          [out]             (weight_out,)
QuantState ``w_scale`` / ``w_zero``    [G, out]          (None, weight_out)
MethodLinear ``q_w_scale`` / ``q_w_zero``  [out]         (weight_out,)
MethodLinear ``q_*_down`` (Φ, LoRA)    [in, r]           (weight_in, None)
MethodLinear ``q_*_up``                [r, out]          (None, weight_out); row-parallel layers use
                                                         row_in / row_out as their kernels
norm ``scale`` / ``bias``              [dim]             (embed,)
block / head ``modulation``            [1, k, dim]       (None, None, embed)
anything else (``a_scale`` [G],        any               replicated
flags, outlier indices, Adam counts)
=====================================  ================  ==================================

Batches: ``batch`` on the leading axis, everything else replicated.

Rules (:attr:`QATConfig.logical_axis_rules`) map each logical axis to mesh axes; the default::

    batch      -> (data, fsdp)
    weight_in  -> fsdp        # FSDP: kernels' input dim, gathered by XLA before each matmul
    weight_out -> tensor      # tensor parallelism of the output features (and their scales)
    embed      -> replicated
    row_in     -> tensor      # Megatron row-parallel o / ffn.2: input features on tensor (the
    row_out    -> fsdp        #   column-parallel q/k/v/ffn.0 outputs arrive split the same way)
    heads      -> tensor      # activations: attention heads, the FFN hidden width, and an optional
    mlp        -> tensor      #   context (token) axis
    context    -> replicated

Activations (the training path, :mod:`qarvd_jax.train.rollout`): block inputs/outputs
``(batch, context, embed)``, q/k/v and the KV cache ``(batch, context, heads, None)``.

A dimension whose size is not divisible by the product of its mesh axes is replicated instead
(e.g. ``text_embedding.0.kernel`` [32, 64] with fsdp=64), and a mesh axis is used at most once per
array (a later dimension that asks for an already-used axis is replicated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["MESH_AXES", "LOGICAL_AXES", "parse_mesh_spec", "make_mesh", "rules_table", "logical_axes",
           "partition_spec", "tree_shardings", "batch_sharding", "replicated", "check_model_divisible",
           "activation_sharding"]

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "weight_in", "weight_out", "embed", "row_in", "row_out", "heads", "mlp", "context")
# row-parallel kernels fall back to the column rules when a (pre-issue-10) rule table lacks them
_ROW_FALLBACK = {"row_in": "weight_in", "row_out": "weight_out"}


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}`` (empty: all sizes unset = {})."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ValueError(f"bad --mesh {spec!r}: {part!r} is not axis=size (axes: {', '.join(MESH_AXES)})")
            name, size = (s.strip() for s in part.split("=", 1))
            if not size.isdigit():
                raise ValueError(f"bad --mesh {spec!r}: size of {name!r} must be a positive integer, got {size!r}")
            items.append((name, int(size)))
    out: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise ValueError(f"bad --mesh {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in out:
            raise ValueError(f"bad --mesh {spec!r}: axis {name!r} given twice")
        if int(size) < 1:
            raise ValueError(f"bad --mesh {spec!r}: {name}={size} must be >= 1")
        out[name] = int(size)
    return out


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: every device of every process).

    An empty ``spec`` puts all devices on ``data``. Raises if the product of the sizes differs from
    the number of devices. Axes are ``AxisType.Auto`` (XLA propagates shardings between the explicit
    ``in_shardings``/``out_shardings``).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    if not sizes:
        sizes = {"data": len(devices)}
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        desc = ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
        raise ValueError(f"mesh {desc} has {math.prod(shape)} devices but {len(devices)} are available "
                         f"(set XLA_FLAGS=--xla_force_host_platform_device_count=N for N CPU devices)")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_table(rules: Sequence[Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """``[[logical, mesh_axis...], ...]`` -> ``{logical: mesh_axes}`` with validation."""
    table: dict[str, tuple[str, ...]] = {}
    for row in rules:
        if not row:
            raise ValueError("empty logical_axis_rules row")
        name, axes = row[0], tuple(row[1:])
        if name not in LOGICAL_AXES:
            raise ValueError(f"logical_axis_rules: unknown logical axis {name!r} (known: {', '.join(LOGICAL_AXES)})")
        if name in table:
            raise ValueError(f"logical_axis_rules: {name!r} appears twice")
        bad = [a for a in axes if a not in MESH_AXES]
        if bad or len(set(axes)) != len(axes):
            raise ValueError(f"logical_axis_rules: {name!r} -> {list(axes)}: mesh axes must be distinct names "
                             f"among {', '.join(MESH_AXES)}")
        table[name] = axes
    return table


def _key_name(k) -> str | int | None:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return None


def _names(path) -> list:
    """Path entries as plain names, without the ``.value`` of nnx Variables."""
    names = [_key_name(k) for k in path]
    return [n for n in names if n != "value"]


def _row_parallel(names: list) -> bool:
    """Megatron row-parallel layers: attention ``o`` and the FFN's second linear (``ffn.layers.2``)."""
    if len(names) < 2:
        return False
    if names[-2] == "o" and len(names) >= 3 and str(names[-3]) in ("self_attn", "cross_attn"):
        return True
    return len(names) >= 4 and names[-3] == "layers" and names[-2] == 2 and names[-4] == "ffn"


def logical_axes(path, shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axes of a state leaf from its pytree path and shape (the table in the module docstring)."""
    names = _names(path)
    leaf = names[-1] if names else None
    if isinstance(leaf, str) and leaf.startswith("q_"):  # MethodLinear state (qarvd_jax.quant.methods)
        return _method_axes(leaf[2:], len(shape), _row_parallel(names))
    parent = str(names[-2]) if len(names) > 1 else ""
    nd = len(shape)
    row = _row_parallel(names)
    if leaf == "kernel" and nd == 2:
        return ("row_in", "row_out") if row else ("weight_in", "weight_out")
    if leaf in ("w_scale", "w_zero") and nd == 2:
        return (None, "row_out") if row else (None, "weight_out")
    if leaf == "bias" and nd == 1 and row:
        return ("row_out",)
    if leaf in ("scale", "bias") and nd == 1 and "norm" in parent:
        return ("embed",)
    if leaf == "bias" and nd == 1:
        return ("weight_out",)
    if leaf == "modulation" and nd == 3:
        return (None, None, "embed")
    return (None,) * nd


def _method_axes(leaf: str, nd: int, row: bool) -> tuple[str | None, ...]:
    w_in, w_out = ("row_in", "row_out") if row else ("weight_in", "weight_out")
    if leaf in ("w_scale", "w_zero") and nd == 1:
        return (w_out,)
    if leaf.endswith("_down") and nd == 2:
        return (w_in, None)
    if leaf.endswith("_up") and nd == 2:
        return (None, w_out)
    return (None,) * nd


def partition_spec(logical: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, tuple[str, ...]],
                   mesh: Mesh) -> P:
    """PartitionSpec for logical axes under ``rules``; non-divisible dims and reused mesh axes replicate."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        if name in _ROW_FALLBACK and name not in rules:
            name = _ROW_FALLBACK[name]
        axes = tuple(rules.get(name, ())) if name else ()
        n = math.prod(mesh.shape[a] for a in axes) if axes else 1
        if not axes or size % n or used & set(axes):
            spec.append(None)
            continue
        used |= set(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
    """NamedSharding for every array leaf of ``tree`` (params, quant state, optimiser state...)."""

    def one(path, x):
        shape = np.shape(x)
        return NamedSharding(mesh, partition_spec(logical_axes(path, shape), shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]], ndim: int) -> NamedSharding:
    """Leading (batch) axis over the ``batch`` rule's mesh axes, the rest replicated."""
    axes = tuple(a for a in rules.get("batch", ()))
    lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_model_divisible(model_config, mesh: Mesh) -> None:
    """Attention heads and FFN width must split evenly over ``tensor`` (checked before any heavy work)."""
    t = mesh.shape["tensor"]
    if t == 1:
        return
    problems = []
    for name, value in (("num_heads", model_config.num_heads), ("ffn_dim", model_config.ffn_dim),
                        ("dim", model_config.dim)):
        if value % t:
            ok = [d for d in range(1, value + 1) if value % d == 0 and d <= mesh.size]
            problems.append(f"{name}={value} is not divisible by tensor={t} (tensor sizes that divide it: {ok})")
    if problems:
        raise ValueError("mesh does not fit the model: " + "; ".join(problems))


def activation_sharding(mesh: Mesh, rules: Mapping[str, tuple[str, ...]]):
    """``(logical axes, shape) -> NamedSharding`` for activations (``batch``, ``context``, ``heads``,
    ``mlp`` ...), with the same divisibility and one-use-per-mesh-axis rules as the state."""

    def sharding(logical: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(mesh, partition_spec(logical, shape, rules, mesh))

    return sharding
