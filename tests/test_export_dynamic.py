"""ONNX export with the classes as an input (``--dynamic-classes``), the text encoder alone
(``--text-encoder``), ``denseclip embed-classes`` and the torch-free example script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch
from PIL import Image

import denseclip
from denseclip.classes import read_classes
from denseclip.cli import main
from denseclip.inference import Predictor, embed_classes
from denseclip.tools.export import ExportError
from denseclip.tools.export_onnx_dynamic import export_dynamic_classes, export_text_encoder
from denseclip.weights import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# ONNX Runtime and PyTorch agree up to rounding (other kernels and summation orders): the
# tiny models' score maps differ by ~1e-7 and logits by ~2e-6; a wrong graph (a missing
# context decoder, a wrong constant) moves them by O(0.01..0.1).
TOLERANCE = 1e-3
LISTS = [["cat", "dog", "grass"], ["sky", "tree", "car", "road", "person"]]


def make_predictor(preset: str = "tiny_denseclip_res", overrides=()) -> Predictor:
    torch.manual_seed(0)
    cfg = denseclip.load_config(preset, overrides)
    return Predictor.from_model(denseclip.build_model(cfg), cfg, precision="fp32")


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny DenseCLIP with random weights saved as a real checkpoint, and its model
    exported with --dynamic-classes through the command line."""
    folder = tmp_path_factory.mktemp("dynamic")
    predictor = make_predictor()
    checkpoint = save_checkpoint(folder / "tiny.pth", predictor.model)
    onnx_path = folder / "model.onnx"
    assert main(["export", "tiny_denseclip_res", str(checkpoint), "--format", "onnx",
                 "--dynamic-classes", "--out", str(onnx_path)]) == 0
    return predictor, checkpoint, onnx_path


def test_two_class_lists_give_the_torch_open_scores(tiny):
    predictor, _, path = tiny
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["images", "class_embeddings"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "open_scores"]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 70, 100)  # not the export's size, not a multiple of the stride
    diffs = []
    for names in LISTS:
        predictor.set_classes(names)
        embeddings = predictor.embed_classes(names)
        assert embeddings.shape == (len(names), 32) and embeddings.dtype == np.float32
        with torch.no_grad():
            window = predictor.window(x).numpy()  # head logits, then the open score maps
        logits, scores = sess.run(None, {"images": x.numpy(), "class_embeddings": embeddings})
        assert scores.shape == (2, len(names), 70, 100) and logits.shape == (2, 150, 70, 100)
        diffs += [float(np.abs(scores - window[:, 150:]).max()),
                  float(np.abs(logits - window[:, :150]).max())]
    print(f"\nONNX vs PyTorch max |diff| (open scores, logits) per class list: {diffs}")
    assert max(diffs) <= TOLERANCE
    # The score maps do depend on the embeddings given (not on constants of the export).
    a = sess.run(["open_scores"], {"images": x.numpy(),
                                   "class_embeddings": predictor.embed_classes(LISTS[0])})[0]
    b = sess.run(["open_scores"], {"images": x.numpy(), "class_embeddings":
                                   predictor.embed_classes(LISTS[0][::-1])})[0]
    np.testing.assert_allclose(a, b[:, ::-1], atol=TOLERANCE)
    assert np.abs(a - b).max() > 10 * TOLERANCE


def test_the_image_model_holds_no_text_encoder(tiny, tmp_path):
    predictor, _, path = tiny
    proto = onnx.load(str(path))
    text = predictor.cfg.model.text
    shapes = [tuple(t.dims) for t in proto.graph.initializer]
    assert shapes and not any(text.vocab_size in s for s in shapes)  # no token embedding
    assert (text.context_length, text.width) not in shapes  # no positional embedding
    encoder = predictor.guidance.text_encoder
    text_params = sum(p.numel() for p in encoder.parameters())
    all_params = sum(p.numel() for p in predictor.model.parameters())
    image_bytes = 4 * (all_params - text_params)
    assert 4 * text_params > image_bytes  # the tiny text encoder is most of the weights
    assert path.stat().st_size <= image_bytes + 200_000  # so leaving it out shows
    meta = {k: json.loads(v) for k, v in session(path).get_modelmeta()
            .custom_metadata_map.items()}
    assert meta["dynamic_classes"] is True and meta["class_embedding_dim"] == 32
    assert meta["evaluation"] == {"mode": "slide", "crop_size": [64, 64], "stride": [43, 43]}
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*proto.graph.input, *proto.graph.output]}
    assert dims == {"images": ["batch", 3, "height", "width"],
                    "class_embeddings": ["classes", 32],
                    "logits": ["batch", 150, "height", "width"],
                    "open_scores": ["batch", "classes", "height", "width"]}


