"""Bad input, broken checkpoints, unwritable outputs and signals: one clean project error before
any work, through the Python API and through the CLI, and no file left behind.

Each table row is a case a user (or an attacker) tried; the test asserts the error type, that the
message names the culprit, the CLI's exit status 2 with one ``ditkit: error:`` line, and that no
output file (nor a temporary) is left. The size cases run in a subprocess under an address-space
limit (``RLIMIT_AS``), so an allocation the checks failed to prevent would fail the test instead
of swapping the machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import core
from core.errors import GenerationError, InputError, OutputError, PluginError, UnknownModelError, WeightsError
from core.outputs import Output, remove_stale_temporaries, write_output

from .conftest import ROOT, subprocess_env

T2V = "wan2.1-t2v-1.3b"
TI2V = "wan2.2-ti2v-5b"
SMALL = dict(num_inference_steps=1, height=16, width=16, num_frames=1)
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def t2v():
    return core.load(T2V, device="cpu")


@pytest.fixture(scope="module")
def ti2v():
    return core.load(TI2V, device="cpu")


def cli(capsys, *argv) -> tuple[int, str]:
    """``ditkit <argv>`` in this process (the console script is ``sys.exit(main())``)."""
    from core.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Generation input: (id, model, call arguments, culprit named in the message)

GENERATION_CASES = [
    ("guidance-nan", T2V, dict(guidance_scale=NAN), "guidance_scale"),
    ("guidance-inf", T2V, dict(guidance_scale=INF), "guidance_scale"),
    ("shift-nan", T2V, dict(shift=NAN), "shift"),
    ("shift-inf", T2V, dict(shift=INF), "shift"),
    ("guidance-low-nan", T2V, dict(guidance_scale_low=NAN), "guidance_scale_low"),
    ("fps-inf", T2V, dict(fps=INF), "fps"),
    ("seed-2**70", T2V, dict(seed=2**70), "seed"),
    ("seed-below-int64", T2V, dict(seed=-(2**63) - 1), "seed"),
    ("steps-past-bound", T2V, dict(num_inference_steps=10**6), "num_inference_steps"),
    ("image-empty-tensor", TI2V, dict(image=torch.zeros(3, 0, 0)), "image"),
    ("image-nan-tensor", TI2V, dict(image=torch.full((3, 8, 8), NAN)), "image"),
]


@pytest.mark.parametrize("case_id, model, call, culprit", GENERATION_CASES, ids=[c[0] for c in GENERATION_CASES])
def test_generation_input_is_an_input_error_naming_the_argument(case_id, model, call, culprit, t2v, ti2v):
    pipe = t2v if model == T2V else ti2v
    args = {**SMALL, **call}
    with pytest.raises(InputError, match=culprit):
        pipe("a fox", **args)


CLI_GENERATION_CASES = [
    ("guidance-nan", ["--guidance-scale", "nan"], "--guidance-scale"),  # the flag typed, not the Python name
    ("guidance-inf", ["--guidance-scale", "inf"], "--guidance-scale"),
    ("seed-2**70", ["--seed", str(2**70)], "--seed"),
    ("steps-10**12", ["--steps", str(10**12)], "--steps"),
    ("device-nosuch", ["--device", "nosuch"], "nosuch"),
    ("device-cuda-on-cpu-torch", ["--device", "cuda"], "cuda"),
    ("dtype-nosuch", ["--dtype", "float7"], "float7"),
    ("preset-nosuch", ["--preset", "huge"], "huge"),
]


@pytest.mark.parametrize("case_id, argv, culprit", CLI_GENERATION_CASES, ids=[c[0] for c in CLI_GENERATION_CASES])
def test_cli_generation_input_is_one_error_line_and_no_file(case_id, argv, culprit, capsys, tmp_path, monkeypatch):
    if case_id == "device-cuda-on-cpu-torch" and torch.cuda.is_available():
        pytest.skip("this case is about a machine without CUDA")
    built = []
    monkeypatch.setattr(core.loading, "load_spec", lambda *a, **k: built.append(a))
    code, err = cli(capsys, "run", T2V, "--out", tmp_path / "v.mp4", "--num-frames", "1", *argv)
    assert code == 2 and built == []  # refused before any model was built
    assert err.count("\n") == 1 and err.startswith("ditkit: error:") and culprit in err
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, culprit", [(["run", T2V, "--steps", "abc"], "--steps"), (["frob"], "frob"), ([], "command")])
def test_cli_usage_errors_are_one_line_too(argv, culprit, capsys):
    from core.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("ditkit: error:") and culprit in err


def test_load_errors_name_the_option_and_device():
    with pytest.raises(InputError, match="'foo'.*known options.*vae_dtype"):
        core.load(T2V, device="cpu", foo=1)
    with pytest.raises(InputError, match="nosuch"):
        core.load(T2V, device="nosuch")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CPU-only|no visible CUDA"):
            core.load(T2V, device="cuda")


# ---------------------------------------------------------------------------------------------
# Sizes past what the model or the machine holds: in a subprocess under RLIMIT_AS

_SIZE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import core
    from core.errors import DitkitError
    pipe = core.load("wan2.1-t2v-1.3b", device="cpu")
    used = int([l for l in open("/proc/self/status") if l.startswith("VmSize:")][0].split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + (3 << 30), resource.RLIM_INFINITY))
    results = {}
    cases = {
        "steps-10**12": dict(num_inference_steps=10**12),
        "16384x16384": dict(height=16384, width=16384, num_frames=1, num_inference_steps=1),
        "rope-past-1024": dict(height=16400, width=16, num_frames=1, num_inference_steps=1),
        "frames-past-memory": dict(height=1024, width=1024, num_frames=4001, num_inference_steps=1),
    }
    for name, call in cases.items():
        try:
            pipe("a fox", **call)
            results[name] = ["ok", ""]
        except BaseException as exc:
            results[name] = [type(exc).__name__, str(exc)[:300]]
    try:
        core.load("wan2.1-t2v-1.3b", preset="tiny", weights=sys.argv[1], device="cpu")
        results["header-50000x50000"] = ["ok", ""]
    except BaseException as exc:
        results["header-50000x50000"] = [type(exc).__name__, str(exc)[:600]]
    print("RESULTS" + json.dumps(results))
    """
)


