"""Loading weights runs no code from the file and accepts no non-finite numbers:
TorchScript archives are read by a restricted unpickler (``torch.jit.load`` only on explicit
opt-in), and a NaN or Inf in any floating tensor is refused naming the file and the key."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import denseclip
from denseclip.weights import (
    ENV_ALLOW_TORCHSCRIPT,
    CheckpointError,
    load_checkpoint,
    load_text_weights,
    read_checkpoint,
    save_checkpoint,
)
from denseclip.weights.torchscript import TorchScriptUnreadable, read_torchscript_weights
from tests.helpers.clip import FakeOpenAICLIP


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.randn(4))
        self.register_buffer("table", torch.arange(6).reshape(2, 3))
        self.note = torch.ones(2)  # a plain tensor attribute: not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)) * self.scale[:, None, None] + self.note.sum()


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        self.emb = nn.Parameter(torch.randn(5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x[:, :3]) if x.shape[1] != 3 else b(x)
        return self.head(x.mean((2, 3), keepdim=True)) + self.emb.sum()


class SideEffect(nn.Module):
    """Its scripted ``__setstate__`` prints a marker and overwrites the weight: both only
    happen if the archive's code runs."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        print("SCRIPTED-SETSTATE-RAN")
        self.weight = state[0]
        self.weight.data.fill_(7.0)
        self.training = state[1]


def jit_save(module: nn.Module, path: Path, trace_input: torch.Tensor | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = (torch.jit.trace(module, trace_input) if trace_input is not None
                    else torch.jit.script(module))
        torch.jit.save(scripted, str(path))
    return path


def jit_state_dict(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path)).state_dict()


def assert_same_state(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)
    for key, value in ref.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("mode", ["script", "trace", "trace-fp16"])
def test_restricted_reader_matches_jit_load(tmp_path, mode):
    torch.manual_seed(0)
    model = Nested().eval()
    x = torch.randn(1, 3, 8, 8)
    if mode == "trace-fp16":
        model = FakeOpenAICLIP(vit=True).eval().half()
        x = torch.randn(1, 3).half()
    path = jit_save(model, tmp_path / "m.pt", None if mode == "script" else x)
    got, ref = read_torchscript_weights(path), jit_state_dict(path)
    assert_same_state(got, ref)
    assert "blocks.1.note" not in got  # plain attributes are no weights
    if mode == "trace-fp16":
        assert got["visual.conv1.weight"].dtype == torch.float16
    else:
        assert "blocks.1.norm.num_batches_tracked" in got and "blocks.0.table" in got


def test_scripted_setstate_does_not_run_unless_opted_in(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(ENV_ALLOW_TORCHSCRIPT, raising=False)
    torch.manual_seed(0)
    path = jit_save(SideEffect(), tmp_path / "evil.pt")
    capfd.readouterr()
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "evil.pt" in message and "__setstate__" in message
    assert "runs code" in message and ENV_ALLOW_TORCHSCRIPT in message
    with pytest.raises(CheckpointError):
        load_checkpoint(SideEffect(), path)
    assert "SCRIPTED-SETSTATE-RAN" not in capfd.readouterr().out
    # Opting in (argument or environment) uses torch.jit.load, which runs the method.
    sd = read_checkpoint(path, allow_torchscript=True)
    assert "SCRIPTED-SETSTATE-RAN" in capfd.readouterr().out
    assert torch.all(sd["weight"] == 7)
    monkeypatch.setenv(ENV_ALLOW_TORCHSCRIPT, "1")
    read_checkpoint(path)
    assert "SCRIPTED-SETSTATE-RAN" in capfd.readouterr().out
    with pytest.raises(CheckpointError):  # the explicit argument wins over the environment
        read_checkpoint(path, allow_torchscript=False)


def test_archive_with_foreign_global_is_refused_without_running_it(tmp_path):
    path = jit_save(Nested().eval(), tmp_path / "m.pt", torch.randn(1, 3, 8, 8))
    marker = tmp_path / "marker"
    payload = (b"\x80\x02cos\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"\x85R.")
    patched = tmp_path / "patched.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(patched, "w") as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, data)
    with pytest.raises(TorchScriptUnreadable, match="os.system"):
        read_torchscript_weights(patched)
    with pytest.raises(CheckpointError, match="patched.pt.*os.system.*allow_torchscript"):
        read_checkpoint(patched)
    assert not marker.exists()


def test_truncated_storage_record_is_refused(tmp_path):
    path = jit_save(Nested().eval(), tmp_path / "m.pt", torch.randn(1, 3, 8, 8))
    patched = tmp_path / "short.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(patched, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:4] if info.filename.endswith("/data/0") else data)
    with pytest.raises(TorchScriptUnreadable, match="data/0 holds 4 bytes"):
        read_torchscript_weights(patched)


def tiny(name: str = "tiny_denseclip_res") -> nn.Module:
    torch.manual_seed(0)
    return denseclip.build_model(denseclip.load_config(name)).eval()


def test_nan_weights_are_refused_naming_file_and_key(tmp_path):
    source = tiny()
    with torch.no_grad():
        source.head.conv_seg.weight[0, :3] = float("nan")
        source.head.conv_seg.bias[1] = float("inf")
    save_checkpoint(tmp_path / "diverged.pth", source)
    target = tiny()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(target, tmp_path / "diverged.pth")
    message = str(err.value)
    assert "diverged.pth" in message and "head.conv_seg.weight" in message
    assert "3 NaN, 0 Inf" in message and "\n" not in message
    for key, value in target.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key
    # The same weights, finite, load.
    with torch.no_grad():
        source.head.conv_seg.weight.nan_to_num_(0.0)
        source.head.conv_seg.bias.nan_to_num_(0.0, posinf=0.0)
    save_checkpoint(tmp_path / "fixed.pth", source)
    assert len(load_checkpoint(target, tmp_path / "fixed.pth").loaded) == len(before)


def test_inf_in_safetensors_and_torchscript_clip_is_refused(tmp_path):
    sd = tiny().state_dict()
    sd["neck.fpn_convs.0.weight"] = sd["neck.fpn_convs.0.weight"].clone()
    sd["neck.fpn_convs.0.weight"].view(-1)[:2] = float("-inf")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"m\.safetensors: "
                                              r"neck\.fpn_convs\.0\.weight .*0 NaN, 2 Inf"):
        load_checkpoint(tiny(), tmp_path / "m.safetensors")
    clip = FakeOpenAICLIP(vit=False).eval().half()
    with torch.no_grad():
        clip.transformer.resblocks[0].attn.out_proj.weight[0, 0] = float("nan")
    path = jit_save(clip, tmp_path / "RN-nan.pt", torch.randn(1, 3).half())
    with pytest.raises(CheckpointError, match=r"RN-nan\.pt: guidance\.text_encoder\.transformer"
                                              r"\.resblocks\.0\.attn\.out_proj\.weight .*1 NaN"):
        load_checkpoint(tiny(), path)
    with pytest.raises(CheckpointError, match="1 NaN"):
        load_text_weights(tiny("tiny_denseclip_r18-in1k"), path)