def test_vit_dynamic_classes(tmp_path):
    predictor = make_predictor("tiny_denseclip_vit")
    sess = session(export_dynamic_classes(predictor, tmp_path / "vit.onnx"))
    x = torch.randn(1, 3, 64, 96)
    for names in LISTS:
        predictor.set_classes(names)
        with torch.no_grad():
            window = predictor.window(x).numpy()
        _, scores = sess.run(None, {"images": x.numpy(),
                                    "class_embeddings": predictor.embed_classes(names)})
        assert np.abs(scores - window[:, 150:]).max() <= TOLERANCE


def test_text_encoder_onnx_equals_torch(tiny, tmp_path, capsys):
    predictor, checkpoint, _ = tiny
    path = tmp_path / "text.onnx"
    assert main(["export", "tiny_denseclip_res", str(checkpoint), "--text-encoder",
                 "--out", str(path)]) == 0
    sess = session(path)
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    length = meta["token_length"]
    assert length == predictor.guidance.text_length
    for names in LISTS:
        # open_clip's tokenizer gives the model's tokens (what the README documents)
        tokens = open_clip.tokenize(names, context_length=length).numpy()
        np.testing.assert_array_equal(tokens, predictor.guidance.tokenize(names).numpy())
        (embeddings,) = sess.run(None, {"tokens": tokens})
        assert np.abs(embeddings - predictor.embed_classes(names)).max() <= TOLERANCE
    initializers = [tuple(t.dims) for t in onnx.load(str(path)).graph.initializer]
    assert any(predictor.cfg.model.text.vocab_size in s for s in initializers)


def test_text_encoder_onnx_ensembles_the_templates(tmp_path):
    templates = ["a photo of {}.", "{}", "a sketch of a {}."]
    predictor = make_predictor(overrides=[f"model.text.templates={templates}"])
    path = export_text_encoder(predictor, tmp_path / "text.onnx")
    sess = session(path)
    meta = {k: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items()}
    assert meta["templates"] == templates
    names = ["cat", "grass", "traffic light"]
    prompts = [t.format(n) for n in names for t in meta["templates"]]
    tokens = open_clip.tokenize(prompts, context_length=meta["token_length"]).numpy()
    (embeddings,) = sess.run(None, {"tokens": tokens})
    assert embeddings.shape[0] == len(names)  # one ensembled embedding per class
    assert np.abs(embeddings - predictor.embed_classes(names)).max() <= TOLERANCE


def test_embed_classes_cli_writes_embeddings_and_names(tiny, tmp_path, capsys):
    predictor, checkpoint, _ = tiny
    classes = tmp_path / "mine.txt"
    classes.write_text("# my classes\ncat\npuppy: dog\ngrass\n")
    out = tmp_path / "emb" / "classes.npy"
    assert main(["embed-classes", "tiny_denseclip_res", str(checkpoint), "--classes-file",
                 str(classes), "--out", str(out)]) == 0
    assert "3 x 32" in capsys.readouterr().out
    embeddings = np.load(out, allow_pickle=False)
    assert read_classes(out.with_suffix(".txt")) == {"cat": "cat", "puppy": "dog",
                                                     "grass": "grass"}
    # exactly the embeddings the model scores those texts with
    mapping = {"cat": "cat", "puppy": "dog", "grass": "grass"}
    result = embed_classes(predictor, mapping)
    np.testing.assert_array_equal(embeddings, result.embeddings)
    with torch.no_grad():
        reference = predictor.guidance.embed(["cat", "dog", "grass"])[0].numpy()
    np.testing.assert_array_equal(embeddings, reference)


@pytest.mark.parametrize("argv, message", [
    (["tiny_denseclip_res", "none", "model.guidance.prompting=pre"], "pre-model prompting"),
    (["tiny_retinanet_denseclip", "none"], "segmentation presets"),
    (["tiny_clip_res", "none"], "no text guidance"),
])
def test_models_without_image_independent_text_are_refused(argv, message, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", *argv, "--dynamic-classes", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("denseclip export: error:")
    assert not out.exists()
    if argv[0] != "tiny_retinanet_denseclip":
        assert main(["embed-classes", *argv, "--classes", "a,b", "--out",
                     str(tmp_path / "c.npy")]) == 2
        assert "denseclip embed-classes: error:" in capsys.readouterr().err


def test_classes_are_not_baked_into_a_dynamic_export(tmp_path, capsys):
    assert main(["export", "tiny_denseclip_res", "none", "--dynamic-classes", "--classes",
                 "a,b", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "embed-classes" in capsys.readouterr().err
    assert main(["export", "tiny_denseclip_res", "none", "--text-encoder", "--format",
                 "safetensors", "--out", str(tmp_path / "dir")]) == 2
    assert "--format onnx" in capsys.readouterr().err
    assert not (tmp_path / "dir").exists()


def test_pre_model_prompting_api_error(tmp_path):
    predictor = make_predictor(overrides=["model.guidance.prompting=pre"])
    with pytest.raises(ExportError, match="pre-model prompting"):
        export_text_encoder(predictor, tmp_path / "t.onnx")


# ------------------------------------------------------------------ the example script
NO_TORCH = ("import runpy, sys\n"
            "sys.modules['torch'] = None  # importing torch now raises ImportError\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def write_images(folder: Path) -> list[Path]:
    """Two non-square PNGs (both resize directions): smooth colour waves plus noise, so
    that the label maps have regions and boundaries."""
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(53, 91), (150, 47)]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(yy / (5 + 3 * c) + xx / (7 + c)) for c in range(3)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 20, (h, w, 3)), 0, 255)
        paths.append(folder / f"im{i}.png")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1])
    return paths


