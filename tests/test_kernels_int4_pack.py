"""Packing round trips and layout of kernels_pallas.int4_pack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.int4_pack import pack_int4, unpack_int4


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_all_values(signed):
  lo, hi = (-8, 7) if signed else (0, 15)
  rng = np.random.default_rng(0)
  w = rng.integers(lo, hi + 1, size=(16, 64))
  w[0, :16] = np.arange(lo, hi + 1)  # every value, incl. the edges
  w[1, 32:48] = np.arange(lo, hi + 1)  # ... in the high-nibble half too
  packed = pack_int4(jnp.asarray(w, jnp.int32), signed=signed)
  assert packed.dtype == jnp.uint8 and packed.shape == (16, 32)
  back = unpack_int4(packed, signed=signed)
  assert back.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(back), w)


@pytest.mark.parametrize("signed", [True, False])
def test_every_byte_round_trips(signed):
  bytes_ = jnp.arange(256, dtype=jnp.int32).astype(jnp.uint8).reshape(2, 128)
  w = unpack_int4(bytes_, signed=signed)
  np.testing.assert_array_equal(np.asarray(pack_int4(w, signed=signed)),
                                np.asarray(bytes_))


def test_layout_half_split():
  w = np.array([[1, 2, -3, 4, -8, 7, 0, -1]])
  p = np.asarray(pack_int4(jnp.asarray(w)))
  # byte j = w[j] (low nibble) | w[j + 4] (high nibble), two's complement.
  expect = [(w[0, j] & 0xF) | ((w[0, j + 4] & 0xF) << 4) for j in range(4)]
  np.testing.assert_array_equal(p[0], expect)
  assert p[0, 0] == 0x81  # low 1, high -8


def test_axis_and_int4_dtype():
  rng = np.random.default_rng(1)
  w = rng.integers(-8, 8, size=(6, 4, 3))
  p = pack_int4(jnp.asarray(w, jnp.int4), axis=0)
  assert p.shape == (3, 4, 3)
  np.testing.assert_array_equal(np.asarray(unpack_int4(p, axis=0)), w)


def test_pack_under_jit():
  w = jnp.asarray(np.random.default_rng(2).integers(0, 16, size=(8, 16)))
  f = jax.jit(lambda a: unpack_int4(pack_int4(a, signed=False), signed=False))
  np.testing.assert_array_equal(np.asarray(f(w)), np.asarray(w))


def test_pack_errors():
  with pytest.raises(ValueError, match="odd length"):
    pack_int4(jnp.zeros((4, 3), jnp.int8))
  with pytest.raises(ValueError, match=r"\[-8, 7\]"):
    pack_int4(jnp.full((2, 4), 8, jnp.int8))
  with pytest.raises(ValueError, match=r"\[0, 15\]"):
    pack_int4(jnp.full((2, 4), -1, jnp.int8), signed=False)
  with pytest.raises(ValueError, match="integer"):
    pack_int4(jnp.zeros((2, 4), jnp.float32))
  with pytest.raises(ValueError, match="uint8"):
    unpack_int4(jnp.zeros((2, 4), jnp.int32))
