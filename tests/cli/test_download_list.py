"""``denseclip download --list``: URL, size, checksum and cache state of every registered
file, as a table or JSON, from a real cache folder."""

from __future__ import annotations

import json

from denseclip.cli import main
from denseclip.weights import hub


def test_list_json_reports_url_size_checksum_and_cache_state(tmp_path, capsys):
    rn50 = hub.REGISTRY["RN50"]
    cached = hub.cached_path(rn50, tmp_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x" * 3000)
    release = hub.REGISTRY["denseclip_fpn_res50_512x512_80k"]
    part = hub.cached_path(release, tmp_path)
    part = part.with_name(part.name + ".part")
    part.write_bytes(b"y" * (3 << 20))
    assert main(["download", "--list", "--json", "--cache-dir", str(tmp_path)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(hub.known_names())
    assert rows["RN50"]["url"] == rn50.url and rows["RN50"]["sha256"] == rn50.sha256
    assert rows["RN50"]["cached"] == "yes" and rows["RN50"]["bytes"] == 3000
    assert rows["RN50"]["size"] == "3000 B" and rows["RN50"]["path"] == str(cached)
    partial = rows["denseclip_fpn_res50_512x512_80k"]
    assert partial["cached"] == "partial" and partial["size"] == "3.0 MiB so far"
    assert partial["sha256"] is None and partial["checksum"] == "not published"
    assert rows["RN101"]["cached"] == "no" and rows["RN101"]["size"] == "unknown"
    assert rows["RN101"]["bytes"] is None


def test_list_table_shows_urls(tmp_path, capsys):
    assert main(["download", "--list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for entry in hub.REGISTRY.values():
        line = next(x for x in out.splitlines() if x.startswith(entry.name + " "))
        assert line.endswith(entry.url) and " no " in line and " unknown " in line
