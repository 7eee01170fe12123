"""The weights registry and download cache, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import denseclip
from denseclip.cli import main
from denseclip.cli.download import describe
from denseclip.config import available_presets
from denseclip.weights import hub, resolve, save_checkpoint
from tests.helpers.http_server import FileServer

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB: several read chunks
OTHER = b"something else entirely" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    srv = FileServer()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh cache, online mode, no retry pauses, and a registry restored afterwards."""
    monkeypatch.setenv(hub.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(hub.ENV_OFFLINE, raising=False)
    monkeypatch.setattr(hub, "RETRY_DELAY_S", 0.0)
    saved = dict(hub.REGISTRY)
    yield tmp_path / "cache"
    hub.REGISTRY.clear()
    hub.REGISTRY.update(saved)


def entry(server: FileServer, name: str = "test-weights", data: bytes = PAYLOAD,
          digest: str | None = "auto", preset: str | None = None,
          path: str = "/weights.pt") -> hub.WeightsEntry:
    """Serve ``data`` at ``path`` and register it as ``name``."""
    server.state.files[path] = data
    e = hub.WeightsEntry(name, server.url(path), sha(data) if digest == "auto" else digest,
                         preset, "test server", "MIT", "test payload")
    hub.register(e)
    return e


# ------------------------------------------------------------------ registry
def test_openai_entries_take_their_sha256_from_the_url():
    for name in ("RN50", "RN101", "ViT-B-16"):
        e = hub.REGISTRY[name]
        assert e.url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert e.url.endswith(f"/{name}.pt") and e.filename == f"{name}.pt"
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        assert e.url.split("/")[-2] == e.sha256
        assert e.licence == "MIT (OpenAI CLIP)"
    # CLIP alone makes the zero-shot presets usable: "pretrained" means these files there
    assert hub.release_for_preset("clip_zeroshot_rn50") is hub.REGISTRY["RN50"]
    assert hub.release_for_preset("clip_zeroshot_vit-b") is hub.REGISTRY["ViT-B-16"]
    assert hub.REGISTRY["RN101"].preset is None


def test_releases_are_named_by_shipped_presets():
    releases = [e for e in hub.REGISTRY.values()
                if e.preset is not None and e.source != "OpenAI CLIP"]
    assert len(releases) == 7
    shipped = set(available_presets())
    for e in releases:
        assert e.name == e.preset and e.preset in shipped
        assert e.sha256 is None
        assert e.url.startswith("https://cloud.tsinghua.edu.cn/f/") and e.url.endswith("/?dl=1")
        assert e.filename == f"{e.preset}.pth"
    assert hub.release_for_preset("denseclip_fpn_res50_512x512_80k").name == releases[0].name
    assert hub.release_for_preset("tiny_denseclip_res") is None


def test_name_lookup_and_cache_dir(monkeypatch, tmp_path):
    assert hub.get_entry("vit-b/16") is hub.REGISTRY["ViT-B-16"]
    assert hub.get_entry("nope") is None
    assert hub.cache_dir() == tmp_path / "cache"
    assert hub.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(hub.ENV_CACHE)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / ".cache" / "denseclip"
    with pytest.raises(ValueError, match="already registered"):
        hub.register(hub.REGISTRY["RN50"])


# ------------------------------------------------------------------ downloading
def test_download_verifies_caches_and_then_skips_the_network(server, isolated):
    e = entry(server)
    path = hub.download("test-weights", progress=True)
    assert path == isolated / "weights.pt" and path.read_bytes() == PAYLOAD
    assert not path.with_name("weights.pt.part").exists()
    assert len(server.state.requests) == 1 and server.state.requests[0]["range"] is None
    assert hub.download(e, progress=False) == path
    assert len(server.state.requests) == 1  # the cache answered


def test_changed_cached_file_is_rehashed_and_fetched_again(server):
    entry(server)
    path = hub.download("test-weights", progress=False)
    path.write_bytes(b"corrupted")
    assert hub.download("test-weights", progress=False).read_bytes() == PAYLOAD
    assert len(server.state.requests) == 2


def test_cut_connection_is_resumed_with_a_range_request(server):
    entry(server)
    server.state.cut_once["/weights.pt"] = 10_000
    path = hub.download("test-weights", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.state.requests] == [None, "bytes=10000-"]


def test_failed_download_leaves_only_the_part_file_and_resumes_later(server, isolated):
    entry(server)
    server.state.cut_once["/weights.pt"] = 5000
    with pytest.raises(hub.DownloadError, match="interrupted") as info:
        hub.download("test-weights", progress=False, retries=0)
    assert "run again to resume" in str(info.value) and "\n" not in str(info.value)
    final = isolated / "weights.pt"
    assert not final.exists()
    assert final.with_name("weights.pt.part").read_bytes() == PAYLOAD[:5000]
    assert describe(str(isolated))[-1]["cached"] == "partial"
    assert hub.download("test-weights", progress=False).read_bytes() == PAYLOAD
    assert server.state.requests[-1]["range"] == "bytes=5000-"
    assert not final.with_name("weights.pt.part").exists()


def test_server_ignoring_range_still_gives_the_right_file(server):
    entry(server)
    server.state.ignore_range = True
    server.state.cut_once["/weights.pt"] = 7000
    assert hub.download("test-weights", progress=False).read_bytes() == PAYLOAD
    assert server.state.requests[-1]["range"] == "bytes=7000-"  # asked, answered with 200


def test_part_larger_than_the_remote_file_starts_over(server, isolated):
    entry(server, data=OTHER)
    isolated.mkdir(parents=True)
    (isolated / "weights.pt.part").write_bytes(b"x" * (len(OTHER) + 10))
    assert hub.download("test-weights", progress=False).read_bytes() == OTHER
    assert [r["range"] for r in server.state.requests] == [f"bytes={len(OTHER) + 10}-", None]


def test_redirects_keep_the_range_header(server):
    entry(server, path="/file.pt")
    server.state.redirects["/share/?dl=1"] = "/file.pt"
    e = hub.WeightsEntry("shared", server.url("/share/?dl=1"), sha(PAYLOAD), None, "s", "l", "")
    server.state.cut_once["/file.pt"] = 3000
    path = hub.download(e, progress=False)
    assert path.name == "shared.pth" and path.read_bytes() == PAYLOAD
    assert [r["range"] for r in server.state.requests] == [None, None, "bytes=3000-",
                                                           "bytes=3000-"]


def test_concurrent_downloads_of_one_file_make_one_request(server):
    entry(server)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        hub.download("test-weights", progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(p.read_bytes() == PAYLOAD for p in results)
    assert len(server.state.requests) == 1


def test_checksum_mismatch_deletes_the_file(server, isolated):
    e = entry(server, digest=sha(OTHER))
    with pytest.raises(hub.DownloadError) as info:
        hub.download("test-weights", progress=False)
    message = str(info.value)
    assert "mismatch" in message and e.url in message
    assert sha(OTHER) in message and sha(PAYLOAD) in message and "deleted" in message
    assert not (isolated / "weights.pt").exists()
    assert not (isolated / "weights.pt.part").exists()


def test_unreachable_host_is_one_line_with_the_manual_alternative(isolated, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/weights.pt"
    hub.register(hub.WeightsEntry("down", url, None, None, "s", "l", ""))
    with pytest.raises(hub.DownloadError) as info:
        hub.download("down", progress=False)
    message = str(info.value)
    assert url in message and "yourself" in message and "\n" not in message
    assert not (isolated / "weights.pt").exists()
    assert main(["download", "down", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and url in err


def test_http_error_names_the_status_and_url(server):
    e = entry(server)
    del server.state.files["/weights.pt"]
    with pytest.raises(hub.DownloadError, match="HTTP 404") as info:
        hub.download("test-weights", progress=False)
    assert e.url in str(info.value)


def test_offline_with_an_empty_cache_fails_clearly_without_requests(server, isolated,
                                                                     monkeypatch):
    e = entry(server)
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    with pytest.raises(hub.OfflineError) as info:
        hub.download("test-weights", progress=False)
    message = str(info.value)
    assert "'test-weights'" in message and str(isolated / "weights.pt") in message
    assert hub.ENV_OFFLINE in message and e.url in message and "yourself" in message
    assert server.state.requests == []


def test_offline_returns_a_cached_file(server, monkeypatch):
    entry(server)
    path = hub.download("test-weights", progress=False)
    monkeypatch.setenv(hub.ENV_OFFLINE, "1")
    assert hub.download("test-weights", progress=False) == path
    assert len(server.state.requests) == 1


def test_plain_url_goes_to_its_own_cache_folder(server, isolated):
    server.state.files["/any/model.bin"] = OTHER
    path_url = server.url("/any/model.bin")
    path = hub.download(path_url, progress=False)
    assert path.parent == isolated / "url" and path.name.endswith("-model.bin")
    assert path.name == hashlib.sha256(path_url.encode()).hexdigest()[:16] + "-model.bin"
    assert path.read_bytes() == OTHER


# ------------------------------------------------------------------ cache names (traversal)
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# request path as the server sees it (query included) -> URL as the user types it
HOSTILE = {
    "query": ("/payload?x=/../../../../../../{target}/ESCAPED", None),
    "query, relative": ("/payload?x=/../../../target/ESCAPED", None),
    "fragment": ("/payload", "#/../../../../../../{target}/ESCAPED"),
    "path": ("/a/..%2f..%2f..%2ftarget%2fESCAPED", None),
    "percent-encoded dots": ("/%2e%2e%2f%2e%2e%2f%2e%2e%2ftarget%2fESCAPED.pth", None),
    "percent-encoded, upper case": ("/%2E%2E%2F%2E%2E%2Ftarget%2FESCAPED", None),
    "absolute path in the query": ("/payload?{target}/ESCAPED.pth", None),
    "backslashes": ("/..%5c..%5ctarget%5cESCAPED.pth", None),
    "hidden name": ("/.bashrc", None),
    "only dots": ("/..", None),
    "very long": ("/" + "x" * 5000 + ".pth?" + "y" * 3000, None),
    "very long suffix": ("/model." + "z" * 400, None),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_no_url_writes_outside_the_flat_url_cache(server, isolated, tmp_path, case):
    target = tmp_path / "target"
    target.mkdir()
    request, fragment = HOSTILE[case]
    request = request.format(target=str(target).lstrip("/"))
    server.state.files[request] = OTHER
    url = server.url(request) + (fragment or "").format(target=str(target).lstrip("/"))

    path = hub.download(url, progress=False)
    assert path.read_bytes() == OTHER
    assert path.parent == isolated / "url"
    assert SAFE_NAME.fullmatch(path.name) and len(path.name) <= hub.MAX_FILENAME
    assert resolve(url, progress=False) == path
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert path in written
    for p in written:  # the file and its .lock beside it, nothing else
        assert p.parent == path.parent and p.name.startswith(path.name), p
    assert not list(target.iterdir())
    assert [d for d in (isolated / "url").iterdir() if d.is_dir()] == []


def test_cli_download_of_a_hostile_url_stays_in_the_cache(server, tmp_path, capsys):
    request = "/payload?x=/../../../../../../" + str(tmp_path).lstrip("/") + "/ESCAPED"
    server.state.files[request] = OTHER
    cache = tmp_path / "cache-cli"
    assert main(["download", server.url(request), "--cache-dir", str(cache),
                 "--no-progress"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out.parent == cache / "url" and out.read_bytes() == OTHER
    assert not list(tmp_path.glob("ESCAPED*")) and not (tmp_path / "tmp").exists()


def test_equal_file_names_of_different_urls_do_not_collide(server, isolated):
    server.state.files["/a/model.bin"] = OTHER
    server.state.files["/b/model.bin"] = PAYLOAD
    first = hub.download(server.url("/a/model.bin"), progress=False)
    second = hub.download(server.url("/b/model.bin"), progress=False)
    assert first != second and first.parent == second.parent == isolated / "url"
    assert (first.read_bytes(), second.read_bytes()) == (OTHER, PAYLOAD)


def test_registered_names_are_sanitised_too(server, isolated, tmp_path):
    server.state.files["/noext"] = OTHER
    hub.register(hub.WeightsEntry("../../../escaped/..\\x", server.url("/noext"), None, None,
                                  "test", "MIT", "hostile name"))
    path = hub.download("../../../escaped/..\\x", progress=False)
    assert path.parent == isolated and SAFE_NAME.fullmatch(path.name)
    assert path.read_bytes() == OTHER and not (tmp_path / "escaped").exists()


def test_a_link_in_the_cache_pointing_outside_is_refused(server, isolated, tmp_path):
    server.state.files["/model.bin"] = OTHER
    url = server.url("/model.bin")
    link = hub.cached_path(url)
    link.parent.mkdir(parents=True)
    outside = tmp_path / "outside.bin"
    link.symlink_to(outside)
    with pytest.raises(hub.DownloadError, match="outside"):
        hub.download(url, progress=False)
    assert not outside.exists()


def test_safe_filename():
    assert hub.safe_filename("../../etc/passwd") == "etc_passwd"
    assert hub.safe_filename("RN50.pt") == "RN50.pt"
    assert hub.safe_filename("...") == ""
    long = hub.safe_filename("a" * 1000 + ".safetensors")
    assert len(long) == hub.MAX_FILENAME and long.endswith(".safetensors")


# ------------------------------------------------------------------ command line
def test_cli_download_and_list(server, tmp_path, capsys):
    entry(server)
    target = tmp_path / "elsewhere"
    assert main(["download", "test-weights", "--cache-dir", str(target), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(target / "weights.pt") and Path(out).read_bytes() == PAYLOAD

    assert main(["download", "--list", "--cache-dir", str(target)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cache: {target}"
    assert lines[1].split() == ["name", "preset", "cached", "size", "checksum", "licence", "url"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(hub.known_names())
    assert "(verified)" in rows["RN50"] and rows["RN50"].endswith(hub.REGISTRY["RN50"].url)
    assert " no " in rows["RN50"] and " unknown " in rows["RN50"]
    assert "not published" in rows["mask_rcnn_denseclip_r101_fpn_1x_coco"]
    assert " yes " in rows["test-weights"]


def test_cli_download_without_names_is_a_usage_error(capsys):
    assert main(["download"]) == 2
    assert "--list" in capsys.readouterr().err


# ------------------------------------------------------------------ names on the command line
def test_commands_take_a_name_or_pretrained_where_they_take_a_checkpoint(server, isolated,
                                                                        tmp_path, capsys):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config("tiny_denseclip_res"))
    saved = save_checkpoint(tmp_path / "tiny.pth", model)
    entry(server, "tiny-release", saved.read_bytes(), preset="tiny_denseclip_res",
          path="/tiny.pth")
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(tmp_path / "a.png")
    for spec in ("tiny-release", "pretrained"):
        out = tmp_path / f"out-{spec}"
        status = main(["predict", "tiny_denseclip_res", spec, str(tmp_path / "a.png"), "--out",
                       str(out), "--precision", "fp32"])
        assert status == 0, capsys.readouterr().err
        assert (out / "a_labels.png").is_file()
    assert len(server.state.requests) == 1  # downloaded once, then read from the cache
    assert (isolated / "tiny.pth").read_bytes() == saved.read_bytes()
    # a path that does not exist is named as such, not looked up as a name
    assert main(["predict", "tiny_denseclip_res", str(tmp_path / "nope.pth"),
                 str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.pth does not exist" in capsys.readouterr().err


def test_from_pretrained_builds_a_release_by_name(server, tmp_path):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config("tiny_denseclip_res")).eval()
    saved = save_checkpoint(tmp_path / "tiny.pth", model)
    entry(server, "tiny-release", saved.read_bytes(), preset="tiny_denseclip_res",
          path="/tiny.pth")
    loaded = denseclip.from_pretrained("tiny-release", progress=False)
    assert loaded.config.name == "tiny_denseclip_res" and not loaded.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_unwritable_cache_is_one_line_naming_the_folder(server, tmp_path, capsys):
    entry(server)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    assert main(["download", "test-weights", "--cache-dir", str(blocker / "cache"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"cannot write to the cache folder {blocker / 'cache'}" in err
    assert "--cache-dir" in err and server.url("/weights.pt") in err
    assert server.state.requests == []


def test_read_only_cache_folder_is_reported(server, tmp_path):
    """A real read-only folder: a read-only tmpfs where mounting is allowed (root; root ignores
    permission bits), a folder without write permission otherwise, else /proc."""
    entry(server)
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    root = os.geteuid() == 0
    mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(cache)]
    mounted = root and subprocess.run(mount, capture_output=True).returncode == 0
    if not root:
        cache.chmod(0o500)
    elif not mounted:
        cache = Path("/proc/denseclip-cache")  # the kernel refuses new folders there
    try:
        with pytest.raises(hub.DownloadError, match="cannot write to the cache folder"):
            hub.download("test-weights", cache=cache, progress=False)
    finally:
        if mounted:
            subprocess.run(["umount", str(cache)], check=True)
    assert server.state.requests == []
