"""COCO-format data: label mapping, masks (polygon and RLE), crowd handling, the image
filter, the v2 training pipeline and every defined bad-input behaviour."""

from __future__ import annotations

import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from denseclip.config import DataConfig
from denseclip.data.coco import (
    CocoDetection,
    DatasetWarning,
    DetectionResize,
    build_coco_dataset,
    build_coco_train_transforms,
    collate_detection,
    move_detection_batch,
)
from denseclip.data.segmentation import DatasetError
from tests.helpers.coco import CAT_IDS, CLASS_NAMES, rewrite

TINY = DataConfig(scale=[160, 128], flip_prob=0.0)


def ann(data, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def dataset(root, **kwargs) -> CocoDetection:
    return CocoDetection(root / "train", root / "annotations" / "instances_train.json", **kwargs)


def test_categories_map_to_contiguous_labels(coco_root):
    ds = dataset(coco_root)
    assert ds.cat_ids == CAT_IDS
    assert ds.class_names == CLASS_NAMES
    assert ds.cat_id_to_label == {3: 0, 7: 1, 11: 2}
    item = ds[ds.ids.index(20)]
    assert item["target"]["labels"].tolist() == [2, 0]  # triangle (11), square (3)
    assert item["image_id"] == 20 and item["ori_size"] == (112, 96)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 112, 96)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0


def test_crowd_regions_are_not_targets_but_stay_in_the_ground_truth(coco_root):
    ds = dataset(coco_root, with_masks=True)
    target = ds[ds.ids.index(10)]["target"]
    assert target["labels"].tolist() == [0, 1]
    assert target["masks"].shape == (2, 96, 128)
    crowd = ds.coco.loadAnns([900])[0]
    assert crowd["iscrowd"] == 1


def test_polygon_and_rle_masks_decode_to_their_shapes(coco_root, coco_json):
    ds = dataset(coco_root, with_masks=True)
    item = ds[ds.ids.index(20)]
    anns = [ann(coco_json, 102), ann(coco_json, 103)]
    assert isinstance(anns[1]["segmentation"], dict)  # the compressed-RLE square
    for mask, box, record in zip(item["target"]["masks"], item["target"]["boxes"], anns,
                                 strict=True):
        assert int(mask.sum()) == pytest.approx(record["area"], abs=1)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        extent = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert torch.allclose(torch.tensor(extent).float(), box, atol=1.0)


def test_training_drops_images_without_annotations_evaluation_keeps_them(coco_root):
    train = dataset(coco_root, train=True)
    assert train.ids == [10, 20, 40]
    assert train.aspect_ratio_flags == [1, 0, 1]  # landscape images share a flag
    test = dataset(coco_root)
    assert test.ids == [10, 20, 30, 40]
    empty = test[test.ids.index(30)]["target"]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    masked = dataset(coco_root, with_masks=True)[2]["target"]["masks"]
    assert masked.shape == (0, 80, 100)


def test_training_pipeline_resizes_like_mmcv_and_moves_boxes_with_masks(coco_root):
    cfg = DataConfig(scale=[160, 128], flip_prob=1.0)
    ds = dataset(coco_root, train=True, with_masks=True,
                 transforms=build_coco_train_transforms(cfg))
    plain = dataset(coco_root, train=True, with_masks=True)
    for i in range(len(ds)):
        item, orig = ds[i], plain[i]
        h, w = orig["ori_size"]
        factor = min(160 / max(h, w), 128 / min(h, w))
        assert item["image"].shape[-2:] == (int(h * factor + 0.5), int(w * factor + 0.5))
        width = item["image"].shape[-1]
        boxes = item["target"]["boxes"]
        # flipped: x1' = W - x2 of the rescaled original box
        sx = width / w
        expected_x1 = width - orig["target"]["boxes"][:, 2] * sx
        assert torch.allclose(boxes[:, 0], expected_x1, atol=1e-3)
        for mask, box in zip(item["target"]["masks"], boxes, strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            extent = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.allclose(extent, box, atol=1.5)
        assert item["target"]["masks"].dtype == torch.uint8


def test_training_resize_is_opencv_on_the_uint8_image_as_mmcv(coco_root):
    """mmdet's Resize: mmcv.imrescale (cv2 bilinear on uint8) for the image, cv2 nearest
    per mask, boxes times the float32 scale factor clipped to the new image."""
    ds = dataset(coco_root, train=True, with_masks=True,
                 transforms=build_coco_train_transforms(TINY))
    plain = dataset(coco_root, train=True, with_masks=True)
    for i in range(len(ds)):
        item, orig = ds[i], plain[i]
        array = plain.load_image(i)
        h, w = item["image"].shape[-2:]
        expected = cv2.resize(array, (w, h), interpolation=cv2.INTER_LINEAR)
        got = (item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, expected)
        masks = orig["target"]["masks"].numpy()
        for got_mask, mask in zip(item["target"]["masks"].numpy(), masks, strict=True):
            np.testing.assert_array_equal(
                got_mask, cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST))
        oh, ow = orig["ori_size"]
        factor = torch.tensor([w / ow, h / oh] * 2, dtype=torch.float32)
        boxes = orig["target"]["boxes"] * factor
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        assert torch.equal(item["target"]["boxes"], boxes)


