"""Class texts (``name: text`` lines) read by the text encoder, the text context growing to
fit them, and prompt-template ensembles: in built models, saved models and training runs."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import yaml

import denseclip
from denseclip.config import ConfigError, load_config
from denseclip.models import tokenize
from denseclip.models.build import fit_text_context
from denseclip.weights import load_checkpoint, read_checkpoint, save_checkpoint
from denseclip.weights.resolver import describe
from tests.helpers.tiny_run import make_data, train_tiny, write_openai_clip
from tests.helpers.weights import randomise_batchnorm

GROW = "model.text.context_length 13 -> "
LONG = "a small domesticated feline with soft fur"  # 8 BPE tokens: 13 -> 18


def class_file(tmp_path, name: str, lines: list[str]):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny(preset: str = "tiny_denseclip_res", *overrides: str):
    torch.manual_seed(0)
    model = denseclip.build_model(load_config(preset, list(overrides)))
    randomise_batchnorm(model)
    return model.eval()


def logits(model, seed: int = 0) -> torch.Tensor:
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(images)


def grow_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(GROW)]


def test_descriptions_are_embedded_and_names_are_shown(tmp_path):
    described = class_file(tmp_path, "described.txt", ["cat: kitten", "dog: puppy", "grass: lawn"])
    as_names = class_file(tmp_path, "texts.txt", ["kitten", "puppy", "lawn"])
    names = class_file(tmp_path, "names.txt", ["cat", "dog", "grass"])
    model = tiny("tiny_denseclip_res", f"model.classes={described}")
    assert model.class_names == ["cat", "dog", "grass"]
    assert model.class_texts == ["kitten", "puppy", "lawn"]
    out = logits(model)
    torch.testing.assert_close(out, logits(tiny("tiny_denseclip_res",
                                                f"model.classes={as_names}")), rtol=0, atol=0)
    assert not torch.allclose(out, logits(tiny("tiny_denseclip_res", f"model.classes={names}")))
    # set_classes takes names (embedded as themselves) or {name: text}
    model.set_classes(["kitten", "puppy", "lawn"])
    torch.testing.assert_close(logits(model), out, rtol=0, atol=0)
    model.set_classes({"cat": "kitten", "dog": "puppy", "grass": "lawn"})
    assert model.class_names == ["cat", "dog", "grass"]
    torch.testing.assert_close(logits(model), out, rtol=0, atol=0)


def test_detector_embeds_descriptions(tmp_path):
    described = class_file(tmp_path, "d.txt", ["cat: kitten", "dog: puppy"])
    as_names = class_file(tmp_path, "n.txt", ["kitten", "puppy"])
    det = tiny("tiny_retinanet_denseclip", f"model.classes={described}")
    ref = tiny("tiny_retinanet_denseclip", f"model.classes={as_names}")
    assert det.class_names == ["cat", "dog"]
    with torch.no_grad():
        torch.testing.assert_close(det.guidance.text_embeddings(),
                                   ref.guidance.text_embeddings(), rtol=0, atol=0)


def test_save_and_reload_keep_the_descriptions(tmp_path):
    described = class_file(tmp_path, "d.txt", ["cat: kitten", "dog", "grass: lawn"])
    model = tiny("tiny_denseclip_res", f"model.classes={described}")
    saved = model.save_pretrained(tmp_path / "saved")
    assert (saved / "classes.txt").read_text() == "cat: kitten\ndog\ngrass: lawn\n"
    described.unlink()  # the saved directory alone describes the model
    back = denseclip.from_pretrained(saved)
    assert back.class_names == ["cat", "dog", "grass"]
    assert back.class_texts == ["kitten", "dog", "lawn"]
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)
    info = describe(saved)
    assert denseclip.build_model(info.config).class_texts == ["kitten", "dog", "lawn"]


def test_training_checkpoint_keeps_the_descriptions(tmp_path):
    described = class_file(tmp_path, "d.txt", ["cat: kitten", "dog: puppy"])
    cfg = load_config("tiny_denseclip_res", [f"model.classes={described}"])
    model = denseclip.build_model(cfg)
    path = save_checkpoint(tmp_path / "iter_1.pth", model, iteration=1,
                           config=cfg.to_dict(), classes=["cat", "dog"],
                           class_texts={"cat": "kitten", "dog": "puppy"})
    described.unlink()  # the checkpoint's record serves
    info = describe(path)
    assert info.classes == ["cat", "dog"]
    again = denseclip.build_model(info.config)
    assert again.class_texts == ["kitten", "puppy"]
    load_checkpoint(again, path)  # same classes by name: loads without complaint


def test_context_is_kept_when_names_fit(tmp_path, caplog):
    cfg = load_config("tiny_denseclip_res", [
        f"model.classes={class_file(tmp_path, 'c.txt', ['cat: kitten', 'traffic light'])}"])
    with caplog.at_level(logging.INFO):
        model = denseclip.build_model(cfg)
    assert cfg.model.text.context_length == 13
    assert model.guidance.text_encoder.positional_embedding.shape[0] == 13
    assert grow_records(caplog) == []


def test_context_grows_once_and_the_clip_position_embedding_is_cut(tmp_path, caplog):
    clip = write_openai_clip(tmp_path / "clip.pt")
    classes = class_file(tmp_path, "c.txt", [f"cat: {LONG}", "dog"])
    cfg = load_config("tiny_denseclip_res", [f"model.classes={classes}",
                                             f"model.pretrained={clip}"])
    with caplog.at_level(logging.INFO):
        model = denseclip.build_model(cfg)
    needed = len(tokenize([LONG], 77).nonzero()) + 8  # SOT + tokens + EOT + contexts
    assert grow_records(caplog) == [grow_records(caplog)[0]]
    assert f"13 -> {needed} to fit class 'cat'" in grow_records(caplog)[0]
    assert cfg.model.text.context_length == needed == model.config.model.text.context_length
    reference = torch.load(clip, weights_only=True)["positional_embedding"]
    torch.testing.assert_close(model.guidance.text_encoder.positional_embedding.detach(),
                               reference[:needed], rtol=0, atol=0)
    assert model.guidance.tokens.shape == (2, needed - 8)
    # open-vocabulary texts that do not fit still fail clearly
    with pytest.raises(ValueError, match="needs .* BPE tokens"):
        model.guidance.tokenize([LONG + " sitting on a red carpet in the sun"])


def test_context_beyond_clip_is_refused(tmp_path):
    classes = class_file(tmp_path, "c.txt", ["cat: " + " ".join(["kitten"] * 70)])
    cfg = load_config("tiny_denseclip_res", [f"model.classes={classes}"])
    with pytest.raises(ConfigError, match="model.classes: class 'cat'"):
        fit_text_context(cfg.model)


def test_grown_context_in_a_training_run_and_its_reloads(tmp_path, caplog):
    data = make_data(tmp_path / "data")
    names = (data / "classes.txt").read_text().split()
    texts = {n: f"{n} {LONG}" if i == 0 else n for i, n in enumerate(names)}
    (data / "classes.txt").write_text("".join(
        f"{n}: {t}\n" if t != n else f"{n}\n" for n, t in texts.items()))
    needed = len(tokenize([texts[names[0]]], 77).nonzero()) + 8
    with caplog.at_level(logging.INFO):
        work = train_tiny(tmp_path / "work", data)
    assert len(grow_records(caplog)) == 1
    assert yaml.safe_load((work / "config.yaml").read_text())["model"]["text"][
        "context_length"] == needed
    state = read_checkpoint(work / "iter_2.pth")
    assert state["config"]["model"]["text"]["context_length"] == needed
    assert state["class_texts"] == texts
    assert yaml.safe_load((work / "model" / "config.yaml").read_text())["model"]["text"][
        "context_length"] == needed
    (data / "classes.txt").unlink()  # the data moved: the checkpoint's texts serve
    info = describe(work)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = denseclip.build_model(info.config).eval()
        saved = denseclip.from_pretrained(work / "model")
    assert grow_records(caplog) == []  # the saved configs already hold the grown length
    load_checkpoint(again, info.checkpoint)
    assert again.class_texts == saved.class_texts == list(texts.values())
    torch.testing.assert_close(logits(again), logits(saved), rtol=0, atol=0)


# ---------------------------------------------------------------------------- templates
TEMPLATES = ["a photo of a {}.", "a sketch of a {}."]


def manual_ensemble(guidance, texts: list[str], contexts: torch.Tensor) -> torch.Tensor:
    """Per-template embeddings, normalised, averaged, normalised, scaled to their mean
    length: the ensemble as documented, computed template by template."""
    per = torch.stack([guidance.text_encoder(tokenize([t.format(x) for x in texts],
                                                      guidance.text_length), contexts)
                       for t in TEMPLATES])  # (M, B, K, D)
    mean = torch.stack([F.normalize(e, dim=-1) for e in per]).mean(0)
    return F.normalize(mean, dim=-1) * per.norm(dim=-1, keepdim=True).mean(0)


def test_template_ensemble_equals_the_hand_computed_mean(tmp_path):
    classes = class_file(tmp_path, "c.txt", ["cat: kitten", "dog"])
    model = tiny("tiny_denseclip_res", f"model.classes={classes}",
                 f"model.text.templates={TEMPLATES}")
    g = model.guidance
    assert model.config.model.text.context_length == 16  # "a sketch of a kitten." grew it
    with torch.no_grad():
        expected = manual_ensemble(g, ["kitten", "dog"], g.contexts)
        torch.testing.assert_close(g.text_embeddings(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.embed(["puppy"]), manual_ensemble(g, ["puppy"], g.contexts),
                                   rtol=1e-5, atol=1e-6)
    plain = tiny("tiny_denseclip_res", f"model.classes={classes}",
                 "model.text.context_length=16")
    assert not torch.allclose(logits(model), logits(plain))
    # one template "{}" gives the plain embedding back (up to rounding)
    same = tiny("tiny_denseclip_res", f"model.classes={classes}", "model.text.templates=['{}']")
    torch.testing.assert_close(logits(same), logits(tiny("tiny_denseclip_res",
                                                         f"model.classes={classes}")))


def test_templates_with_pre_model_prompting_are_ensembled(tmp_path):
    classes = class_file(tmp_path, "c.txt", ["cat", "dog"])
    model = tiny("tiny_denseclip_res", f"model.classes={classes}",
                 "model.guidance.prompting=pre", f"model.text.templates={TEMPLATES}")
    g = model.guidance
    assert g.tokens.shape[0] == 2 * len(TEMPLATES)
    global_embed, dense = torch.randn(2, 32), torch.randn(2, 32, 2, 2)
    with torch.no_grad():
        out = g(global_embed, dense)
        visual = torch.cat([global_embed[:, :, None], dense.flatten(2)], dim=2).transpose(1, 2)
        expected = manual_ensemble(g, ["cat", "dog"], g.prompt_generator(visual))
    torch.testing.assert_close(out.text, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["a photo", "a {} and a {}", "a {0} photo", "a {name}"])
def test_a_bad_template_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="model.text.templates"):
        load_config("tiny_denseclip_res", [f"model.text.templates=['a {{}}.', '{bad}']"])
