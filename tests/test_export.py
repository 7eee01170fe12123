"""ONNX export: text features baked in, dynamic batch and image size, parity with PyTorch."""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest
import torch

import denseclip
from denseclip.cli import arguments, export
from denseclip.inference import Predictor
from denseclip.tools.export import ExportError, SegmentorForExport, export_onnx, export_predictor
from denseclip.weights import save_checkpoint

NAMES = ["cat", "dog", "grass"]
# ONNX Runtime and PyTorch are two implementations (other convolution algorithms, other
# summation orders), so they agree only up to rounding, on any CPU: the tiny models' logits
# are O(1) and differ by <= 1.3e-5 (AVX-512 and AVX2 kernels; printed below). 1e-3 is far
# above that on any CPU and far below a wrong graph (a missing layer or a wrong constant
# moves logits by O(0.1)).
TOLERANCE = 1e-3


def make_predictor(preset: str, classes=None, overrides=()) -> Predictor:
    torch.manual_seed(0)
    cfg = denseclip.load_config(preset, overrides)
    return Predictor.from_model(denseclip.build_model(cfg), cfg, classes=classes)


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset", ["tiny_denseclip_res", "tiny_denseclip_vit"])
def test_onnx_matches_pytorch_at_two_sizes(preset, tmp_path):
    predictor = make_predictor(preset, NAMES)
    calls = []
    predictor.guidance.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    path = export_predictor(predictor, tmp_path / "model.onnx")
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "open_scores"]
    # The text encoder is not in the graph: no token-embedding table (vocabulary x width).
    vocab = predictor.cfg.model.text.vocab_size
    shapes = [tuple(t.dims) for t in onnx.load(str(path)).graph.initializer]
    assert shapes and not any(vocab in s for s in shapes)
    calls.clear()
    torch.manual_seed(1)
    diffs = []
    for shape in [(1, 3, 64, 96), (2, 3, 96, 160)]:
        x = torch.randn(shape)
        with torch.no_grad():
            reference = predictor.model(x)
            window = predictor.window(x)  # head logits + upsampled open score maps
        logits, open_scores = sess.run(None, {"images": x.numpy()})
        assert logits.shape == (shape[0], 150, *shape[2:])
        assert open_scores.shape == (shape[0], 3, *shape[2:])
        diffs.append(float(np.abs(logits - reference.numpy()).max()))
        diffs.append(float(np.abs(open_scores - window[:, 150:].numpy()).max()))
        # Exact: window() runs the segmentor's own forward_features + forward_head, the same
        # fp32 operations on the same tensors, so any CPU gives both the same bits.
        np.testing.assert_allclose(window[:, :150].numpy(), reference.numpy(), rtol=0, atol=0)
    print(f"\n{preset}: ONNX vs PyTorch max |diff| (logits, open scores) per size: {diffs}")
    assert max(diffs) <= TOLERANCE
    assert calls == [1]  # PyTorch embedded the trained names once; ONNX never ran the encoder


def test_each_output_declares_its_own_class_axis(tmp_path):
    # Regression: open_scores' class axis carried the symbolic name of logits' class axis,
    # which told runtimes and tools that both have as many channels.
    predictor = make_predictor("tiny_denseclip_res", NAMES)
    graph = onnx.load(str(export_predictor(predictor, tmp_path / "model.onnx"))).graph

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {v.name: dims(v) for v in [*graph.input, *graph.output]}
    assert shapes == {"images": ["batch", 3, "height", "width"],
                      "logits": ["batch", 150, "height", "width"],
                      "open_scores": ["batch", 3, "height", "width"]}
    (logits,) = [v for v in graph.output if v.name == "logits"]
    only = onnx.load(str(export_predictor(make_predictor("tiny_denseclip_res"),
                                          tmp_path / "trained.onnx"))).graph
    assert [dims(v) for v in only.output] == [dims(logits)]


