"""Nothing that worked under contract 1.0 breaks within 1.x: the ``steps`` alias for callers and
plugins, a ``generate()`` without ``generator``, 1.0's class attributes, and a kit that calls each
pipeline in its own argument names and blames the right author."""
from __future__ import annotations

import warnings

import pytest
import torch

from core import InputError
from core.contract import ContractDeprecationWarning
from core.loading import load_spec
from core.testing import KitOptions, Subject
from core.testing.runner import run_one
from core.testing.checks import CHECKS, CheckFailed, check_spec_valid

from . import _legacy

PLUGIN = "tests.contract._legacy"


def _load(name):
    return Subject(name, plugin=PLUGIN).build()


def _deprecations(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, ContractDeprecationWarning)]


def test_a_caller_passing_steps_gets_one_deprecation_naming_the_new_name_and_the_same_result():
    pipe = _load("current")
    new = pipe("a fox", num_inference_steps=2, progress=False).images
    old, messages = _deprecations(lambda: pipe("a fox", steps=2, progress=False).images)
    assert torch.equal(old, new) and pipe.received[-1]["num_inference_steps"] == 2
    (message,) = messages
    assert "'steps'" in message and "use 'num_inference_steps'" in message and "the call" in message
    with pytest.raises(InputError, match="both 'steps' and 'num_inference_steps'"):
        pipe("a fox", steps=2, num_inference_steps=3, progress=False)


def test_a_contract_1_0_pipeline_gets_its_own_names_and_no_generator():
    pipe = _load("contract10")
    out, messages = _deprecations(lambda: [pipe("a fox", num_inference_steps=2, progress=False) for _ in range(2)])
    assert pipe.received == [{"steps": 2}, {"steps": 2}]  # the core passed the value under the name generate() takes
    (message,) = messages  # the plugin is told once per pipeline, naming every place it still writes 'steps'
    assert "plugin 'tests.contract._legacy'" in message and "'num_inference_steps'" in message
    assert all(place in message for place in ("defaults", "conformance.call", "generate()"))
    # a caller using the plugin's own name is not warned: the plugin declares it
    _, messages = _deprecations(lambda: pipe("a fox", steps=3, progress=False))
    assert messages == [] and pipe.received[-1] == {"steps": 3}
    # its own check_inputs still reads args["steps"] / args.get("steps")
    with pytest.raises(InputError, match="at most 8"):
        pipe("a fox", num_inference_steps=9, progress=False)
    # a generator is refused only when a caller really passes one, naming the plugin
    with pytest.raises(InputError, match="plugin 'tests.contract._legacy'.*takes no 'generator'"):
        pipe("a fox", generator=torch.Generator().manual_seed(0), progress=False)


def test_a_generate_taking_kwargs_reads_the_name_its_plugin_declares():
    spec = Subject("contract10", plugin=PLUGIN).spec.model_copy(update={"pipeline": _legacy.KwargsPipeline})
    pipe = load_spec(spec, "tiny", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContractDeprecationWarning)
        pipe("a fox", num_inference_steps=2, progress=False)
    assert pipe.received[-1]["steps"] == 2 and "num_inference_steps" not in pipe.received[-1]


def test_contract_1_0_class_attributes_still_serve_a_pipeline_built_without_core_load():
    pipe = _legacy.Contract10Pipeline()  # no spec attached: 1.0 read these from the class
    with pytest.warns(ContractDeprecationWarning, match="ModelSpec.compilable_models"):
        assert pipe._compilable() == ["net"]  # what compile_pipeline() compiles
    with pytest.warns(ContractDeprecationWarning, match="Capabilities.size_multiple"):
        with pytest.raises(InputError, match="multiple of 8"):
            pipe("a fox", height=12, progress=False)


def test_the_kit_calls_each_pipeline_in_its_own_names():
    old, new = Subject("contract10", plugin=PLUGIN), Subject("current", plugin=PLUGIN)
    assert old.argument("num_inference_steps") == "steps" and new.argument("num_inference_steps") == "num_inference_steps"
    assert old.call_args(num_inference_steps=5, guidance_scale=2.0) == {
        "seed": 0, "progress": False, "steps": 5, "guidance_scale": 2.0}
    # the kit's default conformance.call (current names) reaches a 1.0 pipeline in its names too
    assert Subject("contract10-default-call", plugin=PLUGIN).call_args() == {"seed": 0, "progress": False, "steps": 2}
    assert new.call_args(steps=4) == {"seed": 0, "progress": False, "num_inference_steps": 4}


def test_the_kit_reports_a_plugins_deprecation_once_and_raises_none_itself():
    subject, done = Subject("contract10", plugin=PLUGIN), {}
    for check in (c for c in CHECKS if c.id in ("spec-valid", "tiny-builds", "determinism", "end-to-end", "bad-input")):
        done[check.id] = result = run_one(check, subject, KitOptions(max_examples=1), {}, done)
        assert result.status == "pass", (check.id, result.message)
    (message,) = subject.deprecations  # the plugin's own use, once; none for a name the kit passed
    assert "still writes" in message and "'steps'" in message and "'num_inference_steps'" in message
    assert Subject("current", plugin=PLUGIN).deprecations == []


def test_spec_valid_blames_the_kits_default_call_not_the_plugin():
    """A pipeline that takes no step argument at all: the default ``conformance.call`` names one,
    and the message says that name is the kit's default, not the plugin's."""
    class NoSteps(_legacy.CurrentPipeline):
        defaults = {"guidance_scale": 1.0, "height": 16, "width": 16}

    subject = Subject("current", plugin=PLUGIN)
    subject.record = type(subject.record)(subject.spec.model_copy(update={"pipeline": NoSteps}), "p", "d")
    with pytest.raises(CheckFailed) as info:
        check_spec_valid(subject, KitOptions())
    message = str(info.value)
    assert message.startswith("the kit's default conformance.call (the plugin declares none) names "
                              "['num_inference_steps']"), message
    assert "conformance.call of" not in message


def test_the_kits_recording_passes_every_other_warning_on():
    from core.testing.quiet import recording_deprecations

    seen: list[str] = []
    with pytest.warns(UserWarning, match="unrelated") as passed_on:
        with recording_deprecations(seen):
            warnings.warn("unrelated", UserWarning)
            warnings.warn("an old name", ContractDeprecationWarning)
            warnings.warn("an old name", ContractDeprecationWarning)
    assert seen == ["an old name"] and [str(w.message) for w in passed_on] == ["unrelated"]
