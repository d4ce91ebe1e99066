"""umT5 encoder: official key layout, loading an official-layout checkpoint, prompt encoding, and
parity with transformers' independent ``UMT5EncoderModel`` (float32, same weights via
``official_to_transformers``; max abs error <= 1e-5 relative to the output scale, float32 rounding)."""
from __future__ import annotations

import math

import pytest
import torch

from plugins.wan.text_encoder import (
    T5_CHECKPOINT,
    TOKENIZER_SUBDIR,
    UMT5Config,
    UMT5Encoder,
    WanPromptEncoder,
    clean_prompt,
    load_tokenizer,
    official_to_transformers,
    relative_position_bucket,
    tiny_tokenizer,
)

import transformers  # noqa: E402  (a dependency: the tokenizer; here also the parity reference)
from tests.fingerprints import fingerprint


def test_xxl_official_key_layout():
    with torch.device("meta"):
        sd = UMT5Encoder(UMT5Config.xxl()).state_dict()
    assert len(sd) == 242
    assert round(sum(v.numel() for v in sd.values()) / 1e9, 3) == 5.681
    assert fingerprint(sd) == "9c8818c2cbea55eca56c7b447df170da"
    assert sd["blocks.23.pos_embedding.embedding.weight"].shape == (32, 64)


def test_bucket_function_matches_models_md():
    def f(n):  # docs/models.md, umT5: one half of the buckets
        return n if n < 8 else min(15, 8 + math.floor(math.log(n / 8) / math.log(128 / 8) * 8))

    rel = torch.arange(-300, 301)
    expected = torch.tensor([16 * (r > 0) + f(abs(r)) for r in rel.tolist()])
    assert torch.equal(relative_position_bucket(rel), expected)


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp; b \n\t c  ") == "a & b c"


@pytest.fixture()
def checkpoint_dir(tmp_path):
    """An official-layout checkpoint directory at tiny size: bf16 ``.pth`` + tokenizer folder."""
    torch.manual_seed(0)
    model = UMT5Encoder(UMT5Config.tiny())
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, tmp_path / T5_CHECKPOINT)
    tiny_tokenizer().save_pretrained(tmp_path / TOKENIZER_SUBDIR)
    return tmp_path


def load_encoder(weights_dir, dtype=torch.float32):
    sd = torch.load(weights_dir / T5_CHECKPOINT, mmap=True, weights_only=True)
    with torch.device("meta"):
        model = UMT5Encoder(UMT5Config.tiny())
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(dtype).eval()


def test_encode_from_official_layout(checkpoint_dir):
    encoder = WanPromptEncoder(load_encoder(checkpoint_dir), load_tokenizer(checkpoint_dir))
    prompts = ["a red fox in the snow", "Hi!"]
    out = encoder.encode(prompts)
    assert out.shape == (2, 512, 32) and out.dtype == torch.float32
    ids, mask = encoder.tokenize(prompts)
    lengths = mask.sum(1).tolist()
    assert lengths == [len("a red fox in the snow") + 2, len("Hi!") + 2]  # one token per char, a leading "▁", EOS
    assert ids[0, lengths[0] - 1] == 1 and ids[1, lengths[1] - 1] == 1  # EOS last
    for row, n in zip(out, lengths):
        assert torch.all(row[n:] == 0)
        assert torch.all(row[:n].abs().sum(-1) > 0)
    assert torch.equal(out, encoder.encode(prompts))  # deterministic
    # The mask is used inside the encoder: a prompt's rows do not depend on its batch companions.
    torch.testing.assert_close(encoder.encode(["Hi!"])[0], out[1], rtol=1e-5, atol=1e-6)


def test_tokenize_truncates_to_text_len(checkpoint_dir):
    encoder = WanPromptEncoder(load_encoder(checkpoint_dir), load_tokenizer(checkpoint_dir))
    ids, mask = encoder.tokenize(["x" * 2000])
    assert ids.shape == (1, 512) and bool(mask.all())


def test_parity_with_transformers_umt5(checkpoint_dir):
    ours = load_encoder(checkpoint_dir)
    c = ours.config
    hf_config = transformers.UMT5Config(
        vocab_size=c.vocab_size, d_model=c.dim, d_kv=c.dim_attn // c.num_heads, d_ff=c.dim_ffn,
        num_layers=c.num_layers, num_heads=c.num_heads, relative_attention_num_buckets=c.num_buckets,
        relative_attention_max_distance=c.max_distance, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=c.eps, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
    )
    theirs = transformers.UMT5EncoderModel(hf_config).eval()
    mapped = {official_to_transformers(k): v for k, v in ours.state_dict().items()}
    assert None not in mapped
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    assert set(missing) <= {"encoder.embed_tokens.weight"} and not unexpected
    assert torch.equal(theirs.encoder.embed_tokens.weight, ours.token_embedding.weight)  # tied

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, c.vocab_size, (2, 200), generator=g)  # offsets past max_distance
    mask = torch.ones_like(ids)
    mask[1, 57:] = 0
    with torch.no_grad():
        out = ours(ids, mask)
        ref = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


def test_bf16_encode_runs(checkpoint_dir):
    encoder = WanPromptEncoder(load_encoder(checkpoint_dir, torch.bfloat16), load_tokenizer(checkpoint_dir))
    out = encoder.encode(["a cat"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.all(out[0, len("a cat") + 2:] == 0)