def test_test_pipeline_resizes_the_uint8_image_before_the_model(coco_root):
    cfg = DataConfig(dataset="coco", root=str(coco_root), test_scale=[2000, 2000])
    ds = build_coco_dataset(cfg, "train", train=False, test_scale=(160, 128))
    plain = dataset(coco_root)
    assert ds.ids == plain.ids  # evaluation keeps every image
    for i in range(len(ds)):
        item = ds[i]
        array = plain.load_image(i)
        oh, ow = array.shape[:2]
        factor = min(160 / max(oh, ow), 128 / min(oh, ow))
        h, w = int(oh * factor + 0.5), int(ow * factor + 0.5)
        assert item["ori_size"] == (oh, ow) and item["image"].shape == (3, h, w)
        expected = cv2.resize(array, (w, h), interpolation=cv2.INTER_LINEAR)
        got = (item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, expected)
    # without a test_scale the pipeline uses data.test_scale
    assert build_coco_dataset(cfg, "train", train=False)[0]["image"].shape[-2:] == (1500, 2000)
    with pytest.raises(TypeError, match="uint8"):
        DetectionResize((160, 128))(tv_tensors.Image(torch.rand(3, 8, 8)))


def test_seeded_items_are_reproducible(coco_root):
    ds = dataset(coco_root, train=True,
                 transforms=build_coco_train_transforms(DataConfig(scale=[160, 128])))
    flips = set()
    for seed in range(8):
        a, b = ds[(0, seed)], ds[(0, seed)]
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["target"]["boxes"], b["target"]["boxes"])
        flips.add(round(float(a["target"]["boxes"][0, 0]), 2))
    assert len(flips) == 2  # both flip outcomes occur


