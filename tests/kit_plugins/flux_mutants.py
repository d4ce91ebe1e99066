"""Three mutations of the diffusers-Flux example's pipeline, one model each, for ``reference-parity``.

Each is the example unchanged except one plausible bug that agrees with itself (compiled = eager,
parallel = one process, deterministic, finite, in range), so only an independent reference can
catch it; the ladder must name the stage where it enters:

- ``flux-wrong-schedule``: Wan's UniPC grid ``s_max=0.999`` instead of 1 (σ₀ = 0.99967, a
  slightly wrong schedule) -> ``sigmas``;
- ``flux-wrong-guidance``: ``v = v_cond + s·(v_cond − v_uncond)`` (a guidance weight read in the
  "w" convention, i.e. one too many) -> ``latents`` (the first velocity is before guidance);
- ``flux-unscaled-decode``: the VAE decodes the latents without undoing its ``scaling_factor``
  and ``shift_factor`` -> ``output``.

Needs the example (``ditkit_diffusers_flux``) importable; the USP check's ranks import this module
by name, so each rank runs the mutant too.
"""
from ditkit_diffusers_flux import plugin
from ditkit_diffusers_flux.pipeline import DiffusersFluxPipeline

from core import hookimpl
from core.sampler import shifted_sigmas


class WrongSchedule(DiffusersFluxPipeline):
    def sigmas(self, num_inference_steps, shift):
        return shifted_sigmas(num_inference_steps, shift, s_max=0.999)


class WrongGuidance(DiffusersFluxPipeline):
    def denoise(self, x, sigmas, velocity, *, guidance_scale=1.0, **kwargs):
        # v_cond + s·(v_cond − v_uncond) = v_uncond + (s + 1)·(v_cond − v_uncond)
        return super().denoise(x, sigmas, velocity, guidance_scale=guidance_scale + 1.0, **kwargs)


class UnscaledDecode(DiffusersFluxPipeline):
    def decode(self, x):
        image = self.vae.decode(x.to(self.dtype), return_dict=False)[0].float()
        return (image / 2 + 0.5).clamp(0, 1)


MUTANTS = {"flux-wrong-schedule": (WrongSchedule, "sigmas"), "flux-wrong-guidance": (WrongGuidance, "latents"),
           "flux-unscaled-decode": (UnscaledDecode, "output")}
"""model name -> (pipeline class, the first stage reference-parity must name)."""


@hookimpl
def ditkit_register_models():
    (example,) = plugin.ditkit_register_models()
    return [example.model_copy(update={"name": name, "aliases": [], "pipeline": cls})
            for name, (cls, _) in MUTANTS.items()]
