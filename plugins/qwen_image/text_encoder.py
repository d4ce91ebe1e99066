"""Qwen-Image's text encoder: the text path of Qwen2.5-VL-7B through transformers.

The component is ``transformers.Qwen2_5_VLTextModel`` (the language model without the vision
tower and ``lm_head``, which text-to-image never runs). The published ``text_encoder/`` shards
hold the *older* transformers key layout of the whole ``Qwen2_5_VLForConditionalGeneration``
(729 tensors): ``model.embed_tokens``, ``model.layers.N.*``, ``model.norm``, ``visual.*``,
``lm_head.weight``. :func:`text_model_key` is the ``WeightFile.key_map``: it maps the language
model's keys (older or current ``model.language_model.*`` naming) onto ``Qwen2_5_VLTextModel``
and skips the vision tower and ``lm_head``, so they are never read.

Prompt encoding (the official diffusers pipeline): the prompt goes into :data:`PROMPT_TEMPLATE`,
is tokenized (at most ``1024 + 34`` tokens), runs through the model with causal attention, and
the final hidden state (after ``norm``) is kept for the real tokens only, minus the template's
first :data:`DROP_TOKENS` tokens (the system prefix through ``user\\n``). Each prompt is encoded
alone, so there is no padding anywhere.

The tiny preset uses a tiny config of the same classes and :func:`tiny_tokenizer`, a byte-level
BPE built in code with the real tokenizer's pre-tokenizer pattern and special tokens, whose
vocabulary holds the template's words so its system prefix is also exactly 34 tokens.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PROMPT_TEMPLATE",
    "DROP_TOKENS",
    "MAX_PROMPT_TOKENS",
    "TRAINED_PROMPT_TOKENS",
    "QWEN25VL_7B_CONFIG",
    "tiny_text_encoder_config",
    "build_config",
    "build_text_model",
    "full_model_state",
    "text_model_key",
    "tiny_tokenizer",
    "load_tokenizer",
    "QwenPromptEncoder",
]

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
DROP_TOKENS = 34
"""Template tokens dropped from the front of the hidden states (the official pipeline's constant)."""
MAX_PROMPT_TOKENS = 1024
"""Prompt tokens (with the template's trailing 5) the tokenizer keeps; a longer prompt is refused."""
TRAINED_PROMPT_TOKENS = 512
"""diffusers' ``max_sequence_length``: longer prompts work but warn (beyond the trained length)."""

# The published text_encoder/config.json (Qwen2.5-VL-7B-Instruct, older flat layout).
QWEN25VL_7B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
        "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "hidden_act": "silu",
    },
}


def tiny_text_encoder_config() -> dict[str, Any]:
    """The same classes at CPU size: 2 layers, width 32, 4 query / 2 KV heads of 8, vocab of
    :func:`tiny_tokenizer`; a one-block vision tower (only written to checkpoints, never run)."""
    cfg = copy.deepcopy(QWEN25VL_7B_CONFIG)
    cfg.update(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, max_window_layers=2,
               rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
               bos_token_id=None, eos_token_id=2, image_token_id=500, video_token_id=501,
               vision_start_token_id=502, vision_end_token_id=503)
    cfg["vision_config"] = {**cfg["vision_config"], "depth": 1, "hidden_size": 16, "intermediate_size": 32,
                            "num_heads": 2, "out_hidden_size": 32, "fullatt_block_indexes": [0]}
    return cfg


def build_config(data: dict[str, Any]):
    """A ``Qwen2_5_VLConfig`` from a ``config.json`` dict (flat older layout or nested)."""
    from transformers import Qwen2_5_VLConfig

    data = {k: v for k, v in data.items() if k not in ("architectures", "model_type", "transformers_version")}
    config = Qwen2_5_VLConfig(**copy.deepcopy(data))
    config.text_config._attn_implementation = "sdpa"
    return config


def build_text_model(config):
    """``Qwen2_5_VLTextModel`` of a ``Qwen2_5_VLConfig`` (on the current default device)."""
    from transformers import Qwen2_5_VLTextModel

    return Qwen2_5_VLTextModel(config.text_config)


