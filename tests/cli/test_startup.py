"""The commands that only parse, list or print help start without PyTorch or the models:
each case runs the command line in a fresh interpreter and looks at ``sys.modules``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from denseclip.cli import COMMANDS, arguments, build_parser

ROOT = Path(__file__).parents[2]
PROBE = """
import json, sys
import denseclip.cli
try:
    status = denseclip.cli.main(sys.argv[1:])
except SystemExit as e:  # --help exits through argparse
    status = e.code
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(
    ("torch.", "torchvision", "denseclip.models", "denseclip.tasks", "denseclip.inference")))
print("PROBE " + json.dumps({"status": status, "heavy": heavy}))
"""


def probe(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("PROBE "), run.stdout[-2000:]
    return {**json.loads(line.removeprefix("PROBE ")), "stdout": run.stdout}


LIGHT = [["--help"], ["presets"], ["presets", "--json"], ["presets", "--task", "retinanet"],
         *[[c.name, "--help"] for c in COMMANDS]]


@pytest.mark.parametrize("argv", LIGHT, ids=" ".join)
def test_light_commands_import_no_torch(argv):
    result = probe(*argv)
    assert result["status"] == 0
    assert result["heavy"] == [], result["heavy"]


def test_download_list_imports_no_torch(tmp_path):
    result = probe("download", "--list", "--cache-dir", str(tmp_path))
    assert result["status"] == 0 and "RN50" in result["stdout"]
    assert result["heavy"] == []


def test_the_probe_sees_torch_when_a_command_needs_it():
    """The check above can fail: a command that builds a model does import torch."""
    result = probe("flops", "tiny_denseclip_res", "--json")
    assert result["status"] == 0 and "torch" in result["heavy"]


def test_argument_constants_equal_the_code_they_stand_for():
    """The parser states a few values without importing their torch-backed modules."""
    from denseclip.config import Task
    from denseclip.runtime import PRECISIONS
    from denseclip.tools import demo

    assert arguments.PRECISIONS == PRECISIONS
    assert arguments.TASKS == typing.get_args(Task)
    assert arguments.DEMO_REQUEST_TIMEOUT == demo.REQUEST_TIMEOUT
    assert arguments.DEMO_MAX_CONNECTIONS == demo.MAX_CONNECTIONS


def test_every_command_has_a_help_line_and_arguments():
    parser = build_parser()
    text = parser.format_help()
    for command in COMMANDS:
        assert command.name in text and command.help
