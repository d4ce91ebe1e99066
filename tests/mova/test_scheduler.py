"""MOVA samples as the official OpenMOSS code does (plugins/mova/README.md, "Sampler").

Reference: ``plugins.mova.reference.OfficialFlowMatchPairScheduler``, a port of the official
``FlowMatchScheduler`` / ``FlowMatchPairScheduler`` (github.com/OpenMOSS/MOVA,
``mova/diffusion/schedulers/flow_match.py`` and ``flow_match_pair.py`` at commit
280c078dd047d536ac8abdacbc9abd4b356b13cf) kept in the official structure: a stateful object that
caches its training grid in the constructor, ``set_timesteps``, ``timestep_to_sigma`` by
``argmin`` and ``step_from_to``. ditkit's :class:`plugins.mova.scheduler.MovaScheduler` is a
separate, vectorised implementation; both run the same float32 torch arithmetic, so they must agree
bit for bit (tolerance 0), at step counts that divide 1000 and at ones that do not.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import core
from core.errors import InputError, WeightsError
from core.pipeline import Pipeline
from core.sampler import shifted_sigmas
from plugins.mova.pipeline import read_folder_configs
from plugins.mova.reference import OfficialFlowMatchPairScheduler
from plugins.mova.scheduler import RELEASED_SCHEDULER, MovaScheduler, read_scheduler_config

STEPS = [1, 2, 3, 7, 20, 30, 37, 50, 60]  # 3, 7, 30, 37, 60 do not divide 1000


def official_steps(scheduler: OfficialFlowMatchPairScheduler, steps: int):
    """What the official loop feeds the DiT (timesteps) and the σ its Euler steps move between."""
    scheduler.set_timesteps(steps)
    t = scheduler.get_pairs()[:, 0]
    sigmas = [scheduler.timestep_to_sigma(x) for x in t]
    # step_from_to on (sample 0, velocity 1) is exactly σ_to − σ_from: the last target is 0
    deltas = [scheduler.step_from_to(torch.ones(()), t[i], t[i + 1] if i + 1 < steps else None, torch.zeros(()))
              for i in range(steps)]
    return t, torch.stack([*sigmas, torch.zeros(())]), torch.stack(deltas)


@pytest.mark.parametrize("shift", [5.0, 8.0])
@pytest.mark.parametrize("steps", STEPS)
def test_timesteps_and_snapped_sigmas_equal_the_official_scheduler(shift, steps):
    ours = MovaScheduler(shift=shift)
    t, sigmas, deltas = official_steps(OfficialFlowMatchPairScheduler(**{**ours.to_json_dict(), "num_inference_steps": steps}), steps)
    assert torch.equal(ours.timesteps(steps), t)
    assert torch.equal(ours.sigmas(steps), sigmas)
    assert torch.equal(ours.sigmas(steps).diff(), deltas)


@pytest.mark.parametrize("shift,steps,at_least", [(5.0, 30, 2.3e-3), (8.0, 60, 3.8e-3)])
def test_snapping_matters_when_the_steps_do_not_divide_1000(shift, steps, at_least):
    """The exact shifted grid (ditkit's sampler before) misses the official step sizes by this much."""
    snapped = MovaScheduler(shift=shift).sigmas(steps).double()
    exact = shifted_sigmas(steps, shift).double()
    assert 1000 % steps
    assert (snapped.diff() - exact.diff()).abs().max() >= at_least
    # with a step count that divides 1000 every timestep is a training-grid point
    divisor = MovaScheduler(shift=shift).sigmas(50).double()
    assert (divisor - shifted_sigmas(50, shift).double()).abs().max() <= 1e-6


def test_the_core_loop_steps_between_the_snapped_sigmas():
    """``Pipeline.denoise`` given the snapped σ reproduces the official loop bit for bit (30 steps)."""
    steps, scheduler = 30, RELEASED_SCHEDULER
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 64, generator=g)
    w = torch.randn(64, generator=g)

    def model(x, t):  # any velocity that depends on the state and the timestep
        return torch.tanh(x * w) + t / 1000.0

    official = OfficialFlowMatchPairScheduler(**scheduler.to_json_dict())
    official.set_timesteps(steps)
    t = official.get_pairs()[:, 0]
    x = x0.clone()
    for i in range(steps):
        x = official.step_from_to(model(x, t[i]), t[i], t[i + 1] if i + 1 < steps else None, x)

    timesteps = scheduler.timesteps(steps)
    ours = Pipeline().denoise(x0.clone(), scheduler.sigmas(steps), lambda x, s, b, i: model(x, timesteps[i]))
    assert torch.equal(ours, x)


