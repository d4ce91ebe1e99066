import json
import subprocess
import sys

import pytest

from .conftest import subprocess_env


def ditkit(*args, sites=(), check=True, timeout=300):
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(*sites), timeout=timeout, check=check)


def test_plugins_json_lists_distribution_hooks_models_and_load_errors(plugin_site):
    out = json.loads(ditkit("plugins", "--json", sites=[plugin_site]).stdout)
    (plugin,) = [p for p in out["plugins"] if p["name"] == "example"]
    assert plugin["distribution"] == "ditkit-example-plugin" and plugin["version"] == "0.1.0"
    assert plugin["hooks"] == ["ditkit_register_models"] and plugin["models"] == ["example-dit"]
    assert out["models"]["example-dit"]["aliases"] == ["example"]
    assert [e["distribution"] for e in out["load_errors"]] == ["ditkit-broken-plugin"]
    # parameter bytes per preset and component, from a build on the meta device
    sizes = out["models"]["example-dit"]["sizes"]
    assert sizes["dtype"] == "bfloat16" and set(sizes["presets"]) == {"tiny", "base"}
    tiny_dit = sizes["presets"]["tiny"]["dit"]
    assert tiny_dit == {"parameters": 297168, "bytes": 2 * 297168}
    assert sizes["presets"]["base"]["dit"]["parameters"] > tiny_dit["parameters"]
    # real size: Wan2.1-T2V-1.3B's published DiT holds 1,418,996,800 parameters, its umT5-XXL 5.68 B
    wan = out["models"]["wan2.1-t2v-1.3b"]["sizes"]["presets"]["official"]
    assert wan["dit"] == {"parameters": 1418996800, "bytes": 2 * 1418996800}
    assert wan["text_encoder"]["parameters"] == 5680910336 and wan["vae"]["bytes"] == 4 * 126892531


def test_sizes_count_a_tied_parameter_once():
    """One tensor under two names (transformers' T5 ties ``shared`` to ``encoder.embed_tokens``)
    is one tensor's parameters and bytes."""
    from torch import nn

    from core.sizes import component_sizes

    encoder = nn.Module()
    encoder.shared, encoder.embed_tokens = nn.Embedding(64, 16), nn.Embedding(64, 16)
    encoder.embed_tokens.weight = encoder.shared.weight

    class Pipe:
        def components(self):
            return {"text_encoder": encoder}

    assert component_sizes(Pipe())["text_encoder"] == {"parameters": 64 * 16, "bytes": 4 * 64 * 16}


def test_plugins_text_shows_the_load_error(plugin_site):
    out = ditkit("plugins", sites=[plugin_site]).stdout
    assert "example-dit" in out and "FAILED TO LOAD" in out


def test_run_writes_a_png_and_leaves_no_temporary_file(example_site, tmp_path):
    from PIL import Image

    out = tmp_path / "fox.png"
    res = ditkit("run", "example", "--steps", "2", "--height", "48", "--width", "32", "--out", str(out), sites=[example_site])
    assert "wrote" in res.stdout
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (32, 48)
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


@pytest.mark.parametrize("args", [["--steps", "-1"], ["--height", "50"], ["--prompt", ""]])
def test_run_rejects_bad_input_with_a_clear_error(example_site, tmp_path, args):
    res = ditkit("run", "example", "--out", str(tmp_path / "x.png"), *args, sites=[example_site], check=False)
    assert res.returncode == 2 and "ditkit: error:" in res.stderr
    assert not (tmp_path / "x.png").exists()


def test_run_unknown_model_suggests_close_names(example_site):
    res = ditkit("run", "exmple-dit", sites=[example_site], check=False)
    assert res.returncode == 2 and "example-dit" in res.stderr


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_run_is_exact_unless_fp8_storage_is_asked_for(example, tmp_path, capsys):
    from core.cli import main

    for extra, lossy in (([], False), (["--weight-dtype", "float8_e4m3fn"], True)):
        assert main(["run", "example", "--steps", "1", "--no-progress", "--out", str(tmp_path / "x.png"), *extra]) == 0
        out = capsys.readouterr().out
        assert ("lossy: linear weights stored in float8_e4m3fn" in out) is lossy, (extra, out)


@pytest.mark.parametrize("args,named", [(["--shard-weights"], "--nproc"), (["--weight-dtype", "int4"], "float8_e4m3fn"),
                                        (["--nproc", "2", "--shard-weights", "--offload", "model"],
                                         "--offload model cannot be combined with --shard-weights"),
                                        (["--nproc", "2", "--shard-weights", "--weight-dtype", "float8_e4m3fn"],
                                         "--weight-dtype float8_e4m3fn cannot be combined with --shard-weights")])
def test_memory_flags_are_checked_before_any_work(example, tmp_path, capsys, args, named):
    from core.cli import main

    assert main(["run", "example", "--out", str(tmp_path / "x.png"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ditkit: error:") and named in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
