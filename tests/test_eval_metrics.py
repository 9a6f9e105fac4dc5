"""Evaluation metrics and ``qarvd evaluate``: checked against independent numpy / scipy references."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from convert.state_dict_io import write_state_dict
from qarvd_jax.eval import metrics as M

RNG = np.random.default_rng(0)
# imageio-ffmpeg runs ffmpeg by fork+exec; JAX's fork warning does not apply to it
pytestmark = pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")


# --------------------------------------------------------------------------------------------- PSNR

def _psnr_reference(a, b):  # calculate_psnr.img_psnr, frame by frame
    out = []
    for x, y in zip(a, b):
        mse = np.mean((x / 1.0 - y / 1.0) ** 2)
        out.append(100 if mse < 1e-10 else 20 * math.log10(1 / math.sqrt(mse)))
    return np.array(out)


def test_frame_psnr_matches_reference_and_caps_identical():
    a = RNG.random((4, 16, 20, 3), dtype=np.float32)
    b = np.clip(a + RNG.normal(0, 0.05, a.shape).astype(np.float32), 0, 1)
    np.testing.assert_allclose(M.frame_psnr(a, b), _psnr_reference(a, b), rtol=1e-6)
    b[1] = a[1]
    b[2] = a[2] + 1e-6  # MSE 1e-12 < 1e-10 -> capped
    got = M.frame_psnr(a, b)
    assert got[1] == 100.0 and got[2] == 100.0 and got[0] < 100.0
    np.testing.assert_array_equal(M.frame_psnr(a, a), np.full(4, 100.0))


# --------------------------------------------------------------------------------------------- SSIM

def _ssim_reference(a, b):
    """calculate_ssim.py with cv2.filter2D replaced by scipy.ndimage.correlate (2D window), frame by frame."""
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    g /= g.sum()
    win = np.outer(g, g)

    def filt(img):
        return scipy.ndimage.correlate(img, win, mode="reflect")[5:-5, 5:-5]

    res = []
    for fa, fb in zip(a, b):
        per_ch = []
        for c in range(fa.shape[-1]):
            i1, i2 = fa[..., c].astype(np.float64), fb[..., c].astype(np.float64)
            mu1, mu2 = filt(i1), filt(i2)
            s1 = filt(i1 ** 2) - mu1 ** 2
            s2 = filt(i2 ** 2) - mu2 ** 2
            s12 = filt(i1 * i2) - mu1 * mu2
            c1, c2 = 0.01 ** 2, 0.03 ** 2
            m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
            per_ch.append(m.mean())
        res.append(np.mean(per_ch))
    return np.array(res)


def test_frame_ssim_matches_reference_and_identical_is_one():
    a = RNG.random((3, 24, 31, 3), dtype=np.float32)
    b = np.clip(a + RNG.normal(0, 0.1, a.shape).astype(np.float32), 0, 1)
    got = M.frame_ssim(a, b)
    np.testing.assert_allclose(got, _ssim_reference(a, b), rtol=1e-12, atol=1e-14)
    assert np.all(got < 0.99)
    np.testing.assert_allclose(M.frame_ssim(a, a), np.ones(3), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="H, W >= 11"):
        M.frame_ssim(a[:, :10], a[:, :10])


def test_gaussian_kernel_matches_cv2_definition():
    k = M.gaussian_kernel_1d(11, 1.5)
    x = np.arange(11) - 5
    ref = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    np.testing.assert_allclose(k, ref / ref.sum(), rtol=1e-15)


# ---------------------------------------------------------------------------------------- latents

def test_latent_metrics_per_chunk():
    ref = RNG.normal(size=(9, 4, 5, 6)).astype(np.float32)
    test = ref + RNG.normal(0, [[[[0.1]]], [[[0.1]]], [[[0.1]]], [[[0.2]]], [[[0.2]]], [[[0.2]]],
                                [[[0.4]]], [[[0.4]]], [[[0.4]]]], ref.shape).astype(np.float32)
    mse = M.latent_mse_per_chunk(ref, test, 3)
    direct = [np.mean((ref[i:i + 3].astype(np.float64) - test[i:i + 3]) ** 2) for i in (0, 3, 6)]
    np.testing.assert_allclose(mse, direct, rtol=1e-12)
    assert mse[0] < mse[1] < mse[2]
    r = float(ref.max()) - float(ref.min())
    np.testing.assert_allclose(M.latent_psnr_per_chunk(ref, test, 3), 10 * np.log10(r ** 2 / np.array(direct)),
                               rtol=1e-12)
    np.testing.assert_array_equal(M.latent_psnr_per_chunk(ref, ref, 3), [100.0] * 3)
    with pytest.raises(ValueError, match="whole number of chunks"):
        M.latent_mse_per_chunk(ref, test, 4)


# ------------------------------------------------------------------------------------------ Fréchet

def _fd_scipy(f1, f2):  # styleganv frechet_distance with scipy.linalg.sqrtm
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    s = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - s * 2)))


def test_frechet_distance_matches_scipy():
    f1 = RNG.normal(size=(60, 8))
    f2 = RNG.normal(size=(60, 8)) @ RNG.normal(size=(8, 8)) * 0.7 + 0.3
    np.testing.assert_allclose(M.frechet_distance(f1, f2), _fd_scipy(f1, f2), rtol=1e-8)
    assert abs(M.frechet_distance(f1, f1)) < 1e-9
    one_a, one_b = f1[:1], f2[:1]
    assert M.frechet_distance(one_a, one_b) == pytest.approx(float(np.sum((one_a - one_b) ** 2)), rel=1e-12)
    mu, sigma = M.feature_stats(f1)
    np.testing.assert_allclose(sigma, np.cov(f1.T, ddof=1), rtol=1e-12)


# ------------------------------------------------------------------------------------ resize / FVD

def _torch_bilinear_1d(x, out, scale=None):
    """Loop version of ATen's CPU linear interpolation along axis 0 (align_corners=False): the source
    coordinate in float32 as ATen computes it, the blend in float64."""
    n, f32 = x.shape[0], np.float32
    s = f32(1.0 / scale) if scale else f32(n) / f32(out)
    res = []
    for j in range(out):
        src = max(s * (f32(j) + f32(0.5)) - f32(0.5), f32(0.0))
        i0 = min(int(math.floor(src)), n - 1)
        i1 = i0 + 1 if i0 < n - 1 else i0
        lam = float(src - f32(i0))
        res.append((1 - lam) * x[i0] + lam * x[i1])
    return np.stack(res)


def test_resize_matches_loop_reference_and_known_cases():
    x = RNG.random((2, 13, 17, 3), dtype=np.float32)
    got = np.asarray(M.resize_bilinear(x, (6, 29)))
    ref = np.stack([_torch_bilinear_1d(np.swapaxes(_torch_bilinear_1d(np.swapaxes(f, 0, 1).astype(np.float64),
                                                                      29), 0, 1), 6) for f in x])
    np.testing.assert_allclose(got, ref, atol=2e-6)
    # a x2 downscale is the 2x2 average (source coordinates fall half-way)
    y = RNG.random((1, 8, 6, 1), dtype=np.float32)
    pooled = y.reshape(1, 4, 2, 3, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(M.resize_bilinear(y, (4, 3))), pooled, atol=1e-6)
    # 2 -> 4 upsample: edges clamp, interior weights 0.75 / 0.25
    z = np.array([[[[0.0], [1.0]]]], np.float32)  # [1, 1, 2, 1]
    np.testing.assert_allclose(np.asarray(M.resize_bilinear(z, (1, 4)))[0, 0, :, 0], [0, 0.25, 0.75, 1.0])


def test_fvd_geometry_and_preprocess():
    assert M.fvd_resize_geometry(480, 832) == (224, 389, 0, 82)
    assert M.fvd_resize_geometry(832, 480) == (389, 224, 82, 0)
    assert M.fvd_resize_geometry(300, 300) == (224, 224, 0, 0)
    v = RNG.random((2, 48, 80, 3), dtype=np.float32)
    out = np.asarray(M.fvd_preprocess(v, resolution=16))  # 48x80 -> 16x27, crop left 5
    assert out.shape == (2, 16, 16, 3)
    full = np.stack([_torch_bilinear_1d(np.swapaxes(_torch_bilinear_1d(np.swapaxes(f, 0, 1).astype(np.float64),
                                                                       27), 0, 1), 16) for f in v])
    np.testing.assert_allclose(out, (full[:, :, 5:21] - 0.5) * 2, atol=3e-6)
    assert out.min() >= -1 and out.max() <= 1


# -------------------------------------------------------------------------------------------- LPIPS

ALEX = ((0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3))


def _lpips_state(rng):
    trunk = {}
    for idx, cin, cout, k in ALEX:
        w = rng.normal(size=(cout, cin, k, k)) / math.sqrt(cin * k * k)
        trunk[f"features.{idx}.weight"] = w.astype(np.float32)
        trunk[f"features.{idx}.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
    trunk["classifier.1.weight"] = np.zeros((4, 9216), np.float32)  # ignored
    lins = {f"lin{i}.model.1.weight": np.abs(rng.normal(size=(1, c, 1, 1))).astype(np.float32)
            for i, (_, _, c, _) in enumerate(ALEX)}
    return trunk, lins


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    trunk, lins = _lpips_state(np.random.default_rng(1))
    return (write_state_dict(lins, str(d / "alex.safetensors")),
            write_state_dict(trunk, str(d / "alexnet.safetensors")), trunk, lins)


def test_lpips_loader_invariants_and_layer_math(lpips_files):
    import jax.numpy as jnp

    from qarvd_jax.eval.lpips import load_lpips, lpips_per_frame

    lin_path, trunk_path, trunk, lins = lpips_files
    model = load_lpips(lin_path, trunk_path)
    a = RNG.random((3, 64, 72, 3), dtype=np.float32)
    b = np.clip(a + RNG.normal(0, 0.2, a.shape).astype(np.float32), 0, 1)
    d_ab, d_ba, d_aa = (lpips_per_frame(model, x, y) for x, y in ((a, b), (b, a), (a, a)))
    assert d_ab.shape == (3,) and np.all(d_ab > 0)
    np.testing.assert_allclose(d_ab, d_ba, rtol=1e-5)
    np.testing.assert_allclose(d_aa, 0, atol=1e-9)

    # relu1 against a numpy reference: conv 11x11 / stride 4 / pad 2 + bias, ReLU
    x = (a[:1] * 2 - 1 - np.array([-0.030, -0.088, -0.188], np.float32)) / np.array([0.458, 0.448, 0.450], np.float32)
    xp = np.pad(x[0].astype(np.float64), ((2, 2), (2, 2), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (11, 11), axis=(0, 1))[::4, ::4]  # [h, w, C, 11, 11]
    ref = np.maximum(np.einsum("hwcij,ocij->hwo", win, trunk["features.0.weight"]) + trunk["features.0.bias"], 0)
    feats = model.net(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(feats[0][0]), ref, rtol=1e-4, atol=1e-4)

    # heads: unit-normalise, squared diff, 1x1 conv, bilinear upsample to H x W, sum over layers
    fb = model.net(jnp.asarray((b[:1] * 2 - 1 - np.array([-0.030, -0.088, -0.188], np.float32))
                               / np.array([0.458, 0.448, 0.450], np.float32)))
    total = np.zeros((64, 72))
    for k, (f0, f1) in enumerate(zip(feats, fb)):
        f0, f1 = np.asarray(f0[0], np.float64), np.asarray(f1[0], np.float64)
        d = (f0 / (np.linalg.norm(f0, axis=-1, keepdims=True) + 1e-10)
             - f1 / (np.linalg.norm(f1, axis=-1, keepdims=True) + 1e-10)) ** 2
        m = d @ lins[f"lin{k}.model.1.weight"].reshape(-1)
        sh, sw = 64 / m.shape[0], 72 / m.shape[1]
        total += _torch_bilinear_1d(_torch_bilinear_1d(m.T, 72, sw).T, 64, sh)
    np.testing.assert_allclose(d_ab[0], total.mean(), rtol=1e-4)


def test_lpips_loader_errors(lpips_files, tmp_path):
    from qarvd_jax.eval.lpips import load_lpips

    lin_path, _, trunk, _ = lpips_files
    with pytest.raises(ValueError, match="AlexNet trunk"):
        load_lpips(lin_path)
    bad = dict(trunk)
    bad["features.3.weight"] = bad["features.3.weight"][:, :32]
    bad_path = write_state_dict(bad, str(tmp_path / "bad_alexnet.safetensors"))
    with pytest.raises(ValueError, match=r"bad_alexnet.*features\.3\.weight"):
        load_lpips(lin_path, bad_path)


# ---------------------------------------------------------------------------------------------- I3D

def _conv3d_same_reference(x, w, stride):
    """piergiaj Unit3D padding + Conv3d (no bias) on [T, H, W, C] with torch weight [O, I, kt, kh, kw]."""
    pads = []
    for s, k, st in zip(x.shape[:3], w.shape[2:], stride):
        p = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pads.append((p // 2, p - p // 2))
    xp = np.pad(x, [*pads, (0, 0)])
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(0, 1, 2))
    win = win[::stride[0], ::stride[1], ::stride[2]]  # [T', H', W', C, kt, kh, kw]
    return np.einsum("thwcijk,ocijk->thwo", win, w)


def test_i3d_unit_and_pool_match_reference():
    import jax.numpy as jnp
    from flax import nnx

    from qarvd_jax.eval._weights import assign_strict
    from qarvd_jax.eval.i3d import Unit3D, max_pool3d_same

    unit = Unit3D(3, 5, (3, 3, 3), (2, 2, 2), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    w = rng.normal(size=(5, 3, 3, 3, 3)).astype(np.float32)
    bn = {n: rng.normal(size=5).astype(np.float32) for n in ("weight", "bias", "running_mean")}
    bn["running_var"] = rng.uniform(0.5, 2, 5).astype(np.float32)
    state = {"u.conv3d.weight": w, **{f"u.bn.{k}": v for k, v in bn.items()}}
    assign_strict(unit.slots("u"), state, "test")
    x = rng.normal(size=(7, 9, 10, 3)).astype(np.float32)
    conv = _conv3d_same_reference(x.astype(np.float64), w, (2, 2, 2))
    ref = np.maximum((conv - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"], 0)
    np.testing.assert_allclose(np.asarray(unit(jnp.asarray(x[None])))[0], ref, rtol=1e-4, atol=1e-4)

    y = rng.normal(size=(1, 5, 7, 6, 2)).astype(np.float32) - 1.0  # mostly negative: zero padding shows
    got = np.asarray(max_pool3d_same(jnp.asarray(y), (3, 3, 3), (2, 2, 2)))
    yp = np.pad(y[0], [(1, 1), (1, 1), (0, 1), (0, 0)])  # SAME pads: T 5->(1,1), H 7->(1,1), W 6->(0,1)
    win = np.lib.stride_tricks.sliding_window_view(yp, (3, 3, 3), axis=(0, 1, 2))[::2, ::2, ::2]
    np.testing.assert_array_equal(got[0], win.max(axis=(-3, -2, -1)))
    assert got.shape == (1, 3, 4, 3, 2)


def _i3d_state(rng):
    from qarvd_jax.eval.i3d import MIXED

    state = {}

    def unit(name, cin, cout, k):
        w = rng.normal(size=(cout, cin, *k)) / math.sqrt(cin * np.prod(k))
        state[f"{name}.conv3d.weight"] = w.astype(np.float32)
        for n in ("weight", "bias", "running_mean"):
            state[f"{name}.bn.{n}"] = rng.normal(0, 0.1, cout).astype(np.float32) + (n == "weight")
        state[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        state[f"{name}.bn.num_batches_tracked"] = np.zeros((), np.int64)

    unit("Conv3d_1a_7x7", 3, 64, (7, 7, 7))
    unit("Conv3d_2b_1x1", 64, 64, (1, 1, 1))
    unit("Conv3d_2c_3x3", 64, 192, (3, 3, 3))
    for name, (cin, c) in MIXED.items():
        for b, i, o, k in (("b0", cin, c[0], 1), ("b1a", cin, c[1], 1), ("b1b", c[1], c[2], 3),
                           ("b2a", cin, c[3], 1), ("b2b", c[3], c[4], 3), ("b3b", cin, c[5], 1)):
            unit(f"{name}.{b}", i, o, (k,) * 3)
    state["logits.conv3d.weight"] = (rng.normal(size=(400, 1024, 1, 1, 1)) * 0.03).astype(np.float32)
    state["logits.conv3d.bias"] = rng.normal(size=400).astype(np.float32)
    return state


def test_i3d_loader_and_forward():
    import jax.numpy as jnp

    from qarvd_jax.eval.i3d import i3d_features_jit, i3d_from_state_dict

    state = _i3d_state(np.random.default_rng(3))
    model = i3d_from_state_dict(state)
    np.testing.assert_array_equal(np.asarray(model.Mixed_4c.b1b.conv3d.kernel),
                                  state["Mixed_4c.b1b.conv3d.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.Mixed_5c.b3b.bn.var), state["Mixed_5c.b3b.bn.running_var"])
    x = jnp.asarray(RNG.uniform(-1, 1, (1, 9, 224, 224, 3)).astype(np.float32))
    feats = np.asarray(i3d_features_jit(model, x))
    assert feats.shape == (1, 400) and np.all(np.isfinite(feats))
    # with zero logits weights the features are exactly the bias
    state0 = dict(state, **{"logits.conv3d.weight": np.zeros((400, 1024, 1, 1, 1), np.float32)})
    np.testing.assert_allclose(np.asarray(i3d_features_jit(i3d_from_state_dict(state0), x))[0],
                               state["logits.conv3d.bias"], rtol=1e-6)
    bad = {k: v for k, v in state.items() if not k.startswith("Mixed_3c.b2b")}
    with pytest.raises(ValueError, match=r"missing 'Mixed_3c\.b2b\.conv3d\.weight'"):
        i3d_from_state_dict(bad)


# ------------------------------------------------------------------------------------- end to end

def _write_mp4(path, frames):
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=16, codec="libx264", macro_block_size=1, ffmpeg_log_level="error",
                            output_params=["-pix_fmt", "yuv420p"]) as w:
        for f in frames:
            w.append_data(f)


def _decode(path):
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as r:
        return np.stack([np.asarray(f) for f in r]).astype(np.float32) / 255


def _toy_features(video):  # [T, 224, 224, 3] in [-1, 1] -> [6]
    v = np.asarray(video)
    return np.concatenate([v.mean(axis=(0, 1, 2)), v.std(axis=(0, 1, 2))])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    rng = np.random.default_rng(5)
    stems = {"a red fox-0": 0.0, "a red fox-1": 6.0, "ocean waves-0": 20.0}
    for side in ("ref", "test"):
        for sub in ("videos", "latents"):
            os.makedirs(root / side / sub)
    for i, (stem, noise) in enumerate(stems.items()):
        yy, xx = np.mgrid[0:48, 0:64]
        base = np.stack([(np.sin(xx / 7 + t / 3 + i) * 90 + 128 + np.stack([yy] * 3, -1)[..., 0] * 0.5)
                         for t in range(9)])
        frames = np.stack([base, np.roll(base, 5, axis=2), 255 - base], -1).clip(0, 255).astype(np.uint8)
        noisy = (frames + rng.normal(0, noise, frames.shape)).clip(0, 255).astype(np.uint8)
        lat = rng.normal(size=(6, 4, 6, 8)).astype(np.float32)
        _write_mp4(str(root / "ref" / "videos" / f"{stem}.mp4"), frames)
        np.savez(root / "ref" / "latents" / f"{stem}.npz", latents=lat, chunk_frames=3)
        if stem != "ocean waves-0":  # reference-only stem
            _write_mp4(str(root / "test" / "videos" / f"{stem}.mp4"), noisy)
            drift = rng.normal(0, 0.05 * (1 + noise), lat.shape) * np.arange(1, 7)[:, None, None, None]
            lat_t = (lat + drift).astype(np.float32)  # error grows chunk by chunk
            np.savez(root / "test" / "latents" / f"{stem}.npz", latents=lat_t, chunk_frames=3)
    return root


def test_evaluate_folders_end_to_end(folders, lpips_files, tmp_path, caplog):
    from qarvd_jax.eval.lpips import load_lpips, lpips_per_frame
    from qarvd_jax.eval.report import evaluate_folders

    lin_path, trunk_path, *_ = lpips_files
    out = tmp_path / "report"
    with caplog.at_level(logging.WARNING):
        rep = evaluate_folders(folders / "ref", folders / "test", out, lpips_weights=lin_path,
                               alexnet_weights=trunk_path, fvd_features=_toy_features, progress=False)
    assert "ocean waves-0" in caplog.text and "only in the reference" in caplog.text
    assert rep["unpaired"]["videos"]["ref_only"] == ["ocean waves-0"]
    assert rep["unpaired"]["latents"]["ref_only"] == ["ocean waves-0"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(rep))
    assert set(on_disk) == {"settings", "notes", "unpaired", "per_video", "aggregate"}
    assert sorted(on_disk["per_video"]) == ["a red fox-0", "a red fox-1"]

    lpips = load_lpips(lin_path, trunk_path)
    feats = {"ref": [], "test": []}
    for stem, v in on_disk["per_video"].items():
        r, t = (_decode(str(folders / s / "videos" / f"{stem}.mp4")) for s in ("ref", "test"))
        np.testing.assert_allclose(v["psnr_per_frame"], _psnr_reference(r, t), rtol=1e-6)
        np.testing.assert_allclose(v["ssim_per_frame"], _ssim_reference(r, t), rtol=1e-10)
        np.testing.assert_allclose(v["lpips_per_frame"], lpips_per_frame(lpips, r, t), rtol=1e-5)
        assert v["psnr"] == pytest.approx(np.mean(v["psnr_per_frame"]))
        zr, zt = (np.load(folders / s / "latents" / f"{stem}.npz") for s in ("ref", "test"))
        lr, lt = zr["latents"].astype(np.float64), zt["latents"].astype(np.float64)
        mse = [np.mean((lr[i:i + 3] - lt[i:i + 3]) ** 2) for i in (0, 3)]
        np.testing.assert_allclose(v["latent_mse_per_chunk"], mse, rtol=1e-10)
        rng_ = lr.max() - lr.min()
        np.testing.assert_allclose(v["latent_psnr_per_chunk"], 10 * np.log10(rng_ ** 2 / np.array(mse)), rtol=1e-6)
        for side, vid in (("ref", r), ("test", t)):
            feats[side].append(_toy_features(M.fvd_preprocess(vid)))
    agg = on_disk["aggregate"]
    stems = list(on_disk["per_video"])
    assert agg["psnr"] == pytest.approx(np.mean([on_disk["per_video"][s]["psnr"] for s in stems]))
    assert agg["lpips_fp"] == pytest.approx(np.mean([on_disk["per_video"][s]["lpips"] for s in stems]))
    np.testing.assert_allclose(agg["latent_mse_per_chunk"],
                               np.mean([on_disk["per_video"][s]["latent_mse_per_chunk"] for s in stems], axis=0))
    assert agg["fvd_fp"] == pytest.approx(M.frechet_distance(np.stack(feats["test"]), np.stack(feats["ref"])),
                                          rel=1e-5, abs=1e-9)
    assert agg["num_video_pairs"] == 2 and agg["num_latent_pairs"] == 2
    # the noisier stem is worse on every metric
    v0, v1 = (on_disk["per_video"][s] for s in stems)
    assert v0["psnr"] > v1["psnr"] and v0["ssim"] > v1["ssim"] and v0["latent_mse"] < v1["latent_mse"]
    for name in ("error_per_chunk.png", "psnr_ssim_per_frame.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "a red fox-1" in md and "ocean waves-0" in md and "FVD-FP" in md


def test_evaluate_missing_subfolder_and_no_pairs(folders, tmp_path):
    import shutil

    from qarvd_jax.eval.report import evaluate_folders

    lat_only = tmp_path / "lat_only"
    shutil.copytree(folders / "test" / "latents", lat_only / "latents")
    rep = evaluate_folders(folders / "ref", lat_only, tmp_path / "r1", progress=False)
    assert any("no videos/ subfolder" in n for n in rep["notes"])
    assert rep["aggregate"]["psnr"] is None and rep["aggregate"]["num_latent_pairs"] == 2
    assert rep["aggregate"]["fvd_fp"] is None and rep["aggregate"]["lpips_fp"] is None
    other = tmp_path / "other"
    os.makedirs(other / "latents")
    np.savez(other / "latents" / "unrelated-0.npz", latents=np.zeros((3, 4, 6, 8), np.float32), chunk_frames=3)
    with pytest.raises(ValueError, match="no stem is present in both"):
        evaluate_folders(folders / "ref", other, tmp_path / "r2", progress=False)


def test_cli_evaluate(folders, tmp_path, capsys):
    from qarvd_jax.cli import evaluate_cmd

    ap = argparse.ArgumentParser()
    evaluate_cmd.register(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["evaluate", "--ref", str(folders / "ref"), "--test", str(folders / "test"),
                          "--out", str(tmp_path / "cli"), "--no-progress"])
    assert args.func(args) == 0
    assert str(tmp_path / "cli" / "report.md") in capsys.readouterr().out
    assert (tmp_path / "cli" / "report.json").is_file()
