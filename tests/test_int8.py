"""``precision: int8`` (:mod:`denseclip.inference.int8`): a tiny DenseCLIP trained for a
few dozen iterations on synthetic data, quantised by ONNX Runtime and compared with fp32;
calibration from a folder and from the training split; the commands with ``--precision
int8``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from denseclip.cli import main
from denseclip.cli.bench import format_table
from denseclip.config import load_config
from denseclip.data import make_synthetic_dataset
from denseclip.dist import DistEnv
from denseclip.engine.trainer import test as evaluate_checkpoint
from denseclip.engine.trainer import train
from denseclip.inference import Predictor
from denseclip.inference.int8 import (
    Calibration,
    Int8Error,
    Int8Segmentor,
    _pools_as_convs,
    _unshare_biases,
    calibration_batches,
    calibration_paths,
    quantize_model,
    quantize_onnx,
)
from denseclip.runtime import PRECISIONS, resolve_precision
from denseclip.tasks import build_model

ort = pytest.importorskip("onnxruntime")  # the export extra, installed with the tests
onnx = pytest.importorskip("onnx")
TensorProto, helper, numpy_helper = onnx.TensorProto, onnx.helper, onnx.numpy_helper

PRESET = "tiny_denseclip_res"
ITERS = 40
# Measured on the model below: 96-97 % of pixels keep their class and the mIoU moves by
# well under a point; the bounds leave room for other CPUs' rounding.
MIN_AGREEMENT = 0.90
MAX_MIOU_DELTA = 5.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A work dir of ``PRESET`` trained ``ITERS`` iterations on synthetic scenes, its
    data, and a cache folder for the quantised graphs (``$DENSECLIP_CACHE``)."""
    root = tmp_path_factory.mktemp("int8")
    data = make_synthetic_dataset(root / "data", num_train=8, num_val=4, size=(64, 80), seed=0)
    overrides = [f"data.root={data}", f"model.classes={data}/classes.txt",
                 "data.num_workers=0"]
    cfg = load_config(PRESET, [*overrides, f"schedule.max_iters={ITERS}",
                               "schedule.eval_interval=0", f"schedule.checkpoint_interval={ITERS}"])
    torch.manual_seed(0)
    train(cfg, root / "work", env=DistEnv(), progress=False)
    old = os.environ.get("DENSECLIP_CACHE")
    os.environ["DENSECLIP_CACHE"] = str(root / "cache")
    yield {"root": root, "data": data, "overrides": overrides,
           "checkpoint": root / "work" / f"iter_{ITERS}.pth",
           "cfg": load_config(PRESET, overrides)}
    if old is None:
        os.environ.pop("DENSECLIP_CACHE", None)
    else:
        os.environ["DENSECLIP_CACHE"] = old


def val_images(data: Path) -> list[Path]:
    return sorted((data / "images" / "validation").glob("*.jpg"))


def test_auto_never_picks_int8():
    assert "int8" in PRECISIONS
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    assert resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="int8 runs on CPUs"):
        resolve_precision("int8", "cuda")
    assert load_config(PRESET).precision == "auto"


def test_int8_agrees_with_fp32(trained):
    cfg, ckpt = trained["cfg"], trained["checkpoint"]
    fp32 = Predictor(cfg, ckpt, precision="fp32")
    int8 = Predictor(cfg, ckpt, precision="int8", calibration=Calibration(images=4))
    assert int8.precision == "int8" and isinstance(int8.model, Int8Segmentor)
    assert int8.class_names == fp32.class_names
    agree = []
    for path in val_images(trained["data"]):
        a, b = fp32.predict(path), int8.predict(path)
        assert b.probs.shape == a.probs.shape and b.labels.shape == a.labels.shape
        assert np.allclose(b.probs.sum(axis=0), 1, atol=1e-4)
        agree.append(float((a.labels == b.labels).mean()))
    assert min(agree) >= MIN_AGREEMENT, agree


def test_int8_miou_close_to_fp32(trained):
    cfg, ckpt = trained["cfg"], trained["checkpoint"]
    base = evaluate_checkpoint(cfg, ckpt, env=DistEnv(), progress=False, precision="fp32")
    int8 = evaluate_checkpoint(cfg, ckpt, env=DistEnv(), progress=False, precision="int8",
                               calibration=Calibration(images=4))
    assert int8["precision"] == "int8"
    assert abs(int8["mIoU"] - base["mIoU"]) <= MAX_MIOU_DELTA, (base["mIoU"], int8["mIoU"])
    assert int8["confusion"].sum() == base["confusion"].sum()


def test_calibration_from_training_split(trained):
    cfg = trained["cfg"]
    train_images = sorted((trained["data"] / "images" / "training").glob("*.jpg"))
    paths = calibration_paths(cfg, Calibration(images=3))
    assert [p.name for p in paths] == [train_images[i].name for i in (0, 4, 7)]  # evenly
    assert len(calibration_paths(cfg, Calibration(images=100))) == len(train_images)
    batches = list(calibration_batches(cfg, paths))
    first = Predictor(cfg, trained["checkpoint"], precision="fp32").prepare(paths[0]).tensor
    # test scale 128 x 64 → a 64 x 80 scene stays 64 x 80: 2 windows of 64 x 64 (stride 43)
    assert [b.shape for b in batches[:2]] == [(1, 3, 64, 64)] * 2
    assert np.array_equal(batches[0][0], first[:, :64, :64].numpy())