def _write_safetensors(path: Path, tensors: dict, huge: dict[str, tuple[int, ...]]) -> None:
    """A safetensors file written by hand: ``huge`` keys are declared (F32) but their bytes are a
    hole (a sparse file), like a crafted or corrupted header."""
    header, blobs, offset = {}, [], 0
    for key, value in tensors.items():
        data = value.contiguous().numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    for key, shape in huge.items():
        n = 4 * int(torch.tensor(shape).prod())
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for b in blobs:
            f.write(b)
        f.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def checkpoint(t2v, tmp_path_factory) -> Path:
    """The tiny T2V pipeline's weights in the official layout (DiT sharded, umT5 in bf16)."""
    import plugins.wan.plugin as wan_plugin

    root = tmp_path_factory.mktemp("wan-ckpt")
    wan_plugin.write_checkpoint(t2v, root, shards=1, t5_dtype=torch.bfloat16)
    return root


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _dit_shard(root: Path) -> Path:
    (shard,) = [p for p in root.glob("diffusion_pytorch_model-*.safetensors")]
    return shard


def test_size_cases_are_input_errors_before_allocation_under_an_address_space_limit(checkpoint, tmp_path):
    from safetensors.torch import load_file

    root = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    shard = _dit_shard(root)
    tensors = load_file(str(shard))
    key = "patch_embedding.weight"
    del tensors[key]
    _write_safetensors(shard, tensors, {key: (50000, 50000)})  # 10 GB declared, a hole on disk
    res = subprocess.run([sys.executable, "-c", _SIZE_SCRIPT, str(root)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=240, cwd=ROOT)
    assert "RESULTS" in res.stdout, res.stderr[-3000:]
    results = json.loads(res.stdout.split("RESULTS", 1)[1])
    assert results["steps-10**12"][0] == "InputError" and "num_inference_steps" in results["steps-10**12"][1]
    assert results["16384x16384"][0] == "InputError" and "GiB" in results["16384x16384"][1]
    assert results["rope-past-1024"][0] == "InputError" and "RoPE" in results["rope-past-1024"][1]
    assert results["frames-past-memory"][0] == "InputError" and "GiB" in results["frames-past-memory"][1]
    kind, message = results["header-50000x50000"]
    assert kind == "WeightsError" and key in message and "50000" in message and shard.name in message


# ---------------------------------------------------------------------------------------------
# Weights: wrong dtypes and an empty tokenizer folder


def test_dit_key_stored_as_int64_names_file_key_and_dtypes(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    root = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    shard = _dit_shard(root)
    tensors = load_file(str(shard))
    key = "head.head.weight"
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, str(shard))
    with pytest.raises(WeightsError) as info:
        core.load(T2V, preset="tiny", weights=root, device="cpu")
    message = str(info.value)
    assert key in message and shard.name in message and "int64" in message.lower() and "float32" in message


def test_umt5_key_stored_as_bool_names_file_key_and_dtypes(checkpoint, tmp_path, capsys):
    from plugins.wan.text_encoder import T5_CHECKPOINT

    root = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    sd = torch.load(root / T5_CHECKPOINT, weights_only=True)
    key = sorted(sd)[0]
    sd[key] = sd[key] > 0
    torch.save(sd, root / T5_CHECKPOINT)
    with pytest.raises(WeightsError) as info:
        core.load(T2V, preset="tiny", weights=root, device="cpu")
    assert key in str(info.value) and "bool" in str(info.value) and T5_CHECKPOINT in str(info.value)
    code, err = cli(capsys, "run", T2V, "--weights", root, "--out", tmp_path / "v.mp4")
    assert code == 2 and err.count("\n") == 1 and key in err
    assert not (tmp_path / "v.mp4").exists()


def test_empty_tokenizer_folder_names_the_folder_and_the_expected_files(checkpoint, tmp_path):
    import shutil

    from plugins.wan.text_encoder import TOKENIZER_SUBDIR

    root = _copy_checkpoint(checkpoint, tmp_path / "ckpt")
    shutil.rmtree(root / TOKENIZER_SUBDIR)
    (root / TOKENIZER_SUBDIR).mkdir()
    with pytest.raises(WeightsError) as info:
        core.load(T2V, preset="tiny", weights=root, device="cpu")
    assert TOKENIZER_SUBDIR in str(info.value) and "tokenizer.json" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Outputs: checked before any work; the previous file survives a failed write


@pytest.mark.parametrize("case_id", ["suffix-txt", "suffix-png-for-video", "out-is-directory", "parent-is-file"])
def test_output_path_problems_fail_before_the_model_is_built(case_id, capsys, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(core.loading, "load_spec", lambda *a, **k: built.append(a))
    out = {"suffix-txt": tmp_path / "foo.txt", "suffix-png-for-video": tmp_path / "foo.png",
           "out-is-directory": tmp_path / "existing.mp4", "parent-is-file": tmp_path / "file" / "v.mp4"}[case_id]
    if case_id == "out-is-directory":
        out.mkdir()
    if case_id == "parent-is-file":
        out.parent.write_text("a file")
    before = leftovers(tmp_path)
    code, err = cli(capsys, "run", T2V, "--out", out)
    assert code == 2 and err.count("\n") == 1 and err.startswith("ditkit: error:")
    assert str(out.name if case_id != "parent-is-file" else out.parent) in err
    assert built == [] and leftovers(tmp_path) == before


def test_write_output_errors_are_output_errors(tmp_path):
    image = Output(kind="image", images=torch.rand(1, 3, 8, 8))
    with pytest.raises(OutputError, match="png"):
        write_output(image, tmp_path / "foo.txt")
    with pytest.raises(OutputError, match="png"):
        write_output(image, tmp_path / "foo.mp4")  # .mp4 for an image model
    with pytest.raises(OutputError, match="non-finite"):
        write_output(Output(kind="image", images=torch.full((1, 3, 8, 8), NAN)), tmp_path / "nan.png")
    assert leftovers(tmp_path) == []


def test_mp4_of_an_image_model_fails_before_work_on_the_cli(example, capsys, tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(core.loading, "load_spec", lambda *a, **k: built.append(a))
    code, err = cli(capsys, "run", "example", "--out", tmp_path / "x.mp4")
    assert code == 2 and ".png" in err and leftovers(tmp_path) == [] and built == []


def test_read_only_directory_fails_before_work():
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="ditkit-ro-"))  # pytest's tmp_path is 0700: nobody could not reach it
    os.chmod(top, 0o755)
    ro = top / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    request = ro / "v.mp4"
    # root writes anywhere: import as root (the interpreter lives under /root), then become nobody
    code = ("import os, core.outputs\nif os.getuid() == 0: os.setuid(65534)\n"
            "core.outputs.check_output_path(%r, 'video')" % str(request))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         timeout=120, cwd=ROOT)
    try:
        assert res.returncode != 0 and "OutputError" in res.stderr and "permission denied" in res.stderr
        assert leftovers(ro) == []
    finally:
        shutil.rmtree(top)


