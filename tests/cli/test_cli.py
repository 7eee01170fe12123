import json
import subprocess
import sys

import pytest

import denseclip
from denseclip.cli import COMMANDS, build_parser, main

REPORT_KEYS = {"input_size", "params", "gmacs"}


def run_json(capsys, *argv: str) -> dict:
    assert main(["flops", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # exactly one JSON object
    return json.loads(out)


def test_flops_json_shape(capsys):
    result = run_json(capsys, "tiny_denseclip_res")
    assert REPORT_KEYS <= set(result)
    assert result["config"] == "tiny_denseclip_res"
    # Default size: the config's crop size.
    assert result["input_size"] == denseclip.load_config("tiny_denseclip_res").data.crop_size
    assert set(result["params"]) == {"total", "trainable", "excluding_text_encoder"}
    assert all(isinstance(v, int) for v in result["params"].values())
    gmacs = result["gmacs"]
    assert {"total", "excluding_text_encoder", "by_module"} <= set(gmacs)
    assert {"backbone", "text_encoder", "context_decoder", "neck", "head"} <= set(
        gmacs["by_module"])
    assert sum(gmacs["by_module"].values()) == pytest.approx(gmacs["total"])
    assert gmacs["excluding_text_encoder"] == pytest.approx(
        gmacs["total"] - gmacs["by_module"]["text_encoder"])


def test_flops_size_and_overrides_after_options(capsys):
    base = run_json(capsys, "tiny_clip_res", "--size", "96", "128")
    assert base["input_size"] == [96, 128]
    wider = run_json(capsys, "tiny_clip_res", "--size", "96", "128", "model.neck_channels=48")
    assert wider["params"]["total"] > base["params"]["total"]
    assert wider["gmacs"]["total"] > base["gmacs"]["total"]
    # Overrides may also come straight after the config name.
    same = run_json(capsys, "tiny_clip_res", "model.neck_channels=48", "--size", "96", "128")
    assert same == wider


def test_flops_table(capsys):
    assert main(["flops", "tiny_denseclip_vit"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny_denseclip_vit\n")
    for word in ("backbone", "text_encoder", "context_decoder", "neck", "head",
                 "excluding text encoder", "trainable"):
        assert word in out


def test_unknown_preset_exits_2_with_list(capsys):
    assert main(["flops", "no_such_preset"]) == 2
    err = capsys.readouterr().err
    assert "no_such_preset" in err
    assert all(name in err for name in denseclip.available_presets())
    assert "Traceback" not in err


def test_bad_override_exits_2(capsys):
    assert main(["flops", "tiny_clip_res", "model.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["flops", "tiny_clip_res", "--no-such-option"])
    assert exc.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_commands_registered_once(capsys):
    names = [c.name for c in COMMANDS]
    assert len(names) == len(set(names)) and "flops" in names
    help_text = build_parser().format_help()
    assert all(name in help_text for name in names)
    assert main(["presets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == denseclip.available_presets()


def test_python_m_denseclip(capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "denseclip", "flops", "tiny_denseclip_res", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == run_json(capsys, "tiny_denseclip_res")


def test_python_m_denseclip_unknown_preset():
    proc = subprocess.run(
        [sys.executable, "-m", "denseclip", "flops", "no_such_preset"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "available presets" in proc.stderr and "Traceback" not in proc.stderr
