"""umT5 text encoder: fixture parity, params, tokenizer front end, embedding cache."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from convert.state_dict_io import read_state_dict
from qarvd_jax.models.umt5 import (
    PromptTruncatedWarning,
    ToyTokenizer,
    UMT5Config,
    UMT5Encoder,
    UMT5Tokenizer,
    clean_prompt,
    encode_prompts,
    encode_with_cache,
    encoder_fingerprint,
    load_umt5,
    make_prompt_encoder,
    relative_position_bucket,
    to_torch_state_dict,
    umt5_param_specs,
    validate_state_dict,
)
from qarvd_jax.models.umt5.embed_cache import PromptEmbedCache
from qarvd_jax.models.umt5.parity import verify_fixture
from qarvd_jax.utils.parity import format_reports

FIXTURE = Path(__file__).parent / "fixtures" / "umt5_tiny"


@pytest.fixture(scope="module")
def arrays():
    with np.load(FIXTURE / "arrays.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def fixture_cfg():
    return json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def state():
    return read_state_dict(FIXTURE / "weights.pth")


@pytest.fixture(scope="module")
def model():
    return load_umt5(FIXTURE / "weights.pth", UMT5Config.tiny(), dtype=jnp.bfloat16)


# ----------------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("param_dtype", [np.float32, ml_dtypes.bfloat16])
def test_fixture_parity(param_dtype):
    reports = verify_fixture(FIXTURE, param_dtype=param_dtype)
    assert [r.name for r in reports] == ["rel_bucket", "block_outputs", "hidden_states", "hidden_states_all",
                                         "prompt_embeds"]
    assert all(r.passed for r in reports), format_reports(reports)
    assert reports[0].max_abs == 0.0


def test_bucket_function(arrays):
    got = np.asarray(relative_position_bucket(arrays["rel_pos"]))
    np.testing.assert_array_equal(got, arrays["rel_bucket"])
    # structure: exact buckets below 8, +16 for keys after the query, saturating at 15 / 31
    assert list(np.asarray(relative_position_bucket(np.array([0, 1, 7, -1, -7, 128, 10_000, -10_000])))) == \
        [0, 17, 23, 1, 7, 31, 31, 15]
    # 2D table as the bias uses it: bucket(j - i)
    table = np.asarray(relative_position_bucket(np.arange(5)[None, :] - np.arange(5)[:, None]))
    assert table[0, 4] == 20 and table[4, 0] == 4 and (np.diag(table) == 0).all()


def test_prompt_embeds_zeroing_and_trim(model, arrays):
    ids, mask = arrays["ids"], arrays["mask"]
    full = np.asarray(encode_prompts(model, ids, mask))
    seq = arrays["seq_lens"]
    for b in range(len(seq)):
        assert (full[b, seq[b]:] == 0).all() and (np.abs(full[b, :seq[b]]).sum(-1) > 0).all()
    # running only up to max(seq_len) (padding invariance) gives the same result to float rounding
    trimmed = np.asarray(encode_prompts(model, ids, mask, pad_multiple=16))
    assert trimmed.shape == full.shape
    np.testing.assert_allclose(trimmed, full, atol=2e-5)
    assert (trimmed[0, seq[0]:] == 0).all()


def test_bf16_compute_close(arrays):
    m = load_umt5(FIXTURE / "weights.pth", UMT5Config.tiny(compute_dtype=jnp.bfloat16), dtype=jnp.bfloat16)
    pe = encode_prompts(m, arrays["ids"], arrays["mask"])
    assert pe.dtype == jnp.bfloat16
    err = np.abs(np.asarray(pe.astype(jnp.float32)) - arrays["prompt_embeds"])
    assert err.max() < 0.15 and err.mean() < 0.02  # reference bf16-vs-f32: 0.049 max, 0.009 mean


# ----------------------------------------------------------------------------------------- params

def test_param_round_trip_bit_exact(model, state):
    out = to_torch_state_dict(model)
    assert list(out) == list(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype == ml_dtypes.bfloat16 and out[k].shape == v.shape, k
        np.testing.assert_array_equal(out[k].view(np.uint16), v.view(np.uint16), err_msg=k)
    # float32 params hold the exact upcast; exporting as bf16 gives the file back bit for bit
    m32 = load_umt5(state, UMT5Config.tiny(), dtype=jnp.float32)
    out32 = to_torch_state_dict(m32, dtype=jnp.bfloat16)
    assert all((out32[k].view(np.uint16) == v.view(np.uint16)).all() for k, v in state.items())
    assert to_torch_state_dict(m32)["norm.weight"].dtype == np.float32


def test_layouts_match_checkpoints(fixture_cfg):
    tiny = {k: list(s.torch_shape) for k, s in umt5_param_specs(UMT5Config.tiny()).items()}
    assert tiny == fixture_cfg["weights"]["keys"]
    assert UMT5Config.tiny().param_count() == fixture_cfg["tiny_param_count"]
    xxl = UMT5Config.umt5_xxl()
    assert UMT5Config.from_original(fixture_cfg["real_model"]["cfg"], param_dtype=jnp.bfloat16,
                                    compute_dtype=jnp.bfloat16) == xxl
    assert {k: list(s.torch_shape) for k, s in umt5_param_specs(xxl).items()} == \
        fixture_cfg["real_model"]["state_dict_layout"]
    assert xxl.param_count() == fixture_cfg["real_model"]["param_count"] == 5_680_910_336
    # the abstract XXL model (no memory) has exactly these parameters, kept in bf16
    abstract = nnx.eval_shape(lambda: UMT5Encoder(xxl, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert len(leaves) == 242 and sum(x.size for x in leaves) == xxl.param_count()
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_bad_state_dict_errors(state):
    cfg = UMT5Config.tiny()
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.k.weight"}
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.attn\.k\.weight"):
        load_umt5(missing, cfg)
    extra = dict(state, **{"encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys: encoder\.extra\.weight"):
        validate_state_dict(extra, cfg)
    bad = dict(state, **{"blocks.2.ffn.fc2.weight": np.zeros((160, 64), np.float32)})
    with pytest.raises(ValueError, match=r"blocks\.2\.ffn\.fc2\.weight has shape \[160, 64\], expected \[64, 160\]"):
        load_umt5(bad, cfg)
    with pytest.raises(ValueError, match="missing keys"):  # wrong config for the file
        load_umt5(state, cfg.replace(num_layers=4))
    with pytest.raises(FileNotFoundError):
        load_umt5(FIXTURE / "nope.pth", cfg)


def test_bad_inputs_and_config(model):
    with pytest.raises(ValueError, match="ids must be"):
        model(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="ids must be integers"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="mask shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="right-padded"):
        encode_prompts(model, np.ones((1, 32), np.int32), np.r_[np.zeros(31), 1][None].astype(np.int32),
                       pad_multiple=8)
    with pytest.raises(ValueError, match="divisible"):
        UMT5Config.tiny(num_heads=5)
    with pytest.raises(ValueError, match="not a dtype"):
        UMT5Config.tiny(param_dtype="nope")


# -------------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("raw, want", [
    ("  A  red\tfox\n\njumps  ", "A red fox jumps"),
    ("Tom &amp; Jerry", "Tom & Jerry"),
    ("Tom &amp;amp; Jerry &lt;3", "Tom & Jerry <3"),  # double-escaped: unescaped twice
    ("caf\u00c3\u00a9 \u00a0 cr\u00e8me", "caf\u00e9 cr\u00e8me"),  # ftfy mojibake fix, NBSP collapsed
    ("Keep CASE, punctuation!", "Keep CASE, punctuation!"),
    ("\u3000ideographic\u2003space\u2029", "ideographic space"),
])
def test_clean_prompt(raw, want):
    assert clean_prompt(raw) == want


def test_clean_modes():
    assert clean_prompt("A_B, c!", "canonicalize") == "a b c"
    assert clean_prompt("  Hi  There ", "lower") == "hi there"
    assert clean_prompt(" x ", None) == " x "
    with pytest.raises(ValueError, match="unknown clean mode"):
        clean_prompt("x", "bogus")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A tiny WordLevel tokenizer.json with umT5's special ids and a T5-style '$A </s>' post-processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["a", "red", "fox", "jumps", "over", "the", "lazy", "dog", "&", "<", ",", "!"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_matches_hf_behaviour(tokenizer_json):
    from tokenizers import Tokenizer

    prompts = ["a red fox", "The lazy dog &amp;amp; a fox!", "  a   zebra  ", "", "a red fox jumps over the lazy dog"]
    text_len = 8
    tok = UMT5Tokenizer.from_file(tokenizer_json, text_len=text_len)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, mask = tok(prompts)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (5, text_len)
    assert ids[0, :4].tolist() == [3, 4, 5, 1] and (ids[0, 4:] == 0).all() and mask[0].tolist() == [1] * 4 + [0] * 4
    assert ids[2, :3].tolist() == [3, 2, 1]  # unknown word -> <unk>
    assert ids[3, 0] == 1 and mask[3].sum() == 1  # empty prompt is just </s>
    # reference: the tokenizers library's own padding + truncation + post-processor on cleaned text
    ref = Tokenizer.from_file(str(tokenizer_json))
    ref.enable_truncation(max_length=text_len)
    ref.enable_padding(length=text_len, pad_id=0, pad_token="<pad>")
    encs = ref.encode_batch([clean_prompt(p) for p in prompts], add_special_tokens=True)
    np.testing.assert_array_equal(ids, np.array([e.ids for e in encs]))
    np.testing.assert_array_equal(mask, np.array([e.attention_mask for e in encs]))
    assert ids[4, -1] == 1  # truncated: </s> kept last
    msgs = [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    assert len(msgs) == 1 and "prompt 4 has 9 tokens" in msgs[0]


def test_tokenizer_from_folder_and_errors(tokenizer_json, tmp_path):
    tok = UMT5Tokenizer.from_file(tokenizer_json.parent, text_len=4)
    assert tok("fox").ids.tolist() == [[5, 1, 0, 0]]
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        UMT5Tokenizer.from_file(tmp_path)
    with pytest.raises(TypeError):
        tok(["ok", 3])


def test_toy_tokenizer():
    tok = ToyTokenizer(vocab_size=512, text_len=16)
    ids, mask = tok(["A red fox, a red fox!", "A  red &amp; fox"])
    assert ids.dtype == np.int32 and ids.shape == (2, 16)
    n = mask.sum(1)
    assert n.tolist() == [9, 5]  # pieces + </s>
    assert ids[0, 0] != ids[0, 4] and ids[0, 1] == ids[0, 5] and ids[0, 2] == ids[0, 6]  # case-sensitive, repeatable
    assert (ids[0, :8] >= 3).all() and (ids < 512).all() and ids[0, 8] == 1 and (ids[0, 9:] == 0).all()
    again = ToyTokenizer(vocab_size=512, text_len=16)(["A red fox, a red fox!"])
    np.testing.assert_array_equal(again.ids[0], ids[0])
    with pytest.warns(PromptTruncatedWarning, match="prompt 0 has 21 tokens"):
        short = ToyTokenizer(text_len=8)(["w " * 20])
    assert short.ids[0, -1] == 1 and short.mask.all()


def test_toy_pipeline_runs():
    cfg = UMT5Config.tiny(text_len=32)
    model = UMT5Encoder(cfg, rngs=nnx.Rngs(0))
    encode = make_prompt_encoder(model, ToyTokenizer(cfg.vocab_size, cfg.text_len), batch_size=1)
    out = encode(["a red fox", "a slow turtle crosses the road"])
    assert out.shape == (2, 32, 64) and np.isfinite(out).all()
    assert (out[0, 4:] == 0).all() and (out[1, 7:] == 0).all() and (out[1, :7] != 0).any(-1).all()


# ------------------------------------------------------------------------------------------ cache

def test_embed_cache(tmp_path):
    calls = []
    rng = np.random.default_rng(0)

    def encode(prompts):
        calls.append(list(prompts))
        out = rng.standard_normal((len(prompts), 16, 8)).astype(np.float32)
        out[:, 5:] = 0
        return out

    prompts = ["a red fox", "a  red fox ", "the dog", "Tom &amp; Jerry"]
    first = encode_with_cache(prompts, encode, tmp_path / "c", "enc-A", text_len=16)
    assert first.shape == (4, 16, 8) and first.dtype == np.float32
    assert calls == [["a red fox", "the dog", "Tom &amp; Jerry"]]  # same cleaned prompt encoded once
    np.testing.assert_array_equal(first[0], first[1])
    assert len(list((tmp_path / "c").glob("*.npz"))) == 3 and not list((tmp_path / "c").glob(".tmp-*"))
    second = encode_with_cache(["Tom & Jerry", "the dog"], encode, tmp_path / "c", "enc-A", text_len=16)
    assert len(calls) == 1  # all hits: the encoder is not invoked
    np.testing.assert_array_equal(second, first[[3, 2]])  # trailing zero rows restored bit for bit
    encode_with_cache(["the dog"], encode, tmp_path / "c", "enc-B", text_len=16)
    assert calls[-1] == ["the dog"]  # another encoder id misses
    encode_with_cache(["the dog"], encode, tmp_path / "c", "enc-A", text_len=16, dtype=jnp.bfloat16)
    assert len(calls) == 3  # so does another dtype
    with pytest.raises(ValueError, match="encode_fn returned shape"):
        encode_with_cache(["new"], lambda p: np.zeros((1, 15, 8)), tmp_path / "c", "enc-A", text_len=16)


def test_embed_cache_bf16_and_corruption(tmp_path):
    cache = PromptEmbedCache(tmp_path, "enc", text_len=6, dtype=jnp.bfloat16)
    emb = np.zeros((6, 4), ml_dtypes.bfloat16)
    emb[:3] = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    path = cache.put("hello", emb)
    got = cache.get("hello")
    assert got.dtype == ml_dtypes.bfloat16 and (got.view(np.uint16) == emb.view(np.uint16)).all()
    with np.load(path) as z:
        assert z["embeds"].shape == (3, 4)  # stored without trailing zero rows
    Path(path).write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        assert cache.get("hello") is None
    assert cache.get("never stored") is None


def test_encoder_fingerprint(tmp_path):
    f = tmp_path / "ckpt.pth"
    f.write_bytes(b"1234")
    a = encoder_fingerprint(f, None, extra="bf16")
    assert str(f) in a and "|4|" in a and a.endswith("bf16")
    os.utime(f, ns=(1, 1))
    assert encoder_fingerprint(f, extra="bf16") != a