def test_full_disk_is_one_line_and_the_previous_file_survives(tmp_path):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"previous result")

    def limit():  # a 1 KiB file-size limit: the MP4 write fails as on a full disk
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    env = {**subprocess_env(), "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([sys.executable, "-m", "core.cli", "run", T2V, "--steps", "1", "--height", "64", "--width", "64",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT, preexec_fn=limit)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1 and "cannot write" in res.stderr and str(out) in res.stderr
    assert out.read_bytes() == b"previous result"
    assert leftovers(tmp_path) == ["v.mp4"]


def test_stale_temporary_of_a_killed_writer_is_removed_and_a_live_one_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".v.mp4.{dead.pid}.abc123.mp4"
    live = tmp_path / f".v.mp4.{os.getppid()}.def456.mp4"  # a concurrent writer still running
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    write_output(Output(kind="video", video=torch.rand(1, 3, 1, 16, 16)), tmp_path / "v.mp4")
    assert not stale.exists() and live.exists()
    assert remove_stale_temporaries(tmp_path / "v.mp4") == []


def test_same_tensors_give_the_same_mp4_and_wav_bytes(tmp_path):
    import hashlib

    g = torch.Generator().manual_seed(0)
    video = Output(kind="video", video=torch.rand(1, 3, 9, 64, 96, generator=g), fps=16.0)
    audio = Output(kind="audio", audio=torch.rand(1, 2, 4800, generator=g) * 2 - 1, sample_rate=48000)
    both = Output(kind="video+audio", video=video.video, audio=audio.audio, fps=16.0, sample_rate=48000)
    for out, suffix in ((video, ".mp4"), (audio, ".wav"), (both, ".mp4")):
        sums = set()
        for i in range(3):
            (path,) = write_output(out, tmp_path / f"{out.kind}{i}{suffix}")
            sums.add(hashlib.sha256(path.read_bytes()).hexdigest())
        assert len(sums) == 1, out.kind


# ---------------------------------------------------------------------------------------------
# Non-finite latents and outputs, plugins whose pipeline misbehaves


def test_non_finite_latent_is_an_error_naming_the_step(t2v, monkeypatch):
    real = type(t2v.dit).forward
    calls = []

    def forward(self, x, *a, **k):
        calls.append(1)
        out = real(self, x, *a, **k)
        return out * INF if len(calls) == 2 else out  # the second model call (step 2) overflows

    monkeypatch.setattr(type(t2v.dit), "forward", forward)
    with pytest.raises(GenerationError, match="step 2 of 3") as info:
        t2v("a fox", num_inference_steps=3, guidance_scale=1.0, height=16, width=16, num_frames=1)
    assert info.value.step == 2 and len(calls) == 2  # stopped there: no work after the bad step


class _Bad(core.Pipeline):
    result = "nan"

    def __init__(self, config, *, device, dtype, weights):
        super().__init__(device=device, dtype=dtype)
        if config.get("raise"):
            raise RuntimeError("factory exploded")

    def generate(self, **args):
        if self.result == "dict":
            return {"images": torch.zeros(1, 3, 16, 16)}
        return Output(kind="image", images=torch.full((1, 3, 16, 16), NAN))


def _bad_registry(monkeypatch):
    from core import hookimpl
    from core.registry import Registry
    from core.spec import ModelSpec, Preset

    class Plug:
        @hookimpl
        def ditkit_register_models(self):
            return [ModelSpec(name="bad-nan", pipeline=_Bad, presets={"tiny": Preset(random_weights=True)}),
                    ModelSpec(name="bad-factory", pipeline=_Bad, presets={"tiny": Preset(random_weights=True, config={"raise": True})})]

    reg = Registry(strict=True)
    reg.add_plugin(Plug(), name="badplug", distribution="bad-dist")
    monkeypatch.setattr(core.registry, "_registry", reg.collect())


def test_plugin_faults_are_plugin_errors_naming_plugin_and_model(monkeypatch, capsys, tmp_path):
    _bad_registry(monkeypatch)
    with pytest.raises(PluginError, match="badplug.*bad-factory.*factory exploded"):
        core.load("bad-factory", device="cpu")
    pipe = core.load("bad-nan", device="cpu")
    with pytest.raises(GenerationError, match="bad-nan.*non-finite"):
        pipe("a fox", num_inference_steps=1, height=16, width=16)
    pipe.result = "dict"
    with pytest.raises(PluginError, match="badplug.*bad-nan.*core.Output.*dict"):
        pipe("a fox", num_inference_steps=1, height=16, width=16)
    for model in ("bad-nan", "bad-factory"):
        code, err = cli(capsys, "run", model, "--steps", "1", "--height", "16", "--width", "16", "--out", tmp_path / "x.png")
        assert code == 2 and err.count("\n") == 1 and model in err
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Signals: Ctrl-C and SIGTERM during denoising or writing


_SIGNAL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import core.outputs, core.pipeline
    where = sys.argv[1]
    if where == "denoise":
        real = core.pipeline.Pipeline.denoise
        def denoise(self, *a, **k):
            print("READY", flush=True); time.sleep(60)
        core.pipeline.Pipeline.denoise = denoise
    else:
        import av
        real_open = av.open
        def slow_open(*a, **k):  # the temporary exists now; stall inside the writer
            c = real_open(*a, **k)
            print("READY", flush=True); time.sleep(60)
            return c
        av.open = slow_open
    from core.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


SIGNAL_CASES = [(signal.SIGINT, "denoise", 130), (signal.SIGINT, "write", 130), (signal.SIGTERM, "write", 143)]


def test_signals_exit_cleanly_and_remove_the_temporary(tmp_path):
    """Ctrl-C during denoising and during MP4 writing exits 130, SIGTERM during writing 143, each
    with one line and no temporary left (the three runs overlap to share the start-up time)."""
    runs = []
    for i, (sig, where, code) in enumerate(SIGNAL_CASES):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_SCRIPT, where, "run", T2V, "--steps", "1", "--num-frames",
                                 "1", "--height", "16", "--width", "16", "--out", str(folder / "v.mp4")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT)
        runs.append((proc, folder, sig, where, code))
    try:
        for proc, folder, sig, where, code in runs:
            assert proc.stdout.readline().strip() == "READY"
            if where == "write":
                assert [p.name for p in folder.iterdir() if p.name.startswith(".v.mp4.")], "no temporary to clean up"
            proc.send_signal(sig)
        for proc, folder, sig, where, code in runs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == code, (sig, where, err[-2000:])
            assert err.count("\n") == 1 and err.startswith("ditkit:") and "Traceback" not in err
            assert leftovers(folder) == []
    finally:
        for proc, *_ in runs:
            proc.kill()