def test_calibration_from_folder_and_cache(trained, tmp_path):
    folder = tmp_path / "calib"
    (folder / "sub").mkdir(parents=True)
    images = val_images(trained["data"])
    for i, path in enumerate(images[:3]):
        shutil.copy(path, folder / ("sub" if i else "") / f"c{i}.jpg")
    (folder / "notes.txt").write_text("not an image")
    cfg = trained["cfg"]
    paths = calibration_paths(cfg, Calibration(folder, images=2))
    assert [p.name for p in paths] == ["c0.jpg", "c2.jpg"]
    model = Predictor(cfg, trained["checkpoint"], precision="fp32").model
    cache = Path(os.environ["DENSECLIP_CACHE"]) / "int8"
    before = set(cache.glob("*.onnx")) if cache.is_dir() else set()
    first = quantize_model(model, cfg, Calibration(folder, images=2))
    added = set(cache.glob("*.onnx")) - before
    assert len(added) == 1
    again = quantize_model(model, cfg, Calibration(folder, images=2))  # from the cache
    assert set(cache.glob("*.onnx")) - before == added and again.graph == first.graph
    other = quantize_model(model, cfg, Calibration(folder, images=3, cache=False))
    assert set(cache.glob("*.onnx")) - before == added
    x = torch.randn(2, 3, 64, 96)
    out, out3 = first(x), other(x)
    assert out.shape == (2, first.num_classes, 64, 96) and out.dtype == torch.float32
    assert not torch.equal(out, out3)  # other calibration images, other ranges
    assert not model.training


def test_missing_calibration_data(trained, tmp_path):
    cfg = trained["cfg"]
    no_data = load_config(PRESET, [f"data.root={tmp_path / 'nowhere'}",
                                   f"model.classes={trained['data']}/classes.txt"])
    with pytest.raises(Int8Error, match="--calibration DIR") as info:
        calibration_paths(no_data, Calibration())
    assert "\n" not in str(info.value) and "nowhere" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Int8Error, match="no images in"):
        calibration_paths(cfg, Calibration(tmp_path / "empty"))
    with pytest.raises(Int8Error, match="is not a folder"):
        calibration_paths(cfg, Calibration(tmp_path / "missing"))
    with pytest.raises(Int8Error, match="1 to"):
        calibration_paths(cfg, Calibration(images=0))
    code = main(["predict", PRESET, str(trained["checkpoint"]), str(val_images(
        trained["data"])[0]), "--out", str(tmp_path / "out"), "--precision", "int8",
        f"data.root={tmp_path / 'nowhere'}", f"model.classes={trained['data']}/classes.txt"])
    assert code == 2


def test_missing_onnxruntime_is_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(Int8Error, match=r"pip install 'denseclip\[export\]'"):
        quantize_model(Predictor(trained["cfg"], trained["checkpoint"]).model, trained["cfg"])
    code = main(["predict", PRESET, str(trained["checkpoint"]), str(val_images(
        trained["data"])[0]), "--out", str(tmp_path / "out"), "--precision", "int8",
        *trained["overrides"]])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("denseclip predict: error: onnxruntime is needed for int8")


def test_detection_refuses_int8():
    cfg = load_config("tiny_retinanet_denseclip")
    with pytest.raises(Int8Error, match="int8 supports the trained segmentation models"):
        quantize_model(build_model(cfg), cfg, batches=[np.zeros((1, 3, 64, 64), np.float32)])


# ------------------------------------------------------------------ the commands
def test_cli_predict_int8(trained, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", PRESET, str(trained["checkpoint"]), *map(str, val_images(
        trained["data"])[:2]), "--out", str(out), "--precision", "int8",
        "--calibration", str(trained["data"] / "images" / "validation"),
        "--calibration-images", "2", *trained["overrides"]]
    assert main(args) == 0
    assert len(list(out.glob("*.png"))) >= 2
    assert main([*args, "--classes", "sky,road"]) == 2
    assert "int8 covers the trained classes only" in capsys.readouterr().err


def test_cli_test_int8_compares_with_fp32(trained, capsys):
    code = main(["test", PRESET, str(trained["checkpoint"]), "--device", "cpu",
                 "--no-progress", "--precision", "int8", "--compare-precision", "fp32",
                 "--calibration-images", "4", *trained["overrides"]])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "int8 vs fp32:" in lines
    miou = next(line for line in lines if line.startswith("  mIoU: "))
    delta = float(miou.rsplit("delta ", 1)[1])
    assert abs(delta) <= MAX_MIOU_DELTA


