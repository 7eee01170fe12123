"""Checkpoint formats: ours, plain state dicts, official DenseCLIP releases, OpenAI CLIP."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import denseclip
from denseclip.models.official import OFFICIAL_SEGMENTATION_RENAMES
from denseclip.weights import CheckpointError, convert_state_dict, save_checkpoint
from tests.helpers.clip import FakeOpenAICLIP

OFFICIAL_KEYS = Path(__file__).parent / "fixtures" / "official_keys"
SEG_PRESETS = [
    "fpn_clipres50_512x512_80k", "denseclip_fpn_res50_512x512_80k",
    "fpn_clipres101_512x512_80k", "denseclip_fpn_res101_512x512_80k",
    "fpn_clipvit-b_640x640_80k", "denseclip_fpn_vit-b_640x640_80k",
]


def build(name: str, *overrides: str) -> nn.Module:
    torch.manual_seed(0)
    return denseclip.build_model(denseclip.load_config(name, overrides)).eval()


def read_official_keys(name: str) -> dict[str, torch.Tensor]:
    keys = {}
    for line in (OFFICIAL_KEYS / f"{name}.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        keys[key] = torch.empty(ast.literal_eval(shape), dtype=getattr(torch, dtype),
                                device="meta")
    return keys


@pytest.mark.parametrize("name", SEG_PRESETS)
def test_official_keys_map_onto_every_model_key(name):
    with torch.device("meta"):
        model = denseclip.build_model(denseclip.load_config(name))
    model_sd = model.state_dict()
    official = read_official_keys(name)
    converted, ignored = convert_state_dict(official, "official", model_sd,
                                            OFFICIAL_SEGMENTATION_RENAMES)
    assert ignored == []
    assert len(converted) == len(official)  # the renaming is one-to-one
    assert sorted(converted) == sorted(model_sd)
    for key, value in converted.items():
        assert value.shape == model_sd[key].shape, key


# Our key → the official key, written out independently of the package's rename table.
def to_official(key: str) -> str:
    if key.startswith("guidance.text_encoder."):
        return key.removeprefix("guidance.")
    if key.startswith("guidance."):
        return key.removeprefix("guidance.")
    if key.startswith("head."):
        return "decode_head." + key.removeprefix("head.")
    m = re.match(r"neck\.(lateral_convs|fpn_convs)\.(\d+)\.(weight|bias)$", key)
    if m:
        return f"neck.{m[1]}.{m[2]}.conv.{m[3]}"
    return key


@pytest.mark.parametrize("name", ["tiny_denseclip_res", "tiny_denseclip_vit", "tiny_clip_res"])
def test_official_release_file_loads_with_identical_outputs(tmp_path, name):
    source = build(name)
    sd = {to_official(k): v for k, v in source.state_dict().items()}
    path = tmp_path / "release.pth"
    torch.save({"meta": {"CLASSES": ["a", "b"], "iter": 80000}, "state_dict": sd}, path)
    target = build(name)
    torch.manual_seed(1)
    for p in target.parameters():  # make sure the load, not the seed, makes them equal
        p.data.normal_()
    report = denseclip.load_checkpoint(target, path)
    assert report.format == "official"
    assert report.new == [] and report.ignored == []
    x = torch.randn(1, 3, 64, 64)
    # Exact: the same weights through the same operations, on one machine.
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny_denseclip_res", "tiny_denseclip_vit"])
def test_own_checkpoint_and_plain_state_dict_round_trip(tmp_path, name):
    source = build(name)
    x = torch.randn(2, 3, 64, 80)
    expected = source(x)
    save_checkpoint(tmp_path / "ours.pth", source, iteration=7)
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    for file, fmt in (("ours.pth", "denseclip"), ("plain.pth", "state_dict")):
        target = build(name)
        for p in target.parameters():
            p.data.zero_()
        report = denseclip.load_checkpoint(target, tmp_path / file)
        assert report.format == fmt
        # Exact: the same weights through the same operations, on one machine.
        torch.testing.assert_close(target(x), expected, rtol=0, atol=0)
    assert report.extra == {} and denseclip.load_checkpoint(
        build(name), tmp_path / "ours.pth").extra == {"iteration": 7}


def test_save_checkpoint_leaves_no_temporary_file(tmp_path):
    save_checkpoint(tmp_path / "a" / "ckpt.pth", build("tiny_clip_res"))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["ckpt.pth"]


@pytest.mark.parametrize("vit", [False, True])
def test_openai_torchscript_archive_initialises_towers(tmp_path, vit):
    torch.manual_seed(3)
    clip = FakeOpenAICLIP(vit).eval()
    archive = tmp_path / "RN-tiny.pt"
    torch.jit.save(torch.jit.trace(clip, torch.randn(1, 3)), str(archive))
    name = "tiny_denseclip_vit" if vit else "tiny_denseclip_res"
    model = build(name)
    report = denseclip.load_checkpoint(model, archive)
    assert report.format == "openai"
    assert "logit_scale" in report.ignored
    clip_sd, sd = clip.state_dict(), model.state_dict()
    # Towers are copied; the text position embedding is truncated to 13 positions.
    torch.testing.assert_close(sd["guidance.text_encoder.positional_embedding"],
                               clip_sd["positional_embedding"][:13])
    torch.testing.assert_close(sd["guidance.text_encoder.transformer.resblocks.1.mlp.c_fc.weight"],
                               clip_sd["transformer.resblocks.1.mlp.c_fc.weight"])
    conv = "backbone.conv1.weight"
    torch.testing.assert_close(sd[conv], clip_sd["visual.conv1.weight"])
    # The 7x7 (ResNet) / 14x14 (ViT) position grid is resized to the 64-px config's grid.
    pos = "backbone.positional_embedding" if vit else "backbone.attnpool.positional_embedding"
    grid = 64 // (16 if vit else 32)
    assert (pos, tuple(clip_sd[pos.replace("backbone.", "visual.")].shape),
            (grid * grid + 1, sd[pos].shape[1])) in report.resized
    torch.testing.assert_close(sd[pos][0], clip_sd[pos.replace("backbone.", "visual.")][0])
    # Everything DenseCLIP adds on top of CLIP is left at its initialisation, nothing else.
    assert all(re.match(r"(guidance\.(contexts|gamma|context_decoder)|neck|head|backbone\.fpn)",
                        k) or k.endswith("num_batches_tracked") for k in report.new)
    assert any(k.startswith("head.") for k in report.new)


def test_openai_plain_state_dict_into_baseline_ignores_text_tower(tmp_path):
    clip = FakeOpenAICLIP(vit=False)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    model = build("tiny_clip_res")
    report = denseclip.load_checkpoint(model, tmp_path / "clip.pt")
    assert report.format == "openai"
    assert "token_embedding.weight" in report.ignored
    assert any(k.startswith("visual.attnpool.") for k in report.ignored)


def test_missing_and_unknown_keys_are_listed(tmp_path):
    model = build("tiny_clip_res")
    sd = model.state_dict()
    del sd["head.conv_seg.weight"]
    sd["head.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        denseclip.load_checkpoint(model, tmp_path / "bad.pth")
    assert "head.conv_seg.weight" in str(err.value) and "head.extra.weight" in str(err.value)
    assert "bad.pth" in str(err.value)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    model = build("tiny_clip_res")
    sd = model.state_dict()
    sd["head.conv_seg.weight"] = torch.zeros(7, 32, 1, 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"head\.conv_seg\.weight.*\[7, 32, 1, 1\].*"
                                              r"\[150, 32, 1, 1\]"):
        denseclip.load_checkpoint(model, tmp_path / "bad.pth")


class NotAWeight:
    pass


def test_files_that_are_not_checkpoints(tmp_path):
    model = build("tiny_clip_res")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt is not a PyTorch checkpoint"):
        denseclip.load_checkpoint(model, tmp_path / "notes.txt")
    (tmp_path / "hostname").write_text("worker-7f3a\n")  # once read as "Python objects"
    with pytest.raises(CheckpointError, match="hostname is not a PyTorch checkpoint .*neither "
                                              "a zip archive nor a pickle"):
        denseclip.load_checkpoint(model, tmp_path / "hostname")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        denseclip.load_checkpoint(model, tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        denseclip.load_checkpoint(model, tmp_path / "list.pth")
    with open(tmp_path / "object.pth", "wb") as f:
        pickle.dump({"model": NotAWeight()}, f)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        denseclip.load_checkpoint(model, tmp_path / "object.pth")


# ---------------------------------------------------------------------------- a full disk
# Saves a checkpoint, then one too large for the disk; prints the error, what the file
# holds afterwards and the directory's contents (a private tmpfs is not visible outside).
FULL_DISK_SCRIPT = """
import os, sys
from torch import nn
from denseclip.weights import DiskFullError, read_checkpoint, save_checkpoint
path = sys.argv[1]
save_checkpoint(path, nn.Linear(4, 4), iteration=1)
try:
    save_checkpoint(path, nn.Linear(1024, 1024), iteration=2)  # 4 MB
