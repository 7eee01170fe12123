"""``denseclip presets``: the table people choose a preset from, and the stored counts
behind it, which must equal a fresh count."""

from __future__ import annotations

import json

from denseclip.cli import main
from denseclip.config import available_presets
from denseclip.tools.presets import backbone_label, build_table, read_table
from denseclip.weights import hub


def test_the_stored_table_equals_a_fresh_count_of_every_preset():
    """Every bundled preset rebuilt on the meta device: its task, backbone, dataset, class
    count and parameter count are what presets.json says (rewrite it with
    ``python -m denseclip.tools.presets`` after changing a preset)."""
    stored = read_table()
    fresh = build_table({name: row["description"] for name, row in stored.items()})
    assert list(fresh) == available_presets() and set(stored) == set(fresh)
    wrong = {name: (stored[name], row) for name, row in fresh.items() if stored[name] != row}
    assert not wrong, wrong


def test_every_preset_has_a_one_line_description():
    for name, row in read_table().items():
        text = row["description"]
        assert text and "\n" not in text and len(text) <= 100, name


def test_backbone_labels_name_known_towers():
    from denseclip.config import load_config

    assert backbone_label(load_config("denseclip_fpn_res50_512x512_80k")) == "CLIP RN50"
    assert backbone_label(load_config("denseclip_fpn_vit-b_640x640_80k")) == "CLIP ViT-B/16"
    assert backbone_label(load_config("tiny_denseclip_res")) == "CLIP ResNet 1-1-1-1 w8"
    assert backbone_label(load_config("fpn_swin-t_512x512_80k")) == "torchvision swin_t"


def test_presets_prints_a_table_with_a_row_per_preset(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "task", "backbone", "data", "params", "weights",
                                "description"]
    rows = {line.split()[0]: line for line in lines[1:] if line and not line[0].isdigit()}
    assert set(rows) == set(available_presets())
    assert " yes " in rows["denseclip_fpn_res50_512x512_80k"]  # a released checkpoint
    assert " RN50 " in rows["clip_zeroshot_rn50"]  # zero-shot: OpenAI's own weights
    tiny = rows["tiny_denseclip_res"]
    assert " 2.1M " in tiny and " - " in tiny and "ade20k, 150 classes" in tiny
    assert f"{len(rows)} presets" in lines[-1]


def test_presets_json_and_task_filter(capsys):
    assert main(["presets", "--json", "--task", "mask_rcnn"]) == 0
    rows = json.loads(capsys.readouterr().out)
    table = read_table()
    expected = [n for n in available_presets() if table[n]["task"] == "mask_rcnn"]
    assert [r["name"] for r in rows] == expected and len(rows) > 2
    by_name = {r["name"]: r for r in rows}
    released = by_name["mask_rcnn_denseclip_r50_fpn_1x_coco"]
    assert released["weights"] == "mask_rcnn_denseclip_r50_fpn_1x_coco"
    assert hub.release_for_preset("mask_rcnn_denseclip_r50_fpn_1x_coco") is not None
    assert by_name["tiny_mask_rcnn_denseclip"]["weights"] is None
    assert released["parameters"] == table[released["name"]]["parameters"] > 10**8
    assert released["dataset"] == "coco" and released["classes"] == 80
