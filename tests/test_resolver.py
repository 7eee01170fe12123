"""One meaning for a weights argument everywhere (:func:`denseclip.weights.resolve`): files,
save_pretrained directories, registered names, http(s) URLs of any length, ``pretrained``
and ``none``; the commands, ``model.pretrained`` and from_pretrained all go through it.
Downloads come from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import denseclip
from denseclip.cli import main
from denseclip.weights import hub, load_checkpoint, resolve, save_checkpoint
from tests.helpers.http_server import FileServer

PAYLOAD = b"weights, byte for byte" * 64
# longer than any path the file system takes (PATH_MAX, 4096 bytes): never a path to look at
LONG = "/" + "w" * 2500 + ".pth?" + "q" * 2500


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A file server, a fresh cache in online mode, and the registry restored afterwards."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(hub.ENV_OFFLINE, raising=False)
    saved = dict(hub.REGISTRY)
    srv = FileServer()
    yield srv
    srv.close()
    hub.REGISTRY.clear()
    hub.REGISTRY.update(saved)


def register(server: FileServer, name: str, data: bytes, preset: str | None = None,
             path: str = "/weights.pt") -> None:
    server.state.files[path] = data
    hub.register(hub.WeightsEntry(name, server.url(path), None, preset, "test server", "MIT",
                                  "test payload"))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return denseclip.build_model(denseclip.load_config("tiny_denseclip_res")).eval()


def test_no_weights_files_and_saved_directories(tmp_path):
    for spec in (None, "none", "random", "RANDOM"):
        assert resolve(spec) is None
    local = tmp_path / "mine.pth"
    local.write_bytes(b"local")
    assert resolve(str(local)) == local and resolve(local) == local
    saved = tmp_path / "saved"
    saved.mkdir()
    with pytest.raises(FileNotFoundError, match="is not a file \\(a directory\\?\\)"):
        resolve(saved)
    save_file({"w": torch.zeros(2)}, str(saved / "model.safetensors"))
    assert resolve(saved) == saved / "model.safetensors"


def test_names_pretrained_and_urls_are_downloaded_once(server, tmp_path):
    register(server, "test-weights", PAYLOAD, preset="tiny_denseclip_res")
    cache = tmp_path / "cache"
    assert resolve("test-weights").read_bytes() == PAYLOAD
    assert resolve("TEST/weights", progress=False) == cache / "weights.pt"  # / for -
    assert resolve("pretrained", "tiny_denseclip_res", progress=False) == cache / "weights.pt"
    assert len(server.state.requests) == 1
    url = server.url("/direct/file.bin")
    server.state.files["/direct/file.bin"] = b"direct"
    path = resolve(url, progress=False)
    assert path.read_bytes() == b"direct" and path.parent == cache / "url"
    assert resolve(url, progress=False) == path and len(server.state.requests) == 2


def test_a_url_too_long_for_a_file_name_is_downloaded(server):
    with pytest.raises(OSError) as info:  # what looking it up on disk would do
        Path(server.url(LONG)).exists()
    assert info.value.errno == errno.ENAMETOOLONG
    server.state.files[LONG] = PAYLOAD
    path = resolve(server.url(LONG), progress=False)
    assert path.read_bytes() == PAYLOAD and len(path.name) <= hub.MAX_FILENAME


def test_missing_paths_and_unknown_names_are_told_apart(tmp_path):
    with pytest.raises(ValueError, match="tiny_clip_res"):
        resolve("pretrained", "tiny_clip_res")
    with pytest.raises(ValueError, match="needs a config preset"):
        resolve("pretrained")
    for spec in ("no_such_weights.pth", str(tmp_path / "nowhere" / "x")):
        with pytest.raises(FileNotFoundError, match=f"checkpoint {spec} does not exist"):
            resolve(spec)
    with pytest.raises(FileNotFoundError, match="neither an existing file") as info:
        resolve("no_such_weights")
    assert "RN50" in str(info.value) and "denseclip_fpn_res50_512x512_80k" in str(info.value)
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        resolve("x" * 5000)  # no OSError "File name too long" from the file system
    with pytest.raises(FileNotFoundError, match="neither a saved model directory"):
        denseclip.from_pretrained("x" * 5000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tiny_model(), "https://example.org/" + "x" * 5000 + ".pth")


def test_commands_take_a_url_checkpoint(server, tmp_path, capsys):
    """The command line once refused URLs as paths that do not exist (they contain '/')."""
    model = tiny_model()
    saved = save_checkpoint(tmp_path / "tiny.pth", model)
    server.state.files[LONG] = saved.read_bytes()
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    status = main(["predict", "tiny_denseclip_res", server.url(LONG), str(tmp_path / "a.png"),
                   "--out", str(out), "--precision", "fp32"])
    assert status == 0, capsys.readouterr().err
    assert (out / "a_labels.png").is_file() and len(server.state.requests) == 1
    assert main(["export", "tiny_denseclip_res", server.url(LONG), "--format", "safetensors",
                 "--out", str(tmp_path / "exported")]) == 0
    assert len(server.state.requests) == 1  # from the cache the second time
    loaded = denseclip.from_pretrained(tmp_path / "exported")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_model_pretrained_takes_a_registered_name(server, tmp_path):
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    register(server, "tiny-init", save_checkpoint(tmp_path / "init.pth", model).read_bytes())
    cfg = denseclip.load_config("tiny_denseclip_res", ["model.pretrained=tiny-init"])
    built = denseclip.build_model(cfg)
    for (k, a), b in zip(model.state_dict().items(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    cfg = denseclip.load_config("tiny_denseclip_res", ["model.pretrained=none"])
    assert denseclip.build_model(cfg) is not None and server.state.requests[1:] == []