except DiskFullError as e:
    print(e)
print(read_checkpoint(path)["iteration"])
print(sorted(os.listdir(os.path.dirname(path))))
"""


def _check_full_disk_run(run, path: Path) -> str:
    assert run.returncode == 0, run.stderr
    message, iteration, files = run.stdout.strip().splitlines()
    assert message.startswith(f"no space left on device writing {path} (4 MB needed")
    assert iteration == "1"  # the previous checkpoint is intact
    assert files == "['ckpt.pth']"  # and no temporary is left behind
    return message


def test_a_file_size_limit_while_saving_is_reported_as_a_full_disk(tmp_path):
    import resource
    import signal
    import subprocess
    import sys

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    path = tmp_path / "ckpt.pth"
    run = subprocess.run([sys.executable, "-c", FULL_DISK_SCRIPT, str(path)],
                         capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert "file-size limit" in _check_full_disk_run(run, path)


def test_a_full_filesystem_while_saving_is_reported(tmp_path):
    """ENOSPC for real: a 1 MB tmpfs mounted in a private user and mount namespace."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged mount namespaces are not available here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" -c '
         '"$3" "$1/ckpt.pth"', "sh", str(mnt), sys.executable, FULL_DISK_SCRIPT],
        capture_output=True, text=True, timeout=120)
    if "mount" in run.stderr and run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    assert "file-size limit" not in _check_full_disk_run(run, mnt / "ckpt.pth")


def test_save_pretrained_reports_a_full_disk_in_the_same_words(tmp_path):
    import resource
    import subprocess
    import sys

    script = ("import sys\nimport denseclip\nmodel = denseclip.build_model("
              "denseclip.load_config('tiny_denseclip_res'))\n"
              "try:\n    model.save_pretrained(sys.argv[1])\n"
              "except denseclip.weights.DiskFullError as e:\n    print(e)\n")
    out = tmp_path / "saved"
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                         text=True, timeout=120, preexec_fn=lambda: resource.setrlimit(
                             resource.RLIMIT_FSIZE, (2**20, 2**20)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"no space left on device writing {out / 'model.safetensors'}")
    assert [p.name for p in out.iterdir()] == []  # no temporary left behind
