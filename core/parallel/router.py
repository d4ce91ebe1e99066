"""The attention router of a USP run: how each declared call site runs on split sequences.

It implements :class:`core.attention.AttentionRouter`.  Per site (``AttentionSite.strategy``):

- ``parallel``: the USP engine on this rank's padded shard; padded keys masked exactly.
- ``local``: ``None`` (the call runs locally: split queries against a context every rank holds).
- ``gather_kv``: the other stream's K/V are all-gathered (padding cut, so exact) before a local
  attention with this rank's queries.
- ``joint``: ``[text, image]`` with the text replicated on every rank and the image split.  The
  text is cut into shards too, so the engine sees every text token once as a key and as a query;
  each rank's text output shard is then all-gathered, so the text stream leaving the attention
  is the same bytes on every rank.
- ``infer``: for calls that do not say which site they are. Before the sequence is split (or when
  it never is) the call is local. Otherwise the ranks compare the queries and the keys
  (:mod:`core.parallel.infer`): both end in this rank's shard, after the same number ``P`` of
  whole tokens -> ``parallel`` (``P = 0``) or ``joint`` with ``text_len=P``; only the queries
  -> ``local`` (the keys are whole on every rank); only the keys -> their shard is all-gathered
  (padding cut, the whole prefix kept) before a local attention, as ``gather_kv``; neither ->
  ``local``. Values follow the keys.

A site the adapter does not declare is an error under USP: running it locally on split
sequences would be silently wrong.
"""
from __future__ import annotations

import torch

from core.attention import local_attention
from core.errors import ParallelError
from core.spec import UspAdapter

from .engine import UspEngine
from .infer import infer_layouts
from .keymask import mask_padded_keys
from .mesh import Mesh
from .shards import SequenceState, ShardLayout, gather_tensor, shard_tensor

__all__ = ["UspRouter"]


