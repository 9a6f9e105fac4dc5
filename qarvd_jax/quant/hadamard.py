"""Fast Walsh-Hadamard transform (FWHT) along the last axis, full or block-diagonal.

``fwht(x)`` computes ``x @ H_n`` for the Sylvester Hadamard matrix ``H_n`` (``H_1 = [1]``,
``H_2n = [[H_n, H_n], [H_n, -H_n]]``, the ordering of ``scipy.linalg.hadamard``) in O(n log n) with
``log2 n`` butterfly passes of reshapes (no dense matrix); ``normalize=True`` divides by ``sqrt(n)`` so
the transform is orthogonal and its own inverse. ``block_fwht(x, b)`` applies it to every block of
``b`` consecutive features (``x @ blockdiag(H_b, ..., H_b)``), the layout used for widths that are not
powers of two (Wan 1.3B: 1536 = 12 x 128, 8960 = 70 x 128; ``quantizer_variants.md`` §1 and U.1).
:func:`rotation_block` is the choice rule used by ``dvd-quant``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_power_of_two", "fwht", "block_fwht", "rotation_block", "hadamard_matrix"]


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@partial(jax.jit, static_argnames=("normalize",))
def fwht(x, *, normalize: bool = True):
    """``x @ H_n`` along the last axis (n = x.shape[-1], a power of two); float in, same dtype out."""
    x = jnp.asarray(x)
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht: the last axis has length {n}, not a power of two (use block_fwht)")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        # pairs (i, i + h) inside every run of 2h: [..., n/(2h), 2, h]
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return x * jnp.asarray(1.0 / np.sqrt(n), x.dtype) if normalize else x


@partial(jax.jit, static_argnames=("block", "normalize"))
def block_fwht(x, block: int, *, normalize: bool = True):
    """``fwht`` of every block of ``block`` consecutive features of the last axis (a multiple of it)."""
    x = jnp.asarray(x)
    k = x.shape[-1]
    if block == k:
        return fwht(x, normalize=normalize)
    if k % block:
        raise ValueError(f"block_fwht: width {k} is not a multiple of the block {block}")
    lead = x.shape[:-1]
    return fwht(x.reshape(*lead, k // block, block), normalize=normalize).reshape(*lead, k)


def rotation_block(k: int, max_block: int = 128) -> int:
    """The Hadamard block for width ``k``: ``k`` itself when it is a power of two (one full transform),
    else the largest power of two <= ``max_block`` that divides ``k`` (128 for 1536 and 8960; 1, i.e. no
    rotation, for odd widths)."""
    if is_power_of_two(k):
        return k
    b = 1
    while b * 2 <= max_block and k % (b * 2) == 0:
        b *= 2
    return b


def hadamard_matrix(n: int, *, normalize: bool = True) -> np.ndarray:
    """Dense Sylvester ``H_n`` (float64; tests and references only)."""
    if not is_power_of_two(n):
        raise ValueError(f"hadamard_matrix: {n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n) if normalize else h
