from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from denseclip.classes import ClassListError, load_class_names
from denseclip.config import DataConfig
from denseclip.data import (
    ADE20KDataset,
    DatasetError,
    FolderDataset,
    build_segmentation_dataset,
    build_test_transforms,
    load_image,
    pil_to_rgb,
)
from tests.helpers.official import OFFICIAL_MEAN, OFFICIAL_STD

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_ade20k_layout_and_label_reduction(tmp_path, write_pair):
    raw = np.array([[0, 1, 2, 150], [255, 150, 1, 0]], dtype=np.uint8)
    write_pair(tmp_path, "training", "b", _rgb(2, 4), raw)
    write_pair(tmp_path, "training", "a", _rgb(2, 4, 1), raw)
    ds = ADE20KDataset(tmp_path, "training")
    assert ds.num_classes == 150 and ds.class_names[0] == "wall"
    assert ds.names == ["a", "b"] and len(ds) == 2
    item = ds[0]
    assert item["name"] == "a" and item["ori_size"] == (2, 4)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 2, 4)
    assert item["target"].dtype == torch.int64
    expected = torch.tensor([[255, 0, 1, 149], [255, 149, 0, 255]])
    assert torch.equal(item["target"], expected)
    assert "ori_target" not in item


def test_to_dataset_labels_and_saved_png(tmp_path, write_pair):
    write_pair(tmp_path, "validation", "x", _rgb(2, 3), np.ones((2, 3), np.uint8))
    ds = ADE20KDataset(tmp_path, "validation")
    pred = torch.tensor([[0, 149, 7], [255, 3, 0]])
    labels = ds.to_dataset_labels(pred)
    assert labels.dtype == np.uint8
    assert labels.tolist() == [[1, 150, 8], [0, 4, 1]]
    path = ds.save_prediction(pred, tmp_path / "out", "x")
    assert path.name == "x.png"
    assert np.array_equal(np.array(Image.open(path)), labels)


def test_test_pipeline_normalises_and_keeps_original_target(tmp_path, write_pair):
    image = _rgb(20, 30)
    raw = np.random.default_rng(3).integers(0, 6, size=(20, 30)).astype(np.uint8)
    write_pair(tmp_path, "validation", "p", image, raw, img_suffix=".png")
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\ne\n")
    # test_scale equal to the image size: no resampling, exact normalisation check.
    cfg = DataConfig(root=str(tmp_path), img_suffix=".png", test_scale=[30, 20])
    ds = build_segmentation_dataset(cfg, "validation", num_classes=5, train=False)
    item = ds[0]
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()
    expected = (pixels - 255 * MEAN[:, None, None]) / (255 * STD[:, None, None])
    assert torch.allclose(item["image"], expected, atol=1e-5)
    # ... computed as mmcv.imnormalize does (float32, cv2.subtract, cv2.multiply): exactly
    official = image[:, :, ::-1].astype(np.float32)  # BGR, to_rgb=True
    cv2.cvtColor(official, cv2.COLOR_BGR2RGB, official)
    mean = np.float64(OFFICIAL_MEAN.reshape(1, -1))  # the official config's, as stored
    std = np.float64(OFFICIAL_STD.reshape(1, -1))
    cv2.subtract(official, mean, official)
    cv2.multiply(official, 1 / std, official)
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), official)
    reduced = torch.from_numpy(raw.astype(np.int64)) - 1
    reduced[reduced < 0] = 255
    assert torch.equal(item["target"], reduced)
    assert torch.equal(item["ori_target"], reduced)

    # A larger test scale resizes image and target together but keeps ori_target.
    cfg = DataConfig(root=str(tmp_path), img_suffix=".png", test_scale=[60, 40])
    item = build_segmentation_dataset(cfg, "validation", 5, train=False)[0]
    assert item["image"].shape == (3, 40, 60) and item["target"].shape == (40, 60)
    assert item["ori_target"].shape == (20, 30) and item["ori_size"] == (20, 30)
    assert torch.equal(item["target"][::2, ::2], reduced)  # nearest, exact 2x


def test_build_train_dataset_outputs_crop_size(colour_dataset):
    cfg = DataConfig(root=str(colour_dataset), img_suffix=".png", scale=[128, 64],
                     crop_size=[32, 40])
    ds = build_segmentation_dataset(cfg, "training", num_classes=7, train=True)
    assert ds.class_names == [f"c{k}" for k in range(1, 8)]
    for i in range(len(ds)):
        item = ds[(i, 10 + i)]
        assert item["image"].shape == (3, 32, 40) and item["target"].shape == (32, 40)
        assert item["target"].dtype == torch.int64
        assert set(item["target"].unique().tolist()) <= set(range(7)) | {255}


