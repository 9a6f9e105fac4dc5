"""Quantizer variants behind one interface (issue 11; specs in ``quantizer_variants.md``).

    from qarvd_jax.quant import methods
    methods.available()                    # ('gptq', 'qarvd', 'rtn', 'smoothquant', 'svdquant', 'vidit-q')
    m = methods.get("gptq")
    cfg = m.Config(w_bits=4, a_bits=None)  # or load_method_config("gptq", "configs/methods/gptq.yaml", ["w_bits=4"])
    layer = m.quantize_layer(kernel, bias, calib_inputs, cfg)   # kernel [in, out], calib_inputs [n, in]
    y = layer(x)                                                # x [..., in], pure and jit-able
    summary = m.quantize_model(model, calibration, cfg)        # the whole DiT, in place, by rules

Every method is one module of this package, found by :data:`METHODS` (public name -> module name);
adding a method means adding its file, nothing else. Shared pieces: :mod:`.base` (layer data,
quantizers, :class:`~.base.MethodLinear`), :mod:`.model` (calibration collection, rules).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["available", "get", "load_method_config", "Calibration", "MethodRule", "METHODS"]

# Modules of this package that are shared pieces, not methods.
_NOT_METHODS = frozenset({"base", "model"})


def _discover() -> dict[str, str]:
    """public name -> module: every module file of this package but the shared ones, named by its file with
    ``_`` -> ``-`` (``vidit_q.py`` -> ``vidit-q``; each module's ``NAME`` says the same, checked by the tests).
    Found without importing, so ``available()`` stays import-light, and adding a method is adding its file."""
    import pkgutil

    return {m.name.replace("_", "-"): m.name for m in pkgutil.iter_modules(__path__)
            if not m.name.startswith("_") and m.name not in _NOT_METHODS}


METHODS = _discover()


def available() -> tuple[str, ...]:
    """Names of the registered methods (sorted)."""
    return tuple(sorted(METHODS))


def get(name: str) -> ModuleType:
    """The method module ``name`` (``Config``, ``quantize_layer``, ``quantize_model``, ``apply``, ...)."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{METHODS[key]}")


def load_method_config(name: str, path=None, overrides=()):
    """``get(name).Config`` from an optional YAML file plus ``key=value`` overrides."""
    from qarvd_jax.config import load_config

    return load_config(get(name).Config, path, overrides)


def __getattr__(name: str):
    # lazy: ``available()`` stays import-light (the CLI parser calls it)
    if name in ("Calibration", "MethodRule"):
        from qarvd_jax.quant.methods import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
