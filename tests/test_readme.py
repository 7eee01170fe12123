"""The README's code blocks run, or say why they cannot.

Every fenced block has a language. A ``bash``/``sh``/``console``/``python`` block either
carries a visible marker on the line just before its fence,

    *Needs a dataset (ADE20K), GPUs and a download (`RN50.pt`).*

(an italic line starting with "Needs" that names a GPU, a dataset or a download), or it is
run here: Python blocks with ``exec``, shell blocks command by command through the real
command line (``denseclip.cli.main``, in this process), all in one folder where the names
the README uses exist. A new block therefore either runs or says what it needs.

What stands in for what a reader would have (kept few, and listed here):

* :data:`SUBSTITUTIONS`: release presets are replaced by tiny presets of the same task, and
  the README's few-minute fine-tuning run is cut to 2 iterations (the only text changed
  before running a block);
* :data:`STAND_INS`: the checkpoint files the README names are tiny models' checkpoints of
  those presets, written by :func:`denseclip.weights.save_checkpoint`;
* ``photo.jpg``, ``photos/``, ``more/*.jpg``: generated images;
* ``work_dirs/quickstart``: a real ``denseclip quickstart`` run, shortened to 4 iterations
  on 8 images, and ``results/`` its ``denseclip test --out-dir`` output (the command the
  README gives under "What denseclip test --out-dir DIR writes").
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import denseclip
from denseclip.cli import main
from denseclip.weights import save_checkpoint
from tests.helpers.images import random_image

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL = {"bash", "sh", "console"}
CODE = SHELL | {"python"}
OTHER = {"text", "yaml"}  # shown, not run (layouts, output, a config file)
MARKER = re.compile(r"^\*Needs (?P<what>.+)\.\*$")
NEEDS = re.compile(r"\b(GPUs?|datasets?|downloads?)\b")

#: release preset -> the tiny preset of the same task that runs in its place
SUBSTITUTIONS = {
    "denseclip_fpn_res50_512x512_80k": "tiny_denseclip_res",
    "mask_rcnn_denseclip_r50_fpn_1x_coco": "tiny_mask_rcnn_denseclip",
    # the measured few-minute fine-tuning run, cut to 2 iterations (an override wins)
    "--work-dir work_dirs/shapes": "--work-dir work_dirs/shapes schedule.max_iters=2",
}
#: file the README names -> the (tiny) preset whose checkpoint stands in for it
STAND_INS = {
    "denseclip_fpn_res50.pth": "tiny_denseclip_res",  # the official ADE20K release
    "RN50.pt": "tiny_denseclip_res",  # OpenAI's CLIP file
    "mask_rcnn.pth": "tiny_mask_rcnn_denseclip",  # the official COCO release
}
#: a block containing the key must leave these files behind
WRITES = {
    'render_overlay("photo.jpg"': ["overlay.png"],
    "denseclip_fpn_res50.pth photo.jpg --out out/": ["out/photo_overlay.png",
                                                     "out/photo_heatmap_cat.png"],
    "denseclip_fpn_res50.pth clip.mp4 --out out/": ["out/clip_overlay.mp4",
                                                   "out/clip_frames/000011_labels.png"],
    "denseclip plot work_dirs/quickstart ": ["work_dirs/quickstart/plots/loss.png",
                                             "figures/loss.png"],
}


@dataclass(frozen=True)
class Block:
    """A fenced block of the README: where it starts, its language, code and marker."""

    line: int
    language: str
    code: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}:{self.language}"


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``; a marker is the last non-blank line before a fence."""
    found, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: a code block is never closed"
        before = [line for line in lines[:start] if line.strip()]
        marker = before[-1] if before and MARKER.match(before[-1]) else None
        found.append(Block(start + 1, fence.group(1), "\n".join(lines[start + 1 : i]), marker))
        i += 1
    return found


BLOCKS = read_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.language in CODE and b.marker is None]


def substitute(code: str) -> str:
    for name, tiny in SUBSTITUTIONS.items():
        code = code.replace(name, tiny)
    return code


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continued lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [argv for line in joined.split("\n") if (argv := shlex.split(line, comments=True))]