def test_cli_export_int8(trained, tmp_path, capsys):
    path = tmp_path / "model_int8.onnx"
    assert main(["export", PRESET, str(trained["checkpoint"]), "--out", str(path),
                 "--precision", "int8", "--calibration-images", "2",
                 *trained["overrides"]]) == 0
    assert "(int8)" in capsys.readouterr().out
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["class_names"]
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 64, 96)
    (logits,) = session.run(None, {"images": x.numpy()})
    assert logits.shape == (2, len(meta["class_names"]), 64, 96)
    assert logits.dtype == np.float32
    fp32 = Predictor(trained["cfg"], trained["checkpoint"], precision="fp32").model
    with torch.no_grad():
        ref = fp32(x)
    agree = (torch.from_numpy(logits).argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= MIN_AGREEMENT * 0.8  # noise images, far from the calibration scenes


def test_cli_bench_int8(capsys):
    argv = ["bench", PRESET, "--size", "64", "64", "--batch", "1", "--repeats", "1",
            "--warmup", "0", "--no-train", "--no-pipeline", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("eval_forward_s", "peak_mem_gib"):
        assert set(r[key]) == {"fp32", "fp32_fast", "fast", "int8"}
    assert r["eval_forward_s"]["int8"] > 0 and r["int8_prepare_s"] > 0
    assert r["speedup_int8"]["eval_forward"] == pytest.approx(
        r["eval_forward_s"]["fp32"] / r["eval_forward_s"]["int8"])
    assert r["slide_s_per_image"]["int8"] > 0
    table = format_table(r)
    assert "int8 vs fp32" in table and "int8: quantisation (s)" in table
    row = next(line for line in table.splitlines() if line.startswith("eval forward"))
    fp32, int8, shown = row.split()[3], row.split()[6], row.split()[-1]
    assert float(shown.rstrip("x")) == pytest.approx(float(fp32) / float(int8), rel=0.02,
                                                     abs=0.011)


def test_cli_bench_int8_null_for_detection(capsys):
    assert main(["bench", "tiny_retinanet_denseclip", "--size", "64", "64", "--batch", "1",
                 "--repeats", "1", "--warmup", "0", "--no-pipeline", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["eval_forward_s"]["int8"] is None and r["train_step_s"]["int8"] is None
    assert r["speedup_int8"] == {"eval_forward": None, "train_step": None}
    assert "segmentation" in r["int8_note"]


# ------------------------------------------------------------------ graph rewrites
def _small_graph(pads=(0, 0, 0, 0)):
    """Two convolutions sharing one (zero) bias, as ONNX Runtime's constant sharing leaves
    them, an average pool, a classifier and an upsampling: ``1 x 4 x 16 x 16`` images in,
    ``logits`` out."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(3, 8, 1, 1)).astype(np.float32), "w3"),
             numpy_helper.from_array(np.zeros(8, np.float32), "zeros"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["images", "w1", "zeros"], ["a"], name="conv1",
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("Conv", ["b", "w2", "zeros"], ["c"], name="conv2"),
             helper.make_node("Relu", ["c"], ["d"], name="relu2"),
             helper.make_node("AveragePool", ["d"], ["e"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2], pads=list(pads)),
             helper.make_node("Conv", ["e", "w3"], ["f"], name="classifier"),
             helper.make_node("Resize", ["f", "", "scales"], ["logits"], name="upsample",
                              mode="linear")]
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                       [1, 4, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]


def test_graph_rewrites_keep_the_function():
    x = np.random.default_rng(1).normal(size=(1, 4, 16, 16)).astype(np.float32)
    model = _small_graph()
    before = _run(model, x)
    assert _unshare_biases(model) and _pools_as_convs(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [n.name for n in convs] == ["conv1", "conv2", "pool", "classifier"]
    assert len({n.input[2] for n in convs[:2]}) == 2  # a bias each
    assert not any(n.op_type == "AveragePool" for n in model.graph.node)
    assert np.allclose(_run(model, x), before, atol=1e-5)
    assert not _unshare_biases(model) and not _pools_as_convs(model)  # nothing left to do
    padded = _small_graph(pads=(1, 1, 1, 1))  # not a plain depthwise convolution: left
    assert not _pools_as_convs(padded)
    assert any(n.op_type == "AveragePool" for n in padded.graph.node)


def test_quantised_small_graph_runs_integer_kernels(tmp_path):
    rng = np.random.default_rng(2)
    onnx.save(_small_graph(), str(tmp_path / "float.onnx"))
    batches = [rng.normal(size=(1, 4, 16, 16)).astype(np.float32) for _ in range(4)]
    quantize_onnx(tmp_path / "float.onnx", tmp_path / "int8.onnx", batches)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    x = batches[0]
    ref = _run(_small_graph(), x)
    assert np.abs(session.run(None, {"images": x})[0] - ref).max() < 0.1 * np.abs(ref).max()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # both convolutions and the pool in int8; the classifier (it feeds the output) in float
    assert ops.count("QLinearConv") == 3 and "QLinearAveragePool" not in ops
    assert sum(op == "Conv" for op in ops) == 1