def test_expert_switch_compares_the_float32_timestep():
    """Shift 2, boundary 0.8, step 1 of 3: σ = 0.8 exactly, but the official float32 arithmetic gives
    t = 799.99994 < 800, so the low-noise expert runs; rounding the float64 σ first gives 800.00001."""
    scheduler = MovaScheduler(shift=2.0)
    official = OfficialFlowMatchPairScheduler(**scheduler.to_json_dict())
    official.set_timesteps(3)
    t = scheduler.timesteps(3)
    assert torch.equal(t, official.get_pairs()[:, 0])
    assert float(t[1]) == pytest.approx(799.99994, abs=1e-5) and float(t[1]) < 800.0
    assert float(shifted_sigmas(3, 2.0)[1] * 1000) >= 800.0  # the float64 route lands on the other side
    assert [scheduler.is_high_noise(x, 0.8) for x in t] == [True, False, False]
    assert [not x.item() < 0.8 * official.num_train_timesteps for x in official.get_pairs()[:, 0]] == [True, False, False]


def test_the_pipeline_switches_experts_at_the_tie():
    spec = core.get_registry().model("mova").spec
    config = {**spec.presets["tiny"].config, "scheduler": {**spec.presets["tiny"].config["scheduler"], "shift": 2.0}}
    pipe = spec.pipeline(config, device="cpu")
    calls = {"video_dit": 0, "video_dit_2": 0}
    hooks = [getattr(pipe, n).register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls]
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        pipe("a cat", image=image, num_frames=5, height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
             boundary=0.8, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"video_dit": 1, "video_dit_2": 2}


def test_released_scheduler_config():
    """docs/models.md (MOVA sampler): shift 5.0, σ_min 0.0, extra_one_step true, 1000 training steps."""
    assert (RELEASED_SCHEDULER.shift, RELEASED_SCHEDULER.sigma_min, RELEASED_SCHEDULER.extra_one_step,
            RELEASED_SCHEDULER.sigma_max, RELEASED_SCHEDULER.num_train_timesteps) == (5.0, 0.0, True, 1.0, 1000)
    for name in ("mova-360p", "mova-720p"):
        spec = core.get_registry().model(name).spec
        for preset in spec.presets.values():
            assert MovaScheduler(**preset.config["scheduler"]) == RELEASED_SCHEDULER
            assert "shift" not in preset.defaults


def test_the_scheduler_config_file_decides(tmp_path):
    """Every field of scheduler_config.json reaches the schedule (σ_min and extra_one_step too)."""
    path = tmp_path / "scheduler_config.json"
    data = {"_class_name": "FlowMatchPairScheduler", "num_train_timesteps": 1000, "shift": 8.0, "sigma_max": 1.0,
            "sigma_min": 0.003 / 1.002, "extra_one_step": False, "num_inference_steps": 100}
    path.write_text(json.dumps(data))
    ours = read_scheduler_config(path)
    assert (ours.shift, ours.sigma_min, ours.extra_one_step) == (8.0, 0.003 / 1.002, False)
    _, sigmas, _ = official_steps(OfficialFlowMatchPairScheduler(**data), 30)
    assert torch.equal(ours.sigmas(30), sigmas)
    path.write_text(json.dumps({**data, "shift_terminal": 0.02}))
    with pytest.raises(WeightsError, match="shift_terminal"):
        read_scheduler_config(path)


def test_a_checkpoint_folders_scheduler_config_reaches_the_pipeline(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**RELEASED_SCHEDULER.to_json_dict(), "shift": 8.0}))
    config = read_folder_configs(tmp_path, core.get_registry().model("mova").spec.presets["tiny"].config)
    assert MovaScheduler(**config["scheduler"]) == MovaScheduler(shift=8.0)


@pytest.fixture(scope="module")
def pipe():
    return core.load("mova", device="cpu")


CALL = dict(image=torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)), num_frames=5,
            num_inference_steps=2, progress=False)


def test_shift_argument_is_deprecated_and_never_silently_ignored(pipe, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = pipe("a cat", **CALL).video
    with pytest.warns(DeprecationWarning, match="shift.*scheduler_config.json") as record:
        same = pipe("a cat", shift=5.0, **CALL).video
    assert len(record) == 1 and torch.equal(same, expected)

    def no_work(*a, **k):
        raise AssertionError("the text encoder ran before the inputs were checked")

    monkeypatch.setattr(pipe.text_encoder, "forward", no_work)
    with pytest.raises(InputError, match=r"shift=8\.0.*scheduler config's \(5;.*scheduler_config\.json"):
        pipe("a cat", shift=8.0, **CALL)