# The ViT's score maps vary over these images with random weights; the ResNet's attention
# pool averages its random features into one direction, so its open labels are one class
# (its head's labels vary), and it checks whole-image inference.
@pytest.mark.parametrize("preset, mode", [("tiny_denseclip_vit", "slide"),
                                          ("tiny_denseclip_res", "whole")])
def test_example_script_matches_predict_without_torch(preset, mode, tmp_path, capsys):
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny.pth",
                                 denseclip.build_model(denseclip.load_config(preset)))
    images = write_images(tmp_path)
    overrides = [] if mode == "slide" else ["evaluation.mode=whole"]
    model, npy = tmp_path / "model.onnx", tmp_path / "classes.npy"
    classes = "cat,dog,grass,sky"
    assert main(["export", preset, str(checkpoint), *overrides, "--dynamic-classes",
                 "--out", str(model)]) == 0
    assert main(["embed-classes", preset, str(checkpoint), "--classes", classes,
                 "--out", str(npy)]) == 0
    assert main(["predict", preset, str(checkpoint), *map(str, images), *overrides,
                 "--classes", classes, "--precision", "fp32",
                 "--out", str(tmp_path / "torch")]) == 0
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(ROOT / "examples" / "onnx_segment.py"),
         str(model), str(npy), *map(str, images), "--out", str(tmp_path / "onnx")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for path in images:
        for suffix in ("labels", "open_labels"):
            want = np.asarray(Image.open(tmp_path / "torch" / f"{path.stem}_{suffix}.png"))
            got = np.asarray(Image.open(tmp_path / "onnx" / f"{path.stem}_{suffix}.png"))
            assert got.shape == want.shape
            if suffix == "labels" or preset.endswith("vit"):
                assert len(np.unique(want)) > 1  # something to agree on
            agree = float((got == want).mean())
            print(f"{preset} {mode} {path.name} {suffix}: {agree:.5f} of pixels agree")
            assert agree >= 0.999
        # the script names the classes it found, from classes.txt beside the embeddings
        names = set(proc.stdout.split(f"{path}: ")[1].splitlines()[0].split(", "))
        want = np.asarray(Image.open(tmp_path / "torch" / f"{path.stem}_open_labels.png"))
        assert names == {classes.split(",")[i] for i in np.unique(want)}


def test_example_script_cannot_import_torch(tmp_path):
    # The guard of the test above works: a script importing torch fails under it.
    script = tmp_path / "uses_torch.py"
    script.write_text("import torch\n")
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torch" in proc.stderr


def test_fp16_dynamic_export_takes_float32_embeddings(tiny, tmp_path):
    predictor, _, full = tiny
    half = session(export_dynamic_classes(predictor, tmp_path / "half.onnx", precision="fp16"))
    assert [i.type for i in half.get_inputs()] == ["tensor(float16)", "tensor(float)"]
    embeddings = predictor.embed_classes(LISTS[1])
    x = torch.randn(1, 3, 64, 96)
    (got,) = half.run(["open_scores"], {"images": x.half().numpy(),
                                        "class_embeddings": embeddings})
    (want,) = session(full).run(["open_scores"], {"images": x.numpy(),
                                                  "class_embeddings": embeddings})
    # fp16 keeps ~3 decimal digits: compare relative to the scores' range
    assert np.abs(got.astype(np.float32) - want).max() <= 1e-2 * float(want.max() - want.min())


@pytest.mark.parametrize("flag", ["--dynamic-classes", "--text-encoder"])
def test_int8_with_the_vocabulary_as_input_is_refused(tiny, tmp_path, capsys, flag):
    _, checkpoint, _ = tiny
    out = tmp_path / "m.onnx"
    assert main(["export", "tiny_denseclip_res", str(checkpoint), flag, "--precision", "int8",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8" in err[0] and flag in err[0] and not out.exists()
