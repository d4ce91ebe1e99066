"""umT5-XXL text encoder of Wan (``models_t5_umt5-xxl-enc-bf16.pth``) and its tokenizer.

:class:`UMT5Encoder` is the official ``T5Encoder`` in plain PyTorch: ``state_dict()`` is the
published file's layout (docs/models.md, umT5; fingerprint ``9c8818c2cbea55eca56c7b447df170da``), so
``torch.load(path, mmap=True, weights_only=True)`` loads with ``load_state_dict(strict=True)``
and no key map.  (``transformers.UMT5EncoderModel`` computes the same function, see the tests,
but its ``state_dict()`` holds the tied embedding twice, ``shared`` and ``encoder.embed_tokens``,
which a one-key-to-one-key loader cannot fill; :func:`official_to_transformers` maps the names
for anyone who loads the file into it.)

Math: pre-norm layers with T5 RMS norms (variance in float32), attention without
the 1/√d scale and with a relative-position bias table per layer, masked keys at the dtype's
minimum, softmax in float32, gated-GELU(tanh) FFN, a final norm, no embedding scaling.

:class:`WanPromptEncoder` is the official ``T5EncoderModel.__call__``: clean the text, tokenize
with EOS, pad/truncate to 512, run the encoder with the padding mask, and zero every row after
each prompt's length.  The DiT then sees all 512 rows (zeros included).
"""
from __future__ import annotations

import html
import math
import os
import re
import string
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "UMT5Config",
    "UMT5Encoder",
    "WanPromptEncoder",
    "TOKENIZER_SUBDIR",
    "T5_CHECKPOINT",
    "load_tokenizer",
    "tiny_tokenizer",
    "clean_prompt",
    "relative_position_bucket",
    "official_to_transformers",
]

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = "google/umt5-xxl"


