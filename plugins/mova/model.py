"""The dual-tower pass: two Wan video towers (one per noise phase), the audio tower and the bridge.

:class:`MovaVideoDiT` *is* :class:`plugins.wan.dit.WanModel` (same modules, same keys: the MOVA
``video_dit``/``video_dit_2`` folders hold Wan2.2-I2V-A14B-shaped towers, ``in_dim`` 36 = noise 16
+ mask 4 + image latents 16, no CLIP branch); it only adds a ``before_block`` callback to the
layer loop, so the bridge and the audio blocks can run between the video layers without any
change to the Wan code.

Order within one evaluation (:func:`dual_tower_forward`), official semantics:

1. both towers embed their inputs (patches, rotary tables, timestep, the *same* text context);
2. for each shared layer ``i`` (``i`` < audio layers): the bridge (if layer ``i`` interacts) updates
   both streams from their pre-update values, then video block ``i`` and audio block ``i`` run
   (independent of each other, so their order does not matter);
3. the remaining video blocks run alone; each tower applies its own head and unpatchify.

Nesting (what keeps USP exact with per-component hooks): the audio tower's call is the outer
one; inside it the video tower's call runs the layer loop; the callback calls the bridge and
re-enters the audio tower for its block ``i``.  Every block therefore runs inside a call of its
own component, whose split/gather hooks and attention routing are active at that moment.
"""
from __future__ import annotations

from typing import Callable

import torch

from plugins.wan.dit import WanModel

from .audio_dit import AudioStream, WanAudioModel
from .bridge import DualTowerConditionalBridge

__all__ = ["MovaVideoDiT", "dual_tower_forward"]

BeforeBlock = Callable[[int, torch.Tensor, tuple[int, int, int]], torch.Tensor]


class MovaVideoDiT(WanModel):
    """Wan's DiT with a hook point before each block (``before_block(i, tokens, grid) -> tokens``)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                before_block: BeforeBlock | None = None) -> torch.Tensor:
        """:meth:`WanModel.forward` (``x`` (B,16,F,H,W), ``y`` the 20 conditioning channels); with
        ``before_block``, ``tokens = before_block(i, tokens, (f, h, w))`` runs before block ``i``."""
        if before_block is None:
            return super().forward(x, t, context, y=y)
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        pt, ph, pw = self.config.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        rope = self.rope(x)
        tokens = self.patch_embedding(x)
        e = self.time_embedding(self.time_features(t).to(self.time_embedding[0].weight.dtype)).float()
        e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float().unflatten(-1, (6, -1))
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
        for i, block in enumerate(self.blocks):
            tokens = before_block(i, tokens, grid)
            tokens = block(tokens, e0, ctx, rope)
        return self.unpatchify(self.head(tokens, e), *grid)


def dual_tower_forward(
    video_dit: MovaVideoDiT,
    audio_dit: WanAudioModel,
    bridge: DualTowerConditionalBridge,
    video: torch.Tensor,
    audio: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    y: torch.Tensor | None,
    video_fps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocities ``(video (B,16,F,H,W), audio (B,128,L))`` float32 for one noise level ``t``."""
    shared = len(audio_dit.blocks)
    if len(video_dit.blocks) < shared:
        raise ValueError(f"the video tower has {len(video_dit.blocks)} blocks, fewer than the audio tower's {shared}")
    result: dict[str, torch.Tensor] = {}

    def partner(run_audio_block: Callable[[int, AudioStream], None], stream: AudioStream) -> None:
        def before_block(i: int, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
            if i >= shared:
                return tokens  # video layers past the shared ones run alone
            if bridge.interacts(i):
                tokens, stream.tokens = bridge(i, tokens, stream.tokens, grid=grid, audio_length=stream.length,
                                               video_fps=video_fps)
            run_audio_block(i, stream)
            return tokens

        result["video"] = video_dit(video, t, context, y=y, before_block=before_block)

    result["audio"] = audio_dit(audio, t, context, partner=partner)
    return result["video"], result["audio"]