def test_metadata_and_trained_classes_only(tmp_path):
    predictor = make_predictor("tiny_denseclip_res")
    path = export_predictor(predictor, tmp_path / "model.onnx")
    sess = session(path)
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    assert meta["class_names"] == predictor.class_names and meta["open_class_names"] == []
    assert meta["test_scale"] == [128, 64]
    assert meta["mean_255"] == pytest.approx([255 * m for m in predictor.cfg.data.mean])
    x = torch.randn(1, 3, 70, 50)  # not a multiple of the stride
    with torch.no_grad():
        reference = predictor.model(x).numpy()
    (logits,) = sess.run(None, {"images": x.numpy()})
    assert np.abs(logits - reference).max() <= TOLERANCE


def test_baseline_without_text(tmp_path):
    predictor = make_predictor("tiny_clip_res")
    path = export_onnx(predictor.model, tmp_path / "clip.onnx")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = predictor.model(x).numpy()
    (logits,) = session(path).run(None, {"images": x.numpy()})
    assert np.abs(logits - reference).max() <= TOLERANCE


def test_wrapper_equals_the_segmentor():
    predictor = make_predictor("tiny_denseclip_res")
    wrapper = SegmentorForExport(predictor.model)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        # Exact: the wrapper calls the same forward_features/forward_head with text features
        # from the same encoder call, so the operations (and bits) are the segmentor's.
        torch.testing.assert_close(wrapper(x), predictor.model(x), rtol=0, atol=0)


def test_pre_model_prompting_is_refused(tmp_path):
    predictor = make_predictor("tiny_denseclip_res", overrides=["model.guidance.prompting=pre"])
    with pytest.raises(ExportError, match="pre-model prompting"):
        export_predictor(predictor, tmp_path / "model.onnx")


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="denseclip export")
    arguments.add_export_arguments(parser)
    return export.run(parser.parse_args(list(argv)))


def test_cli(tmp_path, capsys):
    torch.manual_seed(0)
    model = denseclip.build_model(denseclip.load_config("tiny_denseclip_res"))
    checkpoint = save_checkpoint(tmp_path / "tiny.pth", model)
    out = tmp_path / "exported" / "tiny.onnx"
    status = run_cli("tiny_denseclip_res", str(checkpoint), "--format", "onnx", "--out",
                     str(out), "--classes", "cat,dog")
    assert status == 0, capsys.readouterr().err
    assert "open_scores" in capsys.readouterr().out
    sess = session(out)
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["open_class_names"]) == ["cat", "dog"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model.eval()(x).numpy()
    logits, _ = sess.run(None, {"images": x.numpy()})
    assert np.abs(logits - reference).max() <= TOLERANCE

    status = run_cli("tiny_denseclip_res", str(checkpoint), "--out", str(out), "--classes",
                     "a remarkably verbose description")
    assert status == 2 and "at most 3" in capsys.readouterr().err


def test_fp16_export_runs_in_onnxruntime(tmp_path):
    predictor = make_predictor("tiny_denseclip_res", NAMES)
    path = export_predictor(predictor, tmp_path / "half.onnx", precision="fp16")
    assert next(predictor.model.parameters()).dtype == torch.float32  # a copy was converted
    sess = session(path)
    assert sess.get_inputs()[0].type == "tensor(float16)"
    assert json.loads(sess.get_modelmeta().custom_metadata_map["precision"]) == "fp16"
    fp32 = session(export_predictor(predictor, tmp_path / "full.onnx"))
    x = torch.randn(1, 3, 64, 96)
    half_logits, half_scores = sess.run(None, {"images": x.half().numpy()})
    logits, scores = fp32.run(None, {"images": x.numpy()})
    assert half_logits.dtype == np.float32  # the head's output is cast up, as in PyTorch
    # fp16 keeps ~3 decimal digits: compare relative to each output's range.
    for got, want in [(half_logits, logits), (half_scores, scores)]:
        spread = float(want.max() - want.min())
        assert np.abs(got.astype(np.float32) - want).max() <= 1e-2 * spread
    agree = (half_logits.argmax(1) == logits.argmax(1)).mean()
    assert agree >= 0.99


def test_bf16_export_is_refused(tmp_path, capsys):
    status = run_cli("tiny_denseclip_res", "none", "--out", str(tmp_path / "m.onnx"),
                     "--precision", "bf16")
    assert status == 2
    err = capsys.readouterr().err
    assert "bf16" in err and "fp16" in err
    assert not (tmp_path / "m.onnx").exists()
