"""A mistyped key is reported where it was written, an override or a file, with the
closest valid key."""

from __future__ import annotations

import pytest

from denseclip.cli import main
from denseclip.config import ConfigError, load_config


def test_an_override_typo_names_the_override_and_suggests_the_key():
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", ["optim.lrr=1"])
    message = str(info.value)
    assert message.startswith("override optim.lrr=1 (on ")
    assert "did you mean optim.lr?" in message and "unknown key(s) lrr" in message


def test_a_section_typo_suggests_the_section():
    with pytest.raises(ConfigError, match=r"^override optimm\.lr=1 .*did you mean optim\?"):
        load_config("tiny_denseclip_res", ["optimm.lr=1"])


def test_a_file_typo_names_the_file_and_suggests_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("_base_: tiny_denseclip_res\nmodel: {neck_chanels: 16}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "did you mean model.neck_channels?" in message


def test_no_suggestion_when_nothing_is_close():
    with pytest.raises(ConfigError) as info:
        load_config("tiny_denseclip_res", ["optim.zzzzzz=1"])
    assert "did you mean" not in str(info.value) and "valid keys: lr" in str(info.value)


def test_the_cli_prints_one_line_for_an_override_typo(capsys):
    assert main(["presets"]) == 0 and capsys.readouterr()
    assert main(["flops", "quickstart", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("denseclip flops: error: override optim.lrr=1")
