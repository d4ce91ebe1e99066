"""The conformance kit on qwen-image (found through its installed entry point), 2 ranks for USP,
plus no recompilation across prompt lengths on the kit's compiled pipeline, and the numbers of its
reference-parity ladder against diffusers' ``QwenImagePipeline``.

The kit's USP check includes ``Conformance.uneven_call`` (48×80 px: 15 image tokens, remainder 1
on 2 ranks) with true CFG, whose prompt and negative prompt " " have different token counts.
4 ranks: ``ditkit check qwen-image --usp 4`` (README)."""
import pytest
import torch

from core.testing import PluginConformance
from core.testing.checks import _compiled

pytestmark = pytest.mark.slow


class TestQwenImage(PluginConformance):
    model_name = "qwen-image"

    def test_no_recompile_across_prompt_lengths(self, ditkit_subject):
        """After one warm-up call, prompts of 1 to ~40 tokens, CFG on and off and three sizes
        (one non-square) run without a recompile."""
        pipe = _compiled(ditkit_subject)
        base = {"num_inference_steps": 2, "progress": False}
        pipe("a lighthouse on a cliff at dusk", **base, height=48, width=48)
        prompts = ["a", "a red fox in the snow under a pale winter sun, photographed from far away " * 3]
        sizes = [(32, 32), (48, 80), (80, 64)]
        with torch.compiler.set_stance("fail_on_recompile"):
            for prompt in prompts:
                for cfg in (1.0, 4.0):
                    for h, w in sizes:
                        pipe(prompt, **base, guidance_scale=cfg, height=h, width=w)

    def test_reference_parity_compares_every_stage_under_true_cfg(self, ditkit_subject, ditkit_options):
        """The kit's reference run (reused when test_reference_parity ran first): every stage of the
        ladder compared, true CFG on with the negative prompt " ", each error within its tolerance."""
        result = getattr(ditkit_subject, "_results", {}).get("reference-parity")
        if result is None:
            self._run("reference-parity", ditkit_subject, ditkit_options)
            result = ditkit_subject._results["reference-parity"]
        ladder = result.details
        assert result.status == "pass" and ladder["first_difference"] is None, result.message
        assert ladder["compared"] == ["text_embeddings", "sigmas", "velocity", "latents", "output"]
        assert ladder["call"]["guidance_scale"] > 1 and ladder["call"]["negative_prompt"] == " "
        assert all(row["error"] <= row["tolerance"] for row in ladder["stages"]), ladder["stages"]
