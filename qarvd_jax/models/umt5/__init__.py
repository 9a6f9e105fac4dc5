"""umT5 text encoder of Wan2.1 / Self-Forcing in Flax NNX, with tokenizer front end and embedding cache.

Quick start (tiny random model, no files needed)::

    from flax import nnx
    from qarvd_jax.models.umt5 import UMT5Config, UMT5Encoder, ToyTokenizer

    cfg = UMT5Config.tiny()
    model = UMT5Encoder(cfg, rngs=nnx.Rngs(0))
    ids, mask = ToyTokenizer(cfg.vocab_size, cfg.text_len)(["a red fox runs"])
    prompt_embeds = model.encode_prompts(ids, mask)          # [1, 512, 64], rows >= seq_len are 0

Real model: ``load_umt5(".../models_t5_umt5-xxl-enc-bf16.pth")`` and
``UMT5Tokenizer.from_file(".../google/umt5-xxl/tokenizer.json")``.
"""

from qarvd_jax.models.umt5.config import EOS_ID, PAD_ID, UNK_ID, UMT5Config
from qarvd_jax.models.umt5.embed_cache import PromptEmbedCache, encode_with_cache, encoder_fingerprint
from qarvd_jax.models.umt5.model import (
    UMT5Encoder,
    encode_prompts,
    encoder_forward,
    gelu_tanh,
    make_prompt_encoder,
    relative_position_bucket,
)
from qarvd_jax.models.umt5.params import (
    iter_torch_state_dict,
    load_state_dict_into,
    load_umt5,
    to_torch_state_dict,
    umt5_param_specs,
    validate_state_dict,
)
from qarvd_jax.models.umt5.tokenizer import (
    PromptTruncatedWarning,
    Tokenized,
    ToyTokenizer,
    UMT5Tokenizer,
    clean_prompt,
)

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "UMT5Config",
    "UMT5Encoder",
    "encoder_forward",
    "encode_prompts",
    "make_prompt_encoder",
    "relative_position_bucket",
    "gelu_tanh",
    "load_umt5",
    "load_state_dict_into",
    "validate_state_dict",
    "umt5_param_specs",
    "to_torch_state_dict",
    "iter_torch_state_dict",
    "UMT5Tokenizer",
    "ToyTokenizer",
    "Tokenized",
    "PromptTruncatedWarning",
    "clean_prompt",
    "PromptEmbedCache",
    "encode_with_cache",
    "encoder_fingerprint",
]