# ---------------------------------------------------------------------------------------------
# Property: random argument dictionaries give a valid output or an InputError, nothing else

_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([0, 1, 5, 16, 17, 32, 2**70, -(2**70)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([NAN, INF, -INF, 0.0, 1.0, 4.5, -1.0, 1e308]),
    st.text(max_size=6), st.just(torch.zeros(3, 0, 0)),
)
_KEYS = ["num_inference_steps", "guidance_scale", "guidance_scale_low", "height", "width", "num_frames", "shift",
         "fps", "seed", "negative_prompt", "tiled", "boundary", "image", "steps", "foo"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4))
@example({"guidance_scale": NAN})  # always tried: the cases users hit, besides the random draws
@example({"shift": INF, "fps": 8})
@example({"seed": 2**70})
def test_random_arguments_give_output_or_input_error(t2v, args):
    call = {"num_inference_steps": 1, "height": 16, "width": 16, "num_frames": 1, **args}
    # keep valid draws tiny: the property is about the checks, not about large generations
    for key, cap in (("num_inference_steps", 2), ("height", 32), ("width", 32), ("num_frames", 5)):
        value = call.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap and value < 10**6:
            call[key] = cap
    try:
        out = t2v("a fox", **call)
    except InputError:
        return
    assert isinstance(out, Output) and out.kind == "video" and bool(torch.isfinite(out.video).all())