@dataclass(frozen=True)
class UMT5Config:
    """Encoder hyper-parameters; the defaults are umT5-XXL as Wan ships it."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"UMT5Config: dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def xxl(cls) -> "UMT5Config":
        return cls()

    @classmethod
    def tiny(cls, **overrides: Any) -> "UMT5Config":
        """CPU-sized encoder whose vocabulary covers :func:`tiny_tokenizer`."""
        return replace(cls(vocab_size=128, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2), **overrides)


# ---------------------------------------------------------------------------------------------
# Layers (official module names)


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of ``rel_pos = key position - query position``.

    Half the buckets are for positive offsets; within a half, offsets below half of it are
    exact and the rest are log-spaced up to ``max_distance``.
    """
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    n = rel_pos.abs()
    max_exact = half // 2
    # n = 0 gives log(0) = -inf here; torch.where below never selects it.
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction; variance in float32, cast to a half weight's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeEmbedding(nn.Module):
    """Per-layer relative-position bias: ``forward(lq, lk) -> (1, heads, lq, lk)``."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> torch.Tensor:
        device = self.embedding.weight.device
        rel_pos = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
        bias = self.embedding(relative_position_bucket(rel_pos, self.num_buckets, self.max_distance))
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_bias: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, -1))
        k = self.k(x).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        bias = pos_bias.to(x.dtype).expand(x.shape[0], -1, -1, -1)
        if mask is not None:
            bias = bias.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        # No 1/sqrt(d): T5 folds it into the initialisation.
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias
        weights = F.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.einsum("bnij,bjnc->binc", weights, v)
        return self.o(out.flatten(2))


class T5FeedForward(nn.Module):
    """``fc2(fc1(x) * GELU_tanh(gate(x)))``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class UMT5Block(nn.Module):
    """One encoder layer (official ``T5SelfAttention``), with its own relative-position table."""

    def __init__(self, c: UMT5Config):
        super().__init__()
        self.norm1 = T5LayerNorm(c.dim, c.eps)
        self.attn = T5Attention(c.dim, c.dim_attn, c.num_heads)
        self.norm2 = T5LayerNorm(c.dim, c.eps)
        self.ffn = T5FeedForward(c.dim, c.dim_ffn)
        self.pos_embedding = T5RelativeEmbedding(c.num_buckets, c.num_heads, c.max_distance)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        pos_bias = self.pos_embedding(x.shape[1], x.shape[1])
        x = x + self.attn(self.norm1(x), mask, pos_bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """umT5 encoder: ``forward(ids: (B, L) long, mask: (B, L) or None) -> (B, L, dim)``.

    Rows at padded positions are whatever the encoder computes there; :class:`WanPromptEncoder`
    zeroes them as the official pipeline does.
    """

    _repeated_blocks = ("UMT5Block",)

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(UMT5Block(config) for _ in range(config.num_layers))
        self.norm = T5LayerNorm(config.dim, config.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def official_to_transformers(key: str) -> str | None:
    """Official umT5 key -> ``transformers.UMT5EncoderModel`` key (docs/models.md, umT5).

    ``token_embedding.weight`` maps to ``shared.weight``; transformers ties
    ``encoder.embed_tokens.weight`` to it.
    """
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m is None:
        return None
    n, rest = m.groups()
    table = {
        "norm1.weight": "layer.0.layer_norm.weight",
        "attn.q.weight": "layer.0.SelfAttention.q.weight",
        "attn.k.weight": "layer.0.SelfAttention.k.weight",
        "attn.v.weight": "layer.0.SelfAttention.v.weight",
        "attn.o.weight": "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight": "layer.1.layer_norm.weight",
        "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
    }
    return f"encoder.block.{n}.{table[rest]}" if rest in table else None


# ---------------------------------------------------------------------------------------------
# Tokenizer and prompt encoding


def clean_prompt(text: str) -> str:
    """Official cleaning: ftfy (when installed), HTML-unescape twice, strip, collapse whitespace."""
    try:
        import ftfy
    except ImportError:  # ftfy only repairs mojibake; plain text is unchanged without it
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
"""Either file lets transformers build the umT5 tokenizer (the published folder has both)."""


def load_tokenizer(weights_dir: str | os.PathLike):
    """The Hugging Face tokenizer in ``<weights_dir>/google/umt5-xxl`` (padding on the right)."""
    from transformers import AutoTokenizer

    path = os.path.join(os.fspath(weights_dir), TOKENIZER_SUBDIR)
    if not os.path.isdir(path):
        from core.errors import WeightsError

        raise WeightsError(f"umT5 tokenizer folder {path!r} does not exist (expected {TOKENIZER_SUBDIR}/ in {weights_dir!r})")
    present = sorted(os.listdir(path))
    if not any(name in present for name in TOKENIZER_FILES):
        from core.errors import WeightsError

        raise WeightsError(
            f"umT5 tokenizer folder {path!r} holds {present or 'nothing'}; expected {' or '.join(TOKENIZER_FILES)} "
            f"(with tokenizer_config.json and special_tokens_map.json), as in the google/umt5-xxl repository"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises ValueError/OSError/... without naming the folder
        from core.errors import WeightsError

        raise WeightsError(f"cannot load the umT5 tokenizer from {path!r}: {type(exc).__name__}: {exc}") from exc
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_tokenizer(model_max_length: int = 512):
    """A deterministic character-level tokenizer built in code, for the tiny preset and tests.

    T5 conventions: ``<pad>`` 0, ``</s>`` 1 (appended to every sequence), ``<unk>`` 2, and a
    SentencePiece-style ``▁`` word marker; 98 tokens, so it fits ``UMT5Config.tiny()``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(ch, -3.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length,
    )
    tokenizer.padding_side = "right"
    return tokenizer


class WanPromptEncoder:
    """Prompts -> umT5 context ``(B, text_len, dim)`` with zero rows after each prompt's tokens."""

    def __init__(self, encoder: UMT5Encoder, tokenizer, text_len: int | None = None):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.text_len = text_len or encoder.config.text_len

    def tokenize(self, prompts: Sequence[str], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``, both ``(B, text_len)``: EOS appended, truncated and right-padded."""
        if isinstance(prompts, str):
            raise TypeError("WanPromptEncoder expects a list of prompts, got a single string")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
            max_length=self.text_len, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        device = self.encoder.token_embedding.weight.device
        ids, mask = self.tokenize(prompts, device)
        out = self.encoder(ids, mask)
        return out.masked_fill(mask[..., None] == 0, 0)

    __call__ = encode
