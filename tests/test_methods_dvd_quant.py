"""DVD-Quant (issue 14): the Walsh-Hadamard transform, BGR, ARQ, δ-GBS and the data-free workflow."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qarvd_jax.cli import main as cli
from qarvd_jax.quant import bit_switch as gbs
from qarvd_jax.quant import methods
from qarvd_jax.quant.hadamard import block_fwht, fwht, hadamard_matrix, rotation_block
from qarvd_jax.quant.methods import dvd_quant as dq

GEOM = ["--num-frames", "6", "--height", "32", "--width", "32"]


# ------------------------------------------------------------------------------------------ Hadamard
@pytest.mark.parametrize("n", [1, 2, 128, 1024])
def test_fwht_is_the_dense_hadamard_orthogonal_and_self_inverse(n):
    x = np.random.default_rng(n).normal(size=(5, n)).astype(np.float32)
    h = hadamard_matrix(n)
    np.testing.assert_allclose(np.asarray(fwht(x)), x @ h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fwht(x, normalize=False)), x @ hadamard_matrix(n, normalize=False),
                               rtol=1e-5, atol=1e-4)
    eye = np.asarray(fwht(np.eye(n, dtype=np.float32)))
    np.testing.assert_allclose(eye @ eye.T, np.eye(n), atol=1e-5)  # orthogonal
    np.testing.assert_allclose(np.asarray(fwht(fwht(x))), x, rtol=1e-5, atol=1e-5)  # its own inverse
    np.testing.assert_allclose(np.asarray(fwht(fwht(x, normalize=False), normalize=False)), n * x,
                               rtol=1e-5, atol=1e-3)  # up to scale n without normalisation


@pytest.mark.parametrize("k", [1536, 8960])
def test_block_fwht_at_wan_widths(k):
    assert rotation_block(k) == 128
    x = np.random.default_rng(k).normal(size=(3, k)).astype(np.float32)
    ref = (x.reshape(3, k // 128, 128) @ hadamard_matrix(128)).reshape(3, k)  # blockdiag(H_128, ...)
    y = np.asarray(block_fwht(x, 128))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sum(y * y, axis=1), np.sum(x * x, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(block_fwht(y, 128)), x, rtol=1e-5, atol=1e-5)


def test_rotation_block_choice():
    assert [rotation_block(k) for k in (64, 128, 4096, 96, 1536, 7)] == [64, 128, 4096, 32, 128, 1]
    with pytest.raises(ValueError, match="power of two"):
        fwht(np.ones((2, 12), np.float32))
    with pytest.raises(ValueError, match="multiple"):
        block_fwht(np.ones((2, 200), np.float32), 128)


# ------------------------------------------------------------------------------------------ BGR
def _rows(outliers: bool, shape=(256, 1536), seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    if outliers:
        m = rng.random(shape) < 0.003
        w[m] = 8.0 * np.sign(rng.normal(size=int(m.sum())))
    return w


def _np_err(w, s, z, qmax):
    q = np.clip(np.round(w / s[:, None]) + z[:, None], 0, qmax)
    return np.mean((w - s[:, None] * (q - z[:, None])) ** 2, axis=1)


def mse_clip_search(w, bits, grid=100, max_shrink=80):
    """The shared MSE range search (quantizer_variants.md §1, q = 2): per row the best (p lo, p hi)."""
    qmax = 2 ** bits - 1
    lo, hi = w.min(1), w.max(1)
    best = np.full(w.shape[0], np.inf)
    for i in range(max_shrink):
        p = 1 - i / grid
        s = np.maximum((p * hi - p * lo) / qmax, 1e-8)
        z = np.clip(np.round(-p * lo / s), 0, qmax)
        best = np.minimum(best, _np_err(w, s, z, qmax))
    return float(best.sum())


def np_bgr(w, bits, steps=20, max_shift=0.2, max_iters=50, tol=1e-4):
    """numpy reference of BGR (2-D bounded init, then the coordinate-descent rule, kept best)."""
    qmax = float(2 ** bits - 1)
    lo, hi = w.min(1), w.max(1)
    r = hi - lo
    grid = [max_shift * i / steps for i in range(steps + 1)]
    best = None
    for a in grid:
        for b in grid:
            s = np.maximum((r - (np.float32(a) + np.float32(b)) * r) / qmax, 1e-8).astype(np.float32)
            z = np.clip(np.round(-(lo + np.float32(a) * r) / s), 0, qmax)
            e = _np_err(w, s, z, qmax)
            if best is None:
                best = [s, z, e]
            else:
                m = e < best[2]
                best = [np.where(m, n, o) for n, o in zip((s, z, e), best)]
    s, z, _ = best
    hist = [best[2].sum()]
    for _ in range(max_iters):
        q = np.clip(np.round(w / s[:, None]) + z[:, None], 0, qmax)
        d = q - z[:, None]
        num, den = (d * w).sum(1), (d * d).sum(1)
        s = np.where((den > 0) & (num > 0), num / np.where(den > 0, den, 1), s).astype(np.float32)
        z = np.clip(np.round(np.mean(q - w / s[:, None], axis=1)), 0, qmax)
        e = _np_err(w, s, z, qmax)
        m = e < best[2]
        best = [np.where(m, n, o) for n, o in zip((s, z, e), best)]
        hist.append(best[2].sum())
        if hist[-2] - hist[-1] <= tol * hist[-2]:
            break
    return best[0], best[1], hist


@pytest.mark.parametrize("outliers", [False, True])
def test_bgr_monotone_and_beats_minmax_and_mse_clip_search(outliers):
    w = _rows(outliers)
    res = dq.bgr_quantize(w, 4)
    h = np.asarray(res.history)
    assert len(h) >= 2 and np.all(np.diff(h) <= 0)  # the kept error never rises
    assert h[-1] <= res.init_error <= res.minmax_error
    assert h[-1] < 0.75 * res.minmax_error
    assert h[-1] <= mse_clip_search(w, 4)
    # the stored parameters give that error
    e = _np_err(w, np.asarray(res.scale), np.asarray(res.zero), 15).sum()
    np.testing.assert_allclose(e, h[-1], rtol=1e-4)


def test_bgr_equals_numpy_reference():
    w = _rows(True, shape=(64, 256), seed=3)
    res = dq.bgr_quantize(w, 4)
    s, z, hist = np_bgr(w, 4)
    np.testing.assert_allclose(np.asarray(res.scale), s, rtol=1e-4)
    # zero points agree except on rows where two zero points tie (same error, float tie-break)
    assert np.mean(np.asarray(res.zero) == z) >= 0.9
    np.testing.assert_allclose(_np_err(w, np.asarray(res.scale), np.asarray(res.zero), 15), _np_err(w, s, z, 15),
                               rtol=1e-4)
    np.testing.assert_allclose(res.history[-1], hist[-1], rtol=1e-4)
    assert abs(len(res.history) - len(hist)) <= 1


# ------------------------------------------------------------------------------------------ ARQ
@pytest.mark.parametrize("k", [64, 1536])
def test_rotation_leaves_the_unquantized_output_unchanged(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 7, k)).astype(np.float32)
    w = rng.normal(size=(48, k)).astype(np.float32)  # [out, in]
    block = rotation_block(k)
    d = dq.signs_for(k, 0)
    y = np.einsum("...i,oi->...o", np.asarray(dq.rotate(x, d, block)), np.asarray(dq.rotate(w, d, block)))
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    # the layer itself with FP activations and 16-bit weights is the plain linear
    b = rng.normal(size=(48,)).astype(np.float32)
    layer = dq.quantize_layer(w.T, b, None, dq.Config(w_bits=16, a_bits=None, bgr=False))
    assert layer.static.rot_block == block
    np.testing.assert_allclose(np.asarray(layer(x)), x @ w.T + b, rtol=1e-3, atol=1e-3 * np.sqrt(k))


def test_arq_beats_rtn_w4a4_on_activation_outliers():
    k, n = 512, 256
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=k)).astype(np.float32)
    scales[17] *= 100.0
    x = (rng.normal(size=(n, k)) * scales).astype(np.float32)
    w = (rng.normal(size=(k, 128)) / np.sqrt(k)).astype(np.float32)  # kernel [in, out]
    y0 = x @ w

    run = jax.jit(lambda layer, x: layer(x))

    def mse(layer):
        return float(np.mean((np.asarray(run(layer, jnp.asarray(x))) - y0) ** 2))

    cfg = dict(w_bits=4, a_bits=4, gbs=False)
    arq = mse(dq.quantize_layer(w, None, None, dq.Config(**cfg)))
    rot_only = mse(dq.quantize_layer(w, None, None, dq.Config(act_scale=False, **cfg)))
    rtn = methods.get("rtn")
    rtn_tok = mse(rtn.quantize_layer(w, None, None, rtn.Config(w_bits=4, a_bits=4, act_dynamic=True)))
    rtn_static = mse(rtn.quantize_layer(w, None, x, rtn.Config(w_bits=4, a_bits=4)))
    assert arq < 0.25 * min(rtn_tok, rtn_static), (arq, rot_only, rtn_tok, rtn_static)
    assert rot_only < rtn_tok
    # the high state of δ-GBS is a real A8 on the same weight codes
    layer = dq.quantize_layer(w, None, None, dq.Config(w_bits=4, a_bits=4))
    hi = dict(layer.state, act_high=jnp.ones(()))
    a8 = mse(methods.base.QuantizedLayer(dq.NAME, layer.kernel, None, hi, layer.static))
    assert a8 < 0.8 * arq  # the 4-bit weights dominate what is left
    l6 = dq.quantize_layer(w, None, None, dq.Config(w_bits=4, a_bits=4, a_bits_high=6))
    a6 = mse(methods.base.QuantizedLayer(dq.NAME, l6.kernel, None, dict(l6.state, act_high=jnp.ones(())), l6.static))
    assert a8 < a6 < arq  # W4A6 as the high state


# ------------------------------------------------------------------------------------------ δ-GBS
def test_gbs_rule_limits_and_hand_computed_schedules():
    const = gbs.changes_to_outputs([0.05] * 10)
    assert gbs.schedule(const, gbs.BitSwitch(0.0)) == [True] * 11
    assert gbs.schedule(const, gbs.BitSwitch(1e9)) == [False] * 11
    H, L = True, False
    # A = 1 (no history) -> H; then A = 0, 0.05, 0.10 low, 0.15 >= 0.12 high and reset, ...
    assert gbs.schedule(const, gbs.BitSwitch(0.12)) == [H, L, L, L, H, L, L, H, L, L, H]
    # changes L1(1..6) = 0.3, 0.01, 0.02, 0.2, 0.05, 0.05 with delta 0.12:
    # step 0 H (A=1 -> 0); 1 L (A=0 -> .3); 2 H (-> .01); 3 L (-> .03); 4 L (-> .23); 5 H (-> .05); 6 L
    seq = gbs.changes_to_outputs([0.3, 0.01, 0.02, 0.2, 0.05, 0.05])
    assert gbs.schedule(seq, gbs.BitSwitch(0.12)) == [H, L, H, L, L, H, L]
    np.testing.assert_allclose(float(gbs.relative_l1(seq[1], seq[0])), 0.3, rtol=1e-5)
    with pytest.raises(ValueError):
        gbs.BitSwitch(-1.0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from qarvd_jax.pipeline.text_to_video import GenerateConfig
    from qarvd_jax.workflow import build_stack

    return build_stack(GenerateConfig(num_frames=6, height=32, width=32), str(tmp_path_factory.mktemp("dvd")))


def test_pipeline_switches_bits_from_its_own_outputs_and_compiles_once(stack):
    from qarvd_jax.pipeline.causal_inference import CausalInferencePipeline
    from qarvd_jax.workflow import quantize_copy

    cfg = dq.Config(delta=0.12, bgr_init_steps=4, bgr_max_iters=5)
    model, summary = quantize_copy(stack, "dvd-quant", cfg, [], seed=0)  # data-free: no prompts
    assert summary["rotation"]["blocks.0.ffn.2"] == 128 and summary["bit_switch"]["delta"] == 0.12
    pipe = CausalInferencePipeline(model, stack.t2v.pipeline.config)
    emb = jnp.asarray(stack.embeds(["a fox"]))
    for seed in (0, 1):
        noise = jax.random.normal(jax.random.key(seed), (1, *stack.latent_shape))
        recs = list(pipe.stream(noise, emb, seed=seed))
        for r in recs:  # the in-graph rule equals the host rule on the chunk's own model outputs
            ref = gbs.schedule(list(np.asarray(r.flows, np.float32)), pipe.bit_switch)
            assert r.extras["bit_schedule"] == [8 if h else 4 for h in ref[:-1]]
            assert r.extras["context_bits"] == (8 if ref[-1] else 4)
            assert r.extras["bit_schedule"][0] == 8
    assert pipe.trace_count == 1  # 2 chunks x 5 passes, 2 videos, bits switching: one trace
    # the bits really reach the layers: all-A8 and all-A4 give different videos
    noise = jax.random.normal(jax.random.key(0), (1, *stack.latent_shape))
    out = {}
    for delta in (0.0, 1e9):
        from qarvd_jax.quant.methods.model import iter_method_layers

        m2 = model
        for _, lyr in iter_method_layers(m2):
            lyr.static = dataclasses.replace(lyr.static, delta=delta)
        p2 = CausalInferencePipeline(m2, stack.t2v.pipeline.config)
        recs = list(p2.stream(noise, emb, seed=0))
        assert all(r.extras["bit_schedule"] == [8 if delta == 0 else 4] * 4 for r in recs)
        out[delta] = np.concatenate([np.asarray(r.output) for r in recs], axis=1)
    assert np.mean((out[0.0] - out[1e9]) ** 2) > 1e-9
    assert np.all(np.isfinite(out[0.0]))


# ------------------------------------------------------------------------------------------ data-free
def test_quantize_layer_without_data():
    k = np.random.default_rng(0).normal(size=(96, 40)).astype(np.float32)
    layer = methods.get("dvd-quant").quantize_layer(k, None, None, dq.Config())
    assert layer.static.rot_block == 32 and layer.kernel.shape == (96, 40)
    assert not dq.needs_calibration(dq.Config())
    assert np.all(np.isfinite(np.asarray(layer(jnp.ones((3, 96))))))
    assert "dvd-quant" in methods.available()


def test_cli_quantize_reads_no_prompts_and_generate_records_the_schedule(tmp_path):
    missing = tmp_path / "no_such_prompts.txt"  # reading it would fail
    q = tmp_path / "q"
    assert cli(["quantize", "--method", "dvd-quant", "--out", str(q), "--prompts", str(missing), *GEOM,
                "delta=0.12", "bgr_init_steps=4", "bgr_max_iters=5"]) == 0
    summary = json.loads((q / "quantize.json").read_text())
    assert summary["method"] == "dvd-quant" and summary["calibration_prompts"] == []
    assert summary["bit_switch"]["delta"] == 0.12 and set(summary["rotation"].values()) == {64, 128}
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\n")
    out = tmp_path / "v"
    assert cli(["generate", "--quantized", str(q), "--prompts", str(prompts), "--out", str(out), *GEOM]) == 0
    man = json.loads((out / "generation.json").read_text())
    for entry in man["videos"]:
        sched = entry["bit_schedule"]
        assert len(sched) == 2 and all(len(c) == 4 and set(c) <= {4, 8} and c[0] == 8 for c in sched)
    # integer path: export (rotation folded into int8 codes) -> generate --backend xla, same schedule rule
    assert cli(["export", str(q), str(tmp_path / "int")]) == 0
    iout = tmp_path / "vi"
    assert cli(["generate", "--quantized", str(tmp_path / "int"), "--backend", "xla", "--prompts", str(prompts),
                "--out", str(iout), *GEOM]) == 0
    iman = json.loads((iout / "generation.json").read_text())
    assert iman["videos"][0]["bit_schedule"] == man["videos"][0]["bit_schedule"]
    a = np.load(out / man["videos"][0]["latents"])["latents"]
    b = np.load(iout / iman["videos"][0]["latents"])["latents"]
    assert 10 * np.log10(np.max(np.abs(a)) ** 2 / np.mean((a - b) ** 2)) > 40  # integer ~ fake quant (float order)


# ------------------------------------------------------------------------------------------ integer form
@pytest.mark.parametrize("lam_block", [1, 128])
def test_integer_form_equals_fake_quant(lam_block):
    """Stated bound: max |y_int - y_fake| <= 1e-4 max |y_fake| (same codes; only the float epilogue and
    summation order differ), at A4 and A8 with the same int4 weight codes."""
    rng = np.random.default_rng(1)
    k = 256
    scales = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=k)).astype(np.float32)
    scales[5] *= 100.0
    x = (rng.normal(size=(2, 24, k)) * scales).astype(np.float32)
    kernel = rng.normal(size=(k, 40)).astype(np.float32)
    b = rng.normal(size=(40,)).astype(np.float32)
    layer = dq.quantize_layer(kernel, b, None, dq.Config(lambda_block=lam_block, bgr_init_steps=4))
    arrays = dq.integer_form(layer)
    assert arrays["w_packed"].dtype == jnp.uint8 and arrays["w_packed"].shape == (40, k // 2)  # two codes a byte
    fake = jax.jit(lambda lyr, x: lyr(x))
    integer = jax.jit(dq.integer_apply, static_argnums=1)
    for high in (False, True):
        lyr = methods.base.QuantizedLayer(dq.NAME, layer.kernel, layer.bias,
                                          dict(layer.state, act_high=jnp.float32(high)), layer.static)
        y_fake = np.asarray(fake(lyr, jnp.asarray(x)))
        y_int = np.asarray(integer(arrays, layer.static, jnp.asarray(x), jnp.asarray(high)))
        assert np.max(np.abs(y_int - y_fake)) <= 1e-4 * np.max(np.abs(y_fake))
    y8 = np.asarray(integer(arrays, layer.static, jnp.asarray(x), jnp.asarray(True)))
    y4 = np.asarray(integer(arrays, layer.static, jnp.asarray(x), jnp.asarray(False)))
    y0 = x @ kernel + b
    assert np.mean((y8 - y0) ** 2) < np.mean((y4 - y0) ** 2)


# ------------------------------------------------------------------------------------------ packed export, Pallas
# Kernel-friendly widths (K % 256, N % 128, lambda_block 128) so every quantized layer takes the Pallas kernel.
WIDE = dict(dim=256, ffn_dim=512, num_heads=4, num_layers=1)


@pytest.fixture(scope="module")
def wide_export(tmp_path_factory):
    from flax import nnx

    from qarvd_jax.models.wan.config import WanDiTConfig
    from qarvd_jax.models.wan.model import CausalWanModel
    from qarvd_jax.quant.checkpoint import save_quantized

    d = tmp_path_factory.mktemp("dvdint")
    model = CausalWanModel(WanDiTConfig.tiny(**WIDE), rngs=nnx.Rngs(0))
    dq.quantize_model(model, None, dq.Config(lambda_block=128, bgr_init_steps=4, bgr_max_iters=5, delta=0.12))
    save_quantized(d / "q", model)
    assert cli(["export", str(d / "q"), str(d / "int")]) == 0
    return d


def test_export_packs_two_codes_per_byte(wide_export):
    from qarvd_jax.quant.integer.export import load_export

    trees, meta = load_export(wide_export / "int")
    layers = {n: lay for n, lay in meta["layers"].items() if lay.get("method") == dq.NAME}
    assert layers
    for name, lay in layers.items():
        k, n = lay["in_features"], lay["out_features"]
        assert lay["w_format"] == "int4-packed" and lay["bytes"]["weight"] == n * k // 2, name  # in/2 bytes a row
        arrays = trees["int"]
        for p in lay["path"]:
            arrays = arrays[p if p in arrays else str(p)]
        assert arrays["w_packed"].dtype == np.uint8 and arrays["w_packed"].shape == (n, k // 2)
        assert lay["bytes"]["total"] == sum(a.nbytes for a in arrays.values())
    q = meta["bytes"]["quantized_layers"]
    assert q["weight"] == sum(lay["in_features"] * lay["out_features"] for lay in layers.values()) // 2


def test_generate_pallas_matches_xla(wide_export, monkeypatch):
    """`qarvd generate --backend pallas` (the TPU kernel in the Pallas interpreter: the CLI has no interpret
    flag, so the loader gets interpret=True here) against --backend xla: same schedule, close latents."""
    from qarvd_jax.quant.integer import int_linear

    prompts = wide_export / "p.txt"
    prompts.write_text("a fox\n")
    runs = {}
    real = int_linear.load_integer_model
    for backend in ("xla", "pallas"):
        if backend == "pallas":
            monkeypatch.setattr(int_linear, "load_integer_model",
                                lambda *a, **kw: real(*a, **kw, interpret=True))
            model = real(wide_export / "int", backend="pallas", interpret=True)
            assert set(int_linear.layer_kernel_backends(model).values()) == {"pallas_tpu"}
        out = wide_export / f"v_{backend}"
        assert cli(["generate", "--quantized", str(wide_export / "int"), "--backend", backend, "--prompts",
                    str(prompts), "--out", str(out), *GEOM]) == 0
        man = json.loads((out / "generation.json").read_text())
        runs[backend] = man["videos"][0]["bit_schedule"], np.load(out / man["videos"][0]["latents"])["latents"]
    assert runs["pallas"][0] == runs["xla"][0]
    a, b = runs["xla"][1], runs["pallas"][1]
    psnr = 10 * np.log10(np.max(np.abs(a)) ** 2 / np.mean((a - b) ** 2))
    print(f"latent PSNR pallas vs xla: {psnr:.1f} dB")
    assert psnr > 60, psnr  # float epilogue order only (a flipped activation code would cost ~40 dB)