def text_model_key(key: str) -> str | None:
    """On-disk text-encoder key → ``Qwen2_5_VLTextModel`` key; ``None`` (skip) for the vision
    tower and ``lm_head``. Accepts the older layout (``model.layers.N``, ``visual.*``) of the
    published shards and the current one (``model.language_model.*``, ``model.visual.*``)."""
    if key.startswith(("visual.", "model.visual.", "lm_head.")):
        return None
    for prefix in ("model.language_model.", "model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def full_model_state(config, text_model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole published layout (older naming) for ``text_model``'s weights: the language model
    under ``model.``, plus a seeded random vision tower (``visual.*``) and ``lm_head`` at the
    config's shapes. For checkpoint writers (tests); the vision tower is never run."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        full = Qwen2_5_VLForConditionalGeneration(config)
    out: dict[str, torch.Tensor] = {}
    for key, value in full.state_dict().items():
        if key.startswith("model.visual."):
            out["visual." + key[len("model.visual."):]] = value
        elif key.startswith("lm_head."):
            out[key] = value
    for key, value in text_model.state_dict().items():
        out["model." + key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizers

_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""The pre-tokenizer pattern of the Qwen2 tokenizer."""
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [PROMPT_TEMPLATE.format(p) for p in (
    "a lighthouse on a cliff at dusk", "a red fox in the snow", "a bowl of ramen, Ultra HD, 4K, cinematic composition.",
    "a cat", "two dogs playing with a ball in a green park", " ",
)]


def tiny_tokenizer():
    """A deterministic byte-level BPE built in code (no download): the Qwen2 pre-tokenizer pattern,
    ``<|endoftext|>`` 0 (also padding), ``<|im_start|>`` 1, ``<|im_end|>`` 2, and merges learned
    from the prompt template, so any text tokenizes and the template's words are single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=None, model_max_length=131072)
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(weights_dir: str | os.PathLike):
    """The tokenizer in ``<weights_dir>/tokenizer`` (Qwen2Tokenizer files, or a tiny one written by
    the plugin's checkpoint writer)."""
    from transformers import AutoTokenizer

    path = Path(weights_dir) / "tokenizer"
    if not path.is_dir():
        from core.errors import WeightsError

        raise WeightsError(f"tokenizer folder {path} does not exist (expected tokenizer/ in {weights_dir})")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "right"
    return tokenizer


class QwenPromptEncoder:
    """Prompt → ``(1, L, hidden)`` embeddings of its real tokens (template prefix dropped)."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def token_count(self, prompt: str) -> int:
        """Tokens the DiT will see for ``prompt`` (the templated text minus the dropped prefix)."""
        return len(self.tokenizer(PROMPT_TEMPLATE.format(prompt))["input_ids"]) - DROP_TOKENS

    def check(self, prompt: str, what: str = "prompt") -> int:
        """Refuse a prompt past :data:`MAX_PROMPT_TOKENS` (the official tokenizer would truncate it
        silently), warn past :data:`TRAINED_PROMPT_TOKENS`; returns the token count."""
        from core.errors import InputError

        n = self.token_count(prompt)
        if n > MAX_PROMPT_TOKENS:
            raise InputError(f"{what} is {n} tokens with the template's tail; Qwen-Image takes at most {MAX_PROMPT_TOKENS}")
        if n > TRAINED_PROMPT_TOKENS:
            warnings.warn(f"{what} is {n} tokens, past the {TRAINED_PROMPT_TOKENS} Qwen-Image was trained with "
                          "(diffusers truncates there); results may degrade", stacklevel=3)
        return n

    @torch.no_grad()
    def encode(self, prompt: str, device: torch.device | str | None = None) -> torch.Tensor:
        batch = self.tokenizer([PROMPT_TEMPLATE.format(prompt)], return_tensors="pt",
                               max_length=MAX_PROMPT_TOKENS + DROP_TOKENS, truncation=True)
        device = device if device is not None else self.model.embed_tokens.weight.device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, DROP_TOKENS:]


def read_config(weights_dir: str | os.PathLike | None, rel: str, default: dict) -> dict:
    """``<weights_dir>/<rel>`` parsed when it exists, else ``default``."""
    if weights_dir is not None:
        path = Path(weights_dir) / rel
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError as exc:
                from core.errors import WeightsError

                raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    return default