def test_seeded_items_are_reproducible_and_leave_global_rng_alone(colour_dataset):
    cfg = DataConfig(root=str(colour_dataset), img_suffix=".png", scale=[128, 64],
                     crop_size=[32, 32])
    ds = build_segmentation_dataset(cfg, "training", 7, train=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b, c = ds[(3, 5)], ds[(3, 5)], ds[(3, 6)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(a["image"], c["image"])


def test_build_checks_class_count_and_dataset_kind(colour_dataset, tmp_path):
    cfg = DataConfig(root=str(colour_dataset), img_suffix=".png")
    with pytest.raises(DatasetError, match="names 7"):
        build_segmentation_dataset(cfg, "training", num_classes=6, train=True)
    with pytest.raises(ValueError, match="unknown data.dataset"):
        build_segmentation_dataset(DataConfig(root=str(colour_dataset), dataset="coco"),
                                   "training", 7, True)
    folder = build_segmentation_dataset(
        DataConfig(root=str(colour_dataset), dataset="folder", img_suffix=".png"),
        "training", 7, train=False,
    )
    assert isinstance(folder, FolderDataset) and len(folder) == 4
    empty = tmp_path / "no_classes"
    (empty / "images" / "training").mkdir(parents=True)
    with pytest.raises(DatasetError, match="classes.txt"):
        build_segmentation_dataset(DataConfig(root=str(empty)), "training", 5, True)


def test_folder_dataset_ignore_value_and_no_reduction(tmp_path, write_pair):
    raw = np.array([[0, 1, 2], [200, 2, 0]], dtype=np.uint8)
    write_pair(tmp_path, "s", "f", _rgb(2, 3), raw)
    classes = tmp_path / "names.txt"
    classes.write_text("cat\ndog\nbird\n\n")
    ds = FolderDataset(tmp_path / "images" / "s", tmp_path / "annotations" / "s", classes,
                       ignore_value=200)
    assert ds.class_names == ["cat", "dog", "bird"]
    assert ds[0]["target"].tolist() == [[0, 1, 2], [255, 2, 0]]
    assert ds.to_dataset_labels(np.array([[2, 255]])).tolist() == [[2, 200]]
    reduced = FolderDataset(tmp_path / "images" / "s", tmp_path / "annotations" / "s",
                            classes, reduce_zero_label=True, ignore_value=200)
    assert reduced[0]["target"].tolist() == [[255, 0, 1], [255, 1, 255]]


def test_class_file_follows_the_one_class_file_format(tmp_path):
    # denseclip.classes: blank and '#' lines are skipped, the i-th class line is label i
    path = tmp_path / "c.txt"
    path.write_text("# labels\na\n\nb: the letter b\n")
    assert load_class_names(path) == ["a", "b"]
    path.write_text("a\nb\na\n")
    with pytest.raises(ClassListError, match="duplicate"):
        load_class_names(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_class_names(tmp_path / "missing.txt")


# ---------------------------------------------------------------------- bad input
def test_missing_directories_name_the_path(tmp_path, write_pair):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ADE20KDataset(tmp_path / "nowhere", "training")
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="annotations"):
        ADE20KDataset(tmp_path, "training")
    with pytest.raises(FileNotFoundError, match="validation"):
        ADE20KDataset(tmp_path, "validation")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_segmentation_dataset(DataConfig(root=str(tmp_path / "nowhere")), "training",
                                   150, True)


def test_empty_image_directory_is_an_error(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        ADE20KDataset(tmp_path, "training")


def test_image_without_label_fails_at_construction(tmp_path, write_pair):
    write_pair(tmp_path, "training", "ok", _rgb(4, 4), np.ones((4, 4), np.uint8))
    write_pair(tmp_path, "training", "lonely", _rgb(4, 4), None)
    with pytest.raises(DatasetError, match=r"lonely\.jpg has no label map .*lonely\.png"):
        ADE20KDataset(tmp_path, "training")


def test_size_mismatch_names_both_files_and_sizes(tmp_path, write_pair):
    write_pair(tmp_path, "training", "m", _rgb(10, 12), np.ones((10, 11), np.uint8))
    ds = ADE20KDataset(tmp_path, "training")  # construction does not decode
    with pytest.raises(DatasetError) as info:
        ds[0]
    msg = str(info.value)
    assert "m.png" in msg and "m.jpg" in msg and "10x11" in msg and "10x12" in msg


def test_out_of_range_labels_name_file_and_values(tmp_path, write_pair):
    raw = np.array([[0, 1, 151], [200, 255, 3]], dtype=np.uint8)
    write_pair(tmp_path, "training", "bad", _rgb(2, 3), raw)
    ds = ADE20KDataset(tmp_path, "training")
    with pytest.raises(DatasetError, match=r"bad\.png.*151, 200"):
        ds[0]
    # 16-bit label maps are read with their full values.
    lbl16 = np.array([[1, 300], [2, 3]], dtype=np.uint16)
    write_pair(tmp_path, "v", "wide", _rgb(2, 2), lbl16)
    with pytest.raises(DatasetError, match=r"wide\.png.*300"):
        ADE20KDataset(tmp_path, "v")[0]


def test_colour_label_map_is_rejected(tmp_path, write_pair):
    write_pair(tmp_path, "training", "rgb", _rgb(3, 3), _rgb(3, 3, 5))
    with pytest.raises(DatasetError, match=r"rgb\.png.*mode RGB"):
        ADE20KDataset(tmp_path, "training")[0]


def test_truncated_and_unreadable_images_name_the_file(tmp_path, write_pair):
    img_path, _ = write_pair(tmp_path, "training", "trunc", _rgb(64, 64),
                             np.ones((64, 64), np.uint8))
    data = img_path.read_bytes()
    img_path.write_bytes(data[: len(data) // 2])
    _, ann = write_pair(tmp_path, "training", "garbage", _rgb(4, 4), np.ones((4, 4), np.uint8))
    (tmp_path / "images" / "training" / "garbage.jpg").write_bytes(b"not an image at all")
    ds = ADE20KDataset(tmp_path, "training")
    assert ds.names == ["garbage", "trunc"]
    with pytest.raises(DatasetError, match=r"garbage\.jpg"):
        ds[0]
    with pytest.raises(DatasetError, match=r"trunc\.jpg"):
        ds[1]
    # A readable image with a broken label map: the error names the label map.
    Image.fromarray(_rgb(4, 4)).save(tmp_path / "images" / "training" / "garbage.jpg")
    ann.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"cannot read label map .*garbage\.png"):
        ds[0]


def test_grayscale_rgba_and_16bit_images_become_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert np.array_equal(load_image(tmp_path / "g.png"), np.repeat(gray[:, :, None], 3, 2))

    rgba = np.dstack([_rgb(3, 4), np.zeros((3, 4), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgba[:, :, :3])

    # 16 bits: OpenCV's IMREAD_COLOR (the official decoder) keeps the high byte, v >> 8
    # (it used to be rint(v * 255 / 65535) with Pillow: 1000 -> 4, 65280 -> 254).
    wide = np.array([[0, 257, 65535], [32896, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    out = load_image(tmp_path / "w.png")
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[:, :, 0].tolist() == [[0, 1, 255], [128, 3, 255]]
    with Image.open(tmp_path / "w.png") as opened:  # a PIL image follows the same rule
        np.testing.assert_array_equal(pil_to_rgb(opened), out)


def _cv2_rgb(path) -> np.ndarray:
    """mmseg's LoadImageFromFile: cv2 IMREAD_COLOR (BGR), here turned to RGB."""
    return cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1]


def test_images_decode_as_opencv_imread(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        h, w = (int(v) for v in rng.integers(8, 200, 2))
        image = cv2.GaussianBlur(_rgb(h, w, i), (5, 5), 2)
        path = tmp_path / f"j{i}.jpg"
        Image.fromarray(image).save(path, quality=int(rng.integers(60, 100)),
                                    subsampling=i % 3, progressive=bool(i % 2))
        paths.append(path)
    gray = _rgb(30, 40)[:, :, 0]
    Image.fromarray(gray).save(tmp_path / "gray.jpg")
    Image.fromarray(_rgb(30, 40)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "p.png")
    Image.fromarray(np.dstack([_rgb(30, 40), gray]), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.dstack([gray, gray[::-1]]), "LA").save(tmp_path / "la.png")
    Image.fromarray(gray > 100).save(tmp_path / "bits.png")
    Image.fromarray(_rgb(30, 40, 1)[:, :, 0].astype(np.uint16) * 251).save(tmp_path / "w.png")
    cmyk = np.random.default_rng(1).integers(0, 256, (30, 40, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(_rgb(30, 40, 2)).save(tmp_path / "b.bmp")
    Image.fromarray(_rgb(30, 40, 3)).save(tmp_path / "w.webp")
    paths += [tmp_path / n for n in ("gray.jpg", "p.png", "a.png", "la.png", "bits.png",
                                     "w.png", "cmyk.jpg", "b.bmp", "w.webp")]
    for path in paths:
        out = load_image(path)
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, _cv2_rgb(path), err_msg=path.name)
    # CMYK is one case where Pillow's conversion (the old decoder) differs.
    with Image.open(tmp_path / "cmyk.jpg") as opened:
        assert not np.array_equal(np.array(opened.convert("RGB")), _cv2_rgb(tmp_path /
                                                                             "cmyk.jpg"))


def test_dataset_items_hold_the_opencv_pixels(tmp_path, write_pair):
    image = cv2.GaussianBlur(_rgb(40, 56, 4), (5, 5), 2)
    img_path, _ = write_pair(tmp_path, "training", "x", image, np.ones((40, 56), np.uint8))
    ds = ADE20KDataset(tmp_path, "training")
    item = ds[0]  # no transforms: the decoded image as float 0..255
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), _cv2_rgb(img_path))
    original = ds.get(0, original=True)
    assert set(original) == {"ori_image", "ori_target", "name", "ori_size"}
    assert original["ori_image"].dtype == torch.uint8 and original["ori_size"] == (40, 56)
    np.testing.assert_array_equal(original["ori_image"].numpy(), _cv2_rgb(img_path))
    assert torch.equal(original["ori_target"], torch.zeros(40, 56, dtype=torch.int64))


def test_images_opencv_cannot_read_fall_back_to_pillow(tmp_path):
    values = np.array([[0.4, 1.6, -3.0], [254.5, 300.0, 17.2]], dtype=np.float32)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    assert cv2.imread(str(tmp_path / "f.tif"), cv2.IMREAD_COLOR) is None
    out = load_image(tmp_path / "f.tif")
    assert out[:, :, 0].tolist() == [[0, 2, 0], [254, 255, 17]]
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.png"):
        load_image(tmp_path / "empty.png")


def _with_orientation(image: np.ndarray, orientation: int) -> bytes:
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    pil.save(buf, format="PNG", exif=exif)
    return buf.getvalue()


def test_exif_orientation_is_applied_to_images_not_labels(tmp_path, write_pair):
    image = _rgb(6, 10)
    path = tmp_path / "r.png"
    path.write_bytes(_with_orientation(image, 6))  # 6: rotate 90° clockwise to display
    out = load_image(path)
    assert out.shape == (10, 6, 3)
    assert np.array_equal(out, np.rot90(image, k=-1))

    # Dataset: the label map stays in stored orientation, so the sizes disagree.
    np.testing.assert_array_equal(out, _cv2_rgb(path))  # as OpenCV applies it
    jpeg = tmp_path / "r.jpg"
    exif = Image.Exif()
    for orientation in range(1, 9):
        exif[0x0112] = orientation
        Image.fromarray(image).save(jpeg, exif=exif.tobytes())
        np.testing.assert_array_equal(load_image(jpeg), _cv2_rgb(jpeg))

    write_pair(tmp_path / "ds", "training", "rot", image, np.ones((6, 10), np.uint8),
               img_suffix=".png")
    (tmp_path / "ds" / "images" / "training" / "rot.png").write_bytes(
        _with_orientation(image, 6))
    ds = ADE20KDataset(tmp_path / "ds", "training", img_suffix=".png")
    with pytest.raises(DatasetError, match=r"6x10.*10x6.*EXIF"):
        ds[0]


def test_test_transforms_accept_dataset_without_seed(colour_dataset):
    cfg = DataConfig(img_suffix=".png", test_scale=[64, 32])
    ds = ADE20KDataset(colour_dataset, "training", class_names=[str(i) for i in range(7)],
                       img_suffix=".png", transforms=build_test_transforms(cfg), test_mode=True)
    item = ds[1]  # 64x48 -> factor min(64/64, 32/48) = 2/3 -> 43x32
    assert item["image"].shape == (3, 43, 32)
    assert item["ori_target"].shape == (64, 48)