def test_usp_under_torchrun_builds_on_the_ranks_gpu_before_anything_else(monkeypatch):
    """``core.load(use_usp=True)`` on rank 3 of a torchrun job picks ``cuda:3`` (LOCAL_RANK) before
    the factory runs, so no rank builds on GPU 0 (CUDA is faked: only the choice is tested)."""
    from core.spec import ModelSpec, Preset

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(str(d)))
    monkeypatch.setenv("LOCAL_RANK", "3")
    built = []

    def factory(config, *, device, dtype, weights):
        built.append((str(device), current[:]))
        raise InputError("stop before building on a fake GPU")

    spec = ModelSpec(name="gpu-probe", pipeline=factory, presets={"tiny": Preset(random_weights=True)})
    for device in (None, "cuda"):
        with pytest.raises(InputError, match="stop"):
            core.loading.load_spec(spec, device=device, use_usp=True)
    assert built == [("cuda:3", ["cuda:3"]), ("cuda:3", ["cuda:3", "cuda:3"])]


def test_checking_a_long_prompt_prints_no_tokenizer_warning(t2v, caplog, monkeypatch):
    import logging

    from plugins.wan.text_encoder import tiny_tokenizer

    # a fresh tokenizer: transformers prints this warning once per tokenizer object
    monkeypatch.setattr(t2v.prompt_encoder, "tokenizer", tiny_tokenizer(t2v.prompt_encoder.text_len))
    args = t2v.resolve(prompt="a fox " * 400, seed=0, **SMALL)
    with caplog.at_level(logging.WARNING), pytest.raises(InputError, match="prompt is .* tokens"):
        t2v.check_inputs(args)
    assert not [r for r in caplog.records if "longer than the specified maximum" in r.getMessage()]