class UspRouter:
    """Routes ``core.attention`` calls of one component per its :class:`UspAdapter`'s ``sites``."""

    def __init__(self, adapter: UspAdapter, mesh: Mesh, state: SequenceState, engine: UspEngine):
        self.adapter, self.mesh, self.state, self.engine = adapter, mesh, state, engine

    def __call__(self, q, k, v, *, site: str, mask, scale, **site_args) -> torch.Tensor | None:
        if self.mesh.sp_degree == 1:
            return None
        spec = self.adapter.sites.get(site)
        where = f"{self.adapter.component}: attention site {site!r}"
        if spec is None:
            raise ParallelError(
                f"{where} is not declared by the component's USP adapter (declared: "
                f"{sorted(self.adapter.sites)}); under USP every attention site must say how it runs"
            )
        if spec.strategy == "local":
            return None
        if spec.strategy == "infer":
            return self._infer(q, k, v, spec, mask, scale, where)
        if mask is not None:
            raise ParallelError(f"{where} ({spec.strategy}) was given a mask; masks cannot follow split sequences")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        if spec.strategy == "gather_kv":
            if spec.kv_sequence not in self.state and k.shape[1] == 1:
                return None  # a 1-token sequence is never split (see core.parallel.hooks)
            return self._gather_kv(q, k, v, spec, scale, where)
        if q.shape[2] % self.mesh.ulysses_degree:
            raise ParallelError(
                f"{where}: {q.shape[2]} heads do not divide by Ulysses degree {self.mesh.ulysses_degree}"
            )
        if spec.sequence not in self.state:
            text = site_args.get("text_len", 0) if spec.strategy == "joint" else 0
            if isinstance(text, int) and q.shape[1] - text == 1 and k.shape[1] - text == 1:
                return None  # a 1-token sequence is never split: every rank holds it whole
        layout = self.state.layout(spec.sequence, where)
        if spec.strategy == "parallel":
            self._expect(where, spec.sequence, layout.shard, q, k, v)
            return self._engine(q, k, v, layout.valid_mask(q.device), layout.padded, scale)
        return self._joint(q, k, v, layout, site_args, scale, where)

    @staticmethod
    def _expect(where, sequence, length, *tensors):
        for name, t in zip("qkv", tensors):
            if t.shape[1] != length:
                raise ParallelError(
                    f"{where}: {name} has {t.shape[1]} tokens, expected this rank's shard of "
                    f"sequence {sequence!r} ({length} tokens); is the sequence split before this site?"
                )

    def _engine(self, q, k, v, valid: torch.Tensor, padded: bool, scale: float) -> torch.Tensor:
        # ``padded`` is a property of the layout, so every rank takes the same branch (the widened
        # head dimension must match across the all-to-all and the ring).
        if not padded:
            return self.engine(q, k, v, scale)
        d = q.shape[-1]
        out = self.engine(*mask_padded_keys(q, k, v, valid), scale)[..., :d]
        return torch.where(valid.view(1, -1, 1, 1), out, out.new_zeros(()))

    def _gather_kv(self, q, k, v, spec, scale, where):
        kv_layout = self.state.layout(spec.kv_sequence, where)
        self._expect(where, spec.kv_sequence, kv_layout.shard, k, v)
        group = self.mesh.sp_group
        k = gather_tensor(k, 1, kv_layout, group)
        v = gather_tensor(v, 1, kv_layout, group)
        return local_attention(q, k, v, scale=scale)

    def _joint(self, q, k, v, image: ShardLayout, site_args, scale, where):
        text_len = site_args.get("text_len")
        if not isinstance(text_len, int) or text_len < 0:
            raise ParallelError(f"{where} is a joint site: pass text_len=<text tokens> to core.attention")
        self._expect(where, "text + image", text_len + image.shard, q, k, v)
        if text_len == 0:
            return self._engine(q, k, v, image.valid_mask(q.device), image.padded, scale)
        text = ShardLayout(text_len, image.world, image.rank)

        def cut(t):
            return torch.cat([shard_tensor(t[:, :text_len], 1, text), t[:, text_len:]], dim=1)

        valid = torch.cat([text.valid_mask(q.device), image.valid_mask(q.device)])
        out = self._engine(cut(q), cut(k), cut(v), valid, text.padded or image.padded, scale)
        text_out = gather_tensor(out[:, : text.shard], 1, text, self.mesh.sp_group)
        return torch.cat([text_out, out[:, text.shard :]], dim=1)

    def _infer(self, q, k, v, spec, mask, scale, where):
        if spec.sequence not in self.state:
            return None  # nothing is split yet in this pass (or a 1-token sequence): every rank holds it whole
        layout = self.state.layout(spec.sequence, where)
        found = infer_layouts({"q": q, "k": k}, layout.shard, self.mesh.sp_group, where)
        lq, lk = found["q"], found["k"]
        if not lk.split:
            return None  # whole keys and values: exact on this rank, whatever the queries hold
        if mask is not None:
            raise ParallelError(f"{where} (inferred: keys split) was given a mask; masks cannot follow split sequences")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        if not lq.split:
            return self._gather_tail(q, k, v, lk.prefix, layout, scale)
        if lq.prefix != lk.prefix or q.shape[1] != k.shape[1]:
            raise ParallelError(
                f"{where}: queries are [{lq.prefix} whole, shard] and keys [{lk.prefix} whole, shard] tokens; "
                f"an inferred parallel call needs the same layout for both"
            )
        if q.shape[2] % self.mesh.ulysses_degree:
            raise ParallelError(
                f"{where}: {q.shape[2]} heads do not divide by Ulysses degree {self.mesh.ulysses_degree}"
            )
        if lq.prefix == 0:
            return self._engine(q, k, v, layout.valid_mask(q.device), layout.padded, scale)
        return self._joint(q, k, v, layout, {"text_len": lq.prefix}, scale, where)

    def _gather_tail(self, q, k, v, prefix, layout, scale):
        group = self.mesh.sp_group

        def whole(t):
            return torch.cat([t[:, :prefix], gather_tensor(t[:, prefix:], 1, layout, group)], dim=1)

        return local_attention(q, whole(k), whole(v), scale=scale)