@contextlib.contextmanager
def inside(folder: Path):
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def cli(*argv: str) -> None:
    status = main(list(argv))
    assert status == 0, f"`denseclip {shlex.join(argv)}` exited with {status}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder holding every name the runnable blocks use (see the module docstring)."""
    root = tmp_path_factory.mktemp("readme")
    Image.fromarray(random_image(72, 96, 0)).save(root / "photo.jpg", quality=95)
    for folder, name, seed in [("photos", "a.jpg", 1), ("photos", "b.png", 2),
                               ("more", "c.jpg", 3)]:
        (root / folder).mkdir(exist_ok=True)
        Image.fromarray(random_image(64, 80, seed)).save(root / folder / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # random text encoders say so
        for name, preset in STAND_INS.items():
            torch.manual_seed(0)
            save_checkpoint(root / name, denseclip.build_model(denseclip.load_config(preset)))
        with inside(root):
            data = "work_dirs/quickstart/data"
            cli("quickstart", "--num-train", "8", "--num-val", "2", "--no-progress",
                "schedule.max_iters=4", "schedule.warmup_iters=1",
                "schedule.checkpoint_interval=4", "schedule.log_interval=1",
                "data.num_workers=0")
            cli("test", "quickstart", "work_dirs/quickstart/iter_4.pth", f"data.root={data}",
                f"model.classes={data}/classes.txt", "data.num_workers=0",
                "--out-dir", "results/")
    return root


def test_every_code_block_runs_here_or_says_what_it_needs():
    assert len(BLOCKS) > 20 and RUNNABLE
    for block in BLOCKS:
        assert block.language in CODE | OTHER, (
            f"{block.id}: give the block a language ({', '.join(sorted(CODE | OTHER))}); "
            f"`text` for layouts and output")
        if block.marker is not None:
            assert NEEDS.search(MARKER.match(block.marker).group("what")), (
                f"{block.id}: the marker {block.marker!r} must name a GPU, a dataset or a "
                f"download")
    for block in RUNNABLE:
        if block.language in SHELL:
            for argv in shell_commands(substitute(block.code)):
                assert argv[0] == "denseclip", (
                    f"{block.id}: `{shlex.join(argv)}` cannot run in the tests: make it a "
                    f"denseclip command or mark the block (*Needs ...*)")


def test_the_reader_is_told_of_every_substitution():
    text = README.read_text(encoding="utf-8")
    runnable = "\n".join(b.code for b in RUNNABLE)
    for name in [*SUBSTITUTIONS, *STAND_INS]:
        assert name in runnable, f"{name} is no longer used by a runnable block: drop it"
    for key in WRITES:
        assert key in runnable, f"no runnable block contains {key!r}"
    assert len(SUBSTITUTIONS) + len(STAND_INS) <= 6  # few, or the README no longer says it
    assert "docs/overlay_example.png" in text


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs(block, sandbox):
    for files in [v for key, v in WRITES.items() if key in block.code]:
        for name in files:  # written by this block, not left over from another
            (sandbox / name).unlink(missing_ok=True)
    with inside(sandbox), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if block.language == "python":
            code = compile(substitute(block.code), block.id, "exec")
            exec(code, {"__name__": "__readme__"})  # noqa: S102 - the README's own code
        else:
            for argv in shell_commands(substitute(block.code)):
                cli(*argv[1:])
    for files in [v for key, v in WRITES.items() if key in block.code]:
        for name in files:
            assert (sandbox / name).is_file(), f"{block.id} did not write {name}"


def test_blocks_are_parsed_with_their_markers():
    text = "\n".join([
        "Intro:", "", "*Needs a GPU.*", "```bash", "denseclip train x \\", "  --y z  # c",
        "```", "", "```python", "print(1)", "```", "```", "layout", "```",
    ])
    first, second, third = read_blocks(text)
    assert (first.line, first.language, first.marker) == (4, "bash", "*Needs a GPU.*")
    assert shell_commands(first.code) == [["denseclip", "train", "x", "--y", "z"]]
    assert (second.language, second.marker, second.code) == ("python", None, "print(1)")
    assert third.language == "" and third.code == "layout"
    with pytest.raises(AssertionError, match="never closed"):
        read_blocks("```bash\nls\n")


def test_quickstart_stand_in_is_a_real_run(sandbox):
    # What the blocks see as work_dirs/quickstart is a training run's own output.
    work = sandbox / "work_dirs" / "quickstart"
    assert (work / "iter_4.pth").is_file() and (work / "metrics.jsonl").stat().st_size > 0
    assert (sandbox / "results" / "confusion_matrix.npy").is_file()