def test_collate_returns_lists_and_move(coco_root):
    ds = dataset(coco_root, train=True, transforms=build_coco_train_transforms(TINY))
    batch = collate_detection([ds[0], ds[1]])
    assert set(batch) == {"image", "target", "image_id", "ori_size"}
    assert [img.shape[-2:] for img in batch["image"]] == [(120, 160), (149, 128)]
    images, targets = move_detection_batch(batch, "cpu")
    assert len(images) == len(targets) == 2 and targets[1]["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="empty"):
        collate_detection([])


def test_build_coco_dataset_layout_and_class_check(coco_root):
    cfg = DataConfig(dataset="coco", root=str(coco_root), scale=[160, 128],
                     test_scale=[160, 128])
    ds = build_coco_dataset(cfg, "train", train=True, with_masks=True, class_names=CLASS_NAMES)
    assert len(ds) == 3 and ds.with_masks and ds.transforms is not None
    test = build_coco_dataset(cfg, "train", train=False)
    assert not test.train and test[0]["image"].shape[-2:] == (120, 160)  # cfg.test_scale
    with pytest.raises(DatasetError, match="model.classes"):
        build_coco_dataset(cfg, "train", train=False, class_names=["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_coco_dataset(DataConfig(root=str(coco_root / "nope")), "train", train=True)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("content",
                         ["not json {", "[1, 2, 3]", '{"images": [], "annotations": []}'])
def test_a_file_that_is_not_coco_names_the_file(coco_root, content):
    path = coco_root / "annotations" / "instances_train.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match="instances_train.json is not a COCO annotation"):
        dataset(coco_root)


def test_unknown_category_names_the_annotation(coco_root, coco_json):
    ann(coco_json, 101)["category_id"] = 99
    rewrite(coco_root, coco_json)
    with pytest.raises(DatasetError, match=r"annotation 101 has category_id 99"):
        dataset(coco_root)


def test_missing_image_names_the_annotation(coco_root, coco_json):
    ann(coco_json, 102)["image_id"] = 12345
    rewrite(coco_root, coco_json)
    with pytest.raises(DatasetError, match=r"annotation 102 refers to image_id 12345"):
        dataset(coco_root)


def test_degenerate_boxes_are_skipped_with_a_counted_warning(coco_root, coco_json):
    ann(coco_json, 100)["bbox"][2] = 0.0  # zero width
    ann(coco_json, 103)["bbox"][3] = 0.5  # under a pixel high
    rewrite(coco_root, coco_json)
    with pytest.warns(DatasetWarning, match=r"skipped 2 annotation\(s\) with a degenerate box.*"
                                            r"ids 100, 103"):
        ds = dataset(coco_root)
    assert ds.skipped["degenerate box"] == 2
    assert ds[ds.ids.index(10)]["target"]["labels"].tolist() == [1]


def test_short_polygons_are_skipped_with_a_counted_warning(coco_root, coco_json):
    ann(coco_json, 104)["segmentation"] = [[1.0, 2.0, 30.0, 40.0]]  # two points
    rewrite(coco_root, coco_json)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(dataset(coco_root).annotations(3)) == 2  # boxes only: not needed
    with pytest.warns(DatasetWarning, match=r"skipped 1 annotation\(s\) with a no usable mask.*"
                                            r"ids 104"):
        ds = dataset(coco_root, with_masks=True)
    assert ds.skipped["no usable mask"] == 1
    assert [a["id"] for a in ds.annotations(ds.ids.index(40))] == [105]


def test_malformed_box_and_rle_size_name_the_annotation(coco_root, coco_json):
    bad = json.loads(json.dumps(coco_json))
    ann(bad, 100)["bbox"] = [1, 2, 3]
    rewrite(coco_root, bad)
    with pytest.raises(DatasetError, match="annotation 100 has a malformed bbox"):
        dataset(coco_root)
    ann(coco_json, 103)["segmentation"]["size"] = [10, 10]
    rewrite(coco_root, coco_json)
    with pytest.raises(DatasetError, match=r"annotation 103 has an RLE of size \[10, 10\]"):
        dataset(coco_root, with_masks=True)


def test_image_size_must_match_the_json(coco_root):
    ds = dataset(coco_root)
    Image.new("RGB", (50, 40)).save(ds.image_path(0))
    with pytest.raises(DatasetError, match="is 40x50 .* says 96x128"):
        ds[0]
    assert np.asarray(ds.load_image(1)).shape == (112, 96, 3)


def test_repeated_image_or_category_ids_are_refused(coco_root, coco_json):
    path = coco_root / "annotations" / "instances_train.json"
    images = coco_json["images"]
    rewrite(coco_root, {**coco_json, "images": images + [{**images[1], "file_name": "x.png"}]})
    with pytest.raises(DatasetError, match=rf"{path}: image ids must be unique; repeated: 20$"):
        dataset(coco_root)
    cats = coco_json["categories"]
    rewrite(coco_root, {**coco_json, "categories": cats + [{"id": 7, "name": "blob"}]})
    with pytest.raises(DatasetError, match=r"category ids must be unique; repeated: 7$"):
        dataset(coco_root)


def test_an_image_id_that_is_no_number_is_named(coco_root, coco_json):
    path = coco_root / "annotations" / "instances_train.json"
    images = [dict(im) for im in coco_json["images"]]
    images[1]["id"] = [20]  # a list: pycocotools would fail deep inside with a TypeError
    rewrite(coco_root, {**coco_json, "images": images})
    with pytest.raises(DatasetError, match=rf"{path}: image #1 has id \[20\]; ids must be "
                                           r"integers$"):
        dataset(coco_root)


def test_repeated_and_missing_annotation_ids_are_renumbered_with_a_warning(coco_root,
                                                                           coco_json):
    ann(coco_json, 105)["id"] = 102  # image 40's second object takes image 20's first id
    del ann(coco_json, 104)["id"]
    rewrite(coco_root, coco_json)
    with pytest.warns(DatasetWarning, match=r"renumbered 2 annotation\(s\) .* to 901\.\.902.*"
                                            r"ids were None, 102"):
        ds = dataset(coco_root)
    # Every annotation is in the ground truth under its own id, the first 102 kept.
    anns = ds.coco.dataset["annotations"]
    assert len(ds.coco.anns) == len(anns) == 7
    assert ds.coco.anns[102]["image_id"] == 20
    assert sorted(a["id"] for a in anns if a["image_id"] == 40) == [901, 902]
    assert len(ds[ds.ids.index(40)]["target"]["boxes"]) == 2
