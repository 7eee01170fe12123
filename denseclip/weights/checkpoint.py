"""Reading and writing weights: our checkpoints, plain state dicts, official DenseCLIP
releases (mmcv format) and OpenAI CLIP releases, converted in one place.

Every format is converted to this package's key names with a rename table, tensors whose
shape can be reconciled (position embeddings) are resized, and the result is loaded
strictly: a model key that receives nothing must be on the allow-list of parameters that
the format does not carry (e.g. the decode head when initialising from CLIP), and a file
key that has no home is an error.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..config import PRESET_DIR
from ..utils import resize_grid, unwrap_model
from .atomic import atomic_write
from .torchscript import TorchScriptUnreadable, read_torchscript_weights

FORMAT = "denseclip"
ENV_ALLOW_TORCHSCRIPT = "DENSECLIP_ALLOW_TORCHSCRIPT"


class CheckpointError(ValueError):
    """A file is not a usable checkpoint for the model."""


class ClassMismatchError(CheckpointError):
    """One of our checkpoints was trained for other classes than the model's config has:
    the message says so in words, and where the config that fits is."""

    def __init__(self, path: Path, trained: list[str], config_name: str | None,
                 num_classes: int) -> None:
        self.path, self.trained = path, trained
        self.config_name, self.num_classes = config_name, num_classes
        super().__init__(self.for_command("predict"))

    def for_command(self, command: str) -> str:
        """The message, its example written for ``denseclip COMMAND``."""
        shown = ", ".join(self.trained[:3]) + (", …" if len(self.trained) > 3 else "")
        what = f"config {self.config_name}" if self.config_name else "the model"
        if self.config_name and (PRESET_DIR / f"{self.config_name}.yaml").is_file():
            what = f"preset {self.config_name}"
        work_dir = self.path.parent
        hint = work_dir if (work_dir / "config.yaml").is_file() else self.path
        return (f"{self.path}: the checkpoint was trained for {len(self.trained)} classes "
                f"({shown}) but {what} has {self.num_classes}; use the work dir or its "
                f"config.yaml, or the checkpoint alone, in place of the preset and the "
                f"checkpoint: denseclip {command} {hint} …")


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    path: str
    format: str  # "denseclip", "state_dict", "official", "openai", "imagenet"
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)  # model keys left at their initialisation
    ignored: list[str] = field(default_factory=list)  # file keys with no use in this model
    resized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # our checkpoints: everything else
    notes: list[str] = field(default_factory=list)  # further lines for the report

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.format} checkpoint, {len(self.loaded)} tensors loaded"]
        if self.resized:
            lines.append("resized: " + ", ".join(f"{k} {list(a)}→{list(b)}"
                                                 for k, a, b in self.resized))
        if self.new:
            lines.append(f"left at initialisation ({len(self.new)}): {_summarise(self.new)}")
        if self.ignored:
            lines.append(f"ignored ({len(self.ignored)}): {_summarise(self.ignored)}")
        return "\n".join(lines + self.notes)


def _summarise(keys: Iterable[str], limit: int = 8) -> str:
    """Group keys by their first two components so long lists stay readable."""
    groups: dict[str, int] = {}
    for k in keys:
        prefix = ".".join(k.split(".")[:2])
        groups[prefix] = groups.get(prefix, 0) + 1
    items = [f"{p}({n})" if n > 1 else p for p, n in groups.items()]
    more = f", … {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ---------------------------------------------------------------------------- rename tables
# Official DenseCLIP releases: each model class carries its table as ``official_renames``
# (denseclip.models.official).

# OpenAI CLIP key → ours.
OPENAI_RENAMES = [
    (r"^visual\.", "backbone."),
    (r"^(transformer|token_embedding|ln_final)\.", r"guidance.text_encoder.\1."),
    (r"^(positional_embedding|text_projection)$", r"guidance.text_encoder.\1"),
]
# OpenAI keys that are bookkeeping, not weights of any tower.
OPENAI_UNUSED = {"logit_scale", "input_resolution", "context_length", "vocab_size"}
# Model keys that CLIP weights do not provide: everything DenseCLIP adds on top of CLIP.
OPENAI_NEW = (r"^guidance\.(contexts|gamma|context_decoder\.|prompt_generator\.)",
              r"^neck\.", r"^head\.", r"^rpn\.", r"^roi_heads\.", r"^backbone\.fpn\d",
              r"\.num_batches_tracked$")


def rename_key(key: str, table: list[tuple[str, str]]) -> str:
    """``key`` renamed by the first matching (regex, replacement) rule of ``table``."""
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# ---------------------------------------------------------------------------- reading files
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 1)[-1] == "constants.pkl" for n in zf.namelist())


def torchscript_allowed(allow_torchscript: bool | None = None) -> bool:
    """Whether TorchScript archives may be opened with ``torch.jit.load``: the explicit
    argument, else ``DENSECLIP_ALLOW_TORCHSCRIPT=1`` in the environment."""
    if allow_torchscript is not None:
        return allow_torchscript
    return os.environ.get(ENV_ALLOW_TORCHSCRIPT, "").strip().lower() in ("1", "true", "yes")


def read_checkpoint(path: str | Path, weights_only: bool = True,
                    allow_torchscript: bool | None = None) -> Any:
    """Load a checkpoint file's object safely: pickles with ``weights_only``; a TorchScript
    archive (OpenAI's CLIP releases) is reduced to its state dict by a reader that runs none
    of the archive's code (:mod:`denseclip.weights.torchscript`). ``torch.jit.load``, which compiles
    and runs the archive's scripted code, is used only with ``allow_torchscript=True`` or
    ``DENSECLIP_ALLOW_TORCHSCRIPT=1``. Raises ``FileNotFoundError`` /
    :class:`CheckpointError` with the path."""
    path = Path(path)
    if not os.path.isfile(path):  # False, not OSError, for a text too long to be a path
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if _is_torchscript(path):
        return _read_torchscript(path, torchscript_allowed(allow_torchscript))
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save: a zip, or a pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (nor a .safetensors file): "
                              f"it is neither a zip archive nor a pickle")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if weights_only and "weights_only" in str(e):
            raise CheckpointError(
                f"{path}: holds Python objects that a weights-only load refuses ({msg}); "
                f"if you trust the file, load it with weights_only=False"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {msg}") from None


def _read_torchscript(path: Path, allowed: bool) -> dict[str, torch.Tensor]:
    if allowed:
        try:
            with warnings.catch_warnings():  # TorchScript is deprecated, yet CLIP ships it
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:  # noqa: BLE001 - any failure means "not a usable archive"
            raise CheckpointError(f"{path}: cannot read TorchScript archive: {e}") from None
    try:
        return read_torchscript_weights(path)
    except (TorchScriptUnreadable, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path}: TorchScript archive whose weights cannot be read without running its "
            f"code ({e}); loading TorchScript runs code stored in the file, so it is off by "
            f"default: if you trust the file, set {ENV_ALLOW_TORCHSCRIPT}=1 (or pass "
            f"allow_torchscript=True)") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file's tensors (the format holds data only: nothing is executed)."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _tensors_only(d: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    bad = [k for k, v in d.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict, non-tensor entries {_summarise(bad)}")
    return d


def detect_format(obj: Any, path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Recognise a checkpoint's format by its structure and key prefixes."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of weights, got {type(obj).__name__}")
    if obj.get("format") == FORMAT and isinstance(obj.get("model"), dict):
        return "denseclip", _tensors_only(obj["model"], path)
    if isinstance(obj.get("state_dict"), dict):
        sd = _tensors_only(obj["state_dict"], path)
        return "official", {k.removeprefix("module."): v for k, v in sd.items()}
    if not obj:
        raise CheckpointError(f"{path}: the checkpoint is empty")
    sd = _tensors_only(obj, path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd) or "token_embedding.weight" in sd:
        return "openai", sd
    return "state_dict", sd


# ---------------------------------------------------------------------------- reconciling
def _resize_pos_embed(value: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """(1 + n², C) → (1 + m², C): the leading token is kept, the grid resized bilinearly."""
    n, m = round((value.shape[0] - 1) ** 0.5), round((target[0] - 1) ** 0.5)
    if n * n + 1 != value.shape[0] or m * m + 1 != target[0] or value.shape[1] != target[1]:
        raise CheckpointError("not a square position grid")
    grid = resize_grid(value[1:].float(), (m, m)).to(value.dtype)
    return torch.cat([value[:1], grid])


def _reconcile(key: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if value.shape == target.shape:
        return value
    try:
        if key.startswith("backbone.") and key.endswith("positional_embedding"):
            return _resize_pos_embed(value, target.shape)
        if key == "guidance.text_encoder.positional_embedding" and (
            value.shape[1:] == target.shape[1:] and value.shape[0] >= target.shape[0]
        ):
            return value[: target.shape[0]]  # CLIP's 77 positions → the first T
    except CheckpointError:
        pass
    raise CheckpointError(
        f"{key}: checkpoint shape {list(value.shape)} does not fit the model's "
        f"{list(target.shape)}"
    )


@dataclass
class ImageNetKeys:
    """How an ImageNet classifier's state dict meets a model with an ImageNet backbone
    (:class:`~denseclip.models.imagenet.ImageNetBackbone`)."""

    mapping: dict[str, str]  # file key → model key
    unused: set[str]  # file keys of the classifier that the pyramid leaves out
    new: set[str]  # model keys the file cannot provide (attention pool, added norms, heads)


def imagenet_keys(model: nn.Module, sd: dict[str, torch.Tensor]) -> ImageNetKeys | None:
    """The key map when ``sd`` is an ImageNet state dict for ``model``'s backbone (a
    torchvision or timm classifier's keys, none of this package's), else None."""
    backbone = getattr(model, "backbone", None)
    if not callable(getattr(backbone, "file_keys", None)) or any(
            k.startswith(("backbone.", "guidance.", "neck.")) for k in sd):
        return None
    mapping, unused = backbone.file_keys()
    if not any(k in mapping for k in sd):
        return None
    mapping = {k: f"backbone.{v}" for k, v in mapping.items()}
    mapped = set(mapping.values())
    new = {k for k in model.state_dict()
           if not k.startswith("backbone.body.") or k not in mapped}
    return ImageNetKeys(mapping, unused, new)


def convert_state_dict(sd: dict[str, torch.Tensor], fmt: str,
                       model_sd: dict[str, torch.Tensor],
                       official_table: list[tuple[str, str]] | None = None,
                       imagenet: ImageNetKeys | None = None,
                       ) -> tuple[dict, list[str]]:
    """Rename ``sd`` from ``fmt`` to this package's keys. Returns (renamed, ignored keys):
    keys that by design have no counterpart in ``model_sd``. An official release needs
    ``official_table``, the model's rename table; an ``imagenet`` file its key map."""
    if fmt == "imagenet":
        if imagenet is None:
            raise CheckpointError("an ImageNet state dict loads into a model with a "
                                  "torchvision or timm backbone only")
        out, ignored = {}, []
        for key, value in sd.items():
            if key in imagenet.mapping:
                out[imagenet.mapping[key]] = value
            elif key in imagenet.unused:
                ignored.append(key)
            else:
                out[key] = value  # unknown to the model: an error when loading strictly
        return out, ignored
    if fmt == "official" and official_table is None:
        raise CheckpointError("an official DenseCLIP release needs the model's rename table "
                              "(its official_renames); official releases load into the "
                              "segmentor and the detectors only")
    table = {"official": official_table, "openai": OPENAI_RENAMES}.get(fmt) or []
    out, ignored = {}, []
    for key, value in sd.items():
        if fmt == "openai" and key in OPENAI_UNUSED:
            ignored.append(key)
            continue
        new = rename_key(key, table)
        if fmt == "openai" and new not in model_sd:
            # CLIP parts this model does not build (text tower of a baseline, attention pool
            # or ViT projection when no embeddings are used) are expected to stay unused.
            ignored.append(key)
            continue
        out[new] = value
    return out, ignored


def load_checkpoint(model: nn.Module, path: str | Path, weights_only: bool = True,
                    strict: bool = True, allow_torchscript: bool | None = None) -> LoadReport:
    """Load weights from ``path`` into ``model`` and report what happened.

    Accepted: this package's checkpoints (``{"format": "denseclip", "model": ...}``), a
    plain state dict of the model, official DenseCLIP releases (mmcv ``{"meta",
    "state_dict"}`` with the official key names) and OpenAI CLIP releases (TorchScript
    archive or state dict), which initialise the backbone and text encoder; position
    embeddings are resized and the text position embedding truncated on the way.

    With ``strict`` (default), a model key that receives nothing and is not a parameter the
    format cannot carry, or a file key that has no place in the model, raises
    :class:`CheckpointError` listing the keys; shapes that cannot be reconciled raise naming
    the key and both shapes. A TorchScript archive is read without running its code
    unless ``allow_torchscript`` (or ``DENSECLIP_ALLOW_TORCHSCRIPT=1``) permits
    ``torch.jit.load`` (:func:`read_checkpoint`).
    """
    path = Path(path)
    obj = read_checkpoint(path, weights_only=weights_only, allow_torchscript=allow_torchscript)
    return load_checkpoint_object(model, obj, path, strict)


def load_checkpoint_object(model: nn.Module, obj: Any, path: str | Path,
                           strict: bool = True) -> LoadReport:
    """:func:`load_checkpoint` for a checkpoint already read with :func:`read_checkpoint`
    (``path`` names it in messages)."""
    path = Path(path)
    fmt, sd = detect_format(obj, path)
    if fmt == "denseclip":
        _check_classes(model, obj, path)
    imagenet = imagenet_keys(model, sd) if fmt == "state_dict" else None
    if imagenet is not None:
        fmt = "imagenet"
    model_sd = model.state_dict()
    try:
        renamed, ignored = convert_state_dict(sd, fmt, model_sd,
                                              getattr(model, "official_renames", None),
                                              imagenet)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {type(model).__name__}: {e}") from None

    unexpected = sorted(k for k in renamed if k not in model_sd)
    missing = [k for k in model_sd if k not in renamed]
    allowed = OPENAI_NEW if fmt == "openai" else (r"\.num_batches_tracked$",)
    new = [k for k in missing if any(re.search(p, k) for p in allowed)
           or (imagenet is not None and k in imagenet.new)]
    not_loaded = [k for k in missing if k not in new]
    if strict and (unexpected or not_loaded):
        parts = [f"{path}: {fmt} checkpoint does not match the model"]
        if not_loaded:
            parts.append(f"model keys missing from the file ({len(not_loaded)}): "
                         + ", ".join(not_loaded[:20]) + (" …" if len(not_loaded) > 20 else ""))
        if unexpected:
            parts.append(f"file keys unknown to the model ({len(unexpected)}): "
                         + ", ".join(unexpected[:20]) + (" …" if len(unexpected) > 20 else ""))
        raise CheckpointError("\n".join(parts))

    report = LoadReport(str(path), fmt, new=missing if not strict else new, ignored=ignored)
    report.ignored += [k for k in renamed if k not in model_sd]
    _load_fitted(model, {k: v for k, v in renamed.items() if k in model_sd}, model_sd, path,
                 report)
    if fmt == "imagenet" and ignored:
        report.notes.append(f"not part of the feature pyramid: the ImageNet classifier's "
                            f"{_summarise(ignored)}")
    if fmt == "denseclip":
        report.extra = {k: v for k, v in obj.items() if k not in ("model", "format")}
    return report


def _check_classes(model: nn.Module, obj: dict[str, Any], path: Path) -> None:
    """Refuse one of our checkpoints whose recorded classes (``classes`` of its meta) are
    more or fewer than ``model``'s (:class:`ClassMismatchError`, before any shape error
    says the same thing in terms of tensors); warn when only the names differ."""
    trained = obj.get("classes")
    count = getattr(model, "num_classes", None)
    if not isinstance(trained, list) or not isinstance(count, int) or not trained:
        return
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name", None)
    if len(trained) != count:
        raise ClassMismatchError(path, [str(c) for c in trained], name, count)
    names = getattr(model, "class_names", None)
    if names is None:
        guidance = getattr(model, "guidance", None)
        names = getattr(guidance, "class_names", None)
    if names is not None and list(names) != list(trained):
        warnings.warn(f"{path}: the checkpoint was trained for the classes "
                      f"{', '.join(map(str, trained[:3]))}, … but the model's config names "
                      f"them {', '.join(map(str, list(names)[:3]))}, …; results will carry "
                      f"the config's names", UserWarning, stacklevel=3)


def _check_finite(key: str, value: torch.Tensor, path: Path) -> None:
    """Refuse ``value`` when it holds NaN or Inf: such weights give silently wrong outputs
    (a diverged run, a corrupted file). One ``isfinite`` reduction per floating tensor."""
    if value.is_meta or not (value.is_floating_point() or value.is_complex()) \
            or torch.isfinite(value).all():
        return
    nan = int(torch.isnan(value).sum())
    inf = int(torch.isinf(value).sum())
    raise CheckpointError(f"{path}: {key} holds non-finite values ({nan} NaN, {inf} Inf of "
                          f"{value.numel()}); the weights are corrupt, e.g. saved from a "
                          f"diverged run")


def _load_fitted(model: nn.Module, renamed: dict[str, torch.Tensor],
                 model_sd: dict[str, torch.Tensor], path: Path, report: LoadReport) -> None:
    """Load ``renamed`` (model keys → file tensors) into ``model``, each tensor fitted to
    the model's shape (:func:`_reconcile`) and dtype; ``report`` records what was loaded
    and resized. A NaN or Inf in any tensor refuses the whole file, before anything loads."""
    final = {}
    for key, value in renamed.items():
        _check_finite(key, value, path)
        target = model_sd[key]
        try:
            fitted = _reconcile(key, value, target)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        if fitted.shape != value.shape:
            report.resized.append((key, tuple(value.shape), tuple(fitted.shape)))
        final[key] = fitted.to(target.dtype)
        report.loaded.append(key)
    model.load_state_dict(final, strict=False)


# ---------------------------------------------------------------------------- writing
def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested payload (what a checkpoint of it needs, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_checkpoint(path: str | Path, model: nn.Module, **extra: Any) -> Path:
    """Write ``{"format": "denseclip", "model": state_dict, **extra}`` atomically
    (:func:`atomic_write`: a temporary file in the same directory, flushed to disk, then
    renamed over ``path``); a full disk raises
    :class:`~denseclip.weights.atomic.DiskFullError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "model": unwrap_model(model).state_dict(), **extra}
    return atomic_write(path, lambda f: torch.save(payload, f), _nbytes(payload))


# ---------------------------------------------------------------------------- text tower only
TEXT_PREFIX = "guidance.text_encoder."


def load_text_weights(model: nn.Module, path: str | Path,
                      allow_torchscript: bool | None = None) -> LoadReport:
    """Load only CLIP's text side (text transformer, token and position embeddings, final
    norm and projection) from an OpenAI CLIP release or an OpenCLIP state dict, into the
    text encoder of ``model``'s guidance: for backbones that are not CLIP's own (ImageNet
    pyramids). The file's image tower is ignored, with a report line that says so.

    Every text-encoder parameter must be in the file; a projection width that differs
    from the model's ``model.backbone.embed_dim`` raises naming both."""
    path = Path(path)
    fmt, sd = detect_format(read_checkpoint(path, allow_torchscript=allow_torchscript), path)
    if fmt != "openai":
        raise CheckpointError(f"{path}: text weights come from an OpenAI CLIP release (or an "
                              f"OpenCLIP state dict with its key names); this is a {fmt} "
                              f"checkpoint")
    guidance = getattr(model, "guidance", None)
    if guidance is None:
        raise CheckpointError(f"{path}: {type(model).__name__} has no text encoder (a "
                              f"baseline without text guidance); drop the text weights")
    model_sd = {k: v for k, v in model.state_dict().items() if k.startswith(TEXT_PREFIX)}
    report = LoadReport(str(path), "openai (text tower)")
    image = [k for k in sd if k.startswith("visual.")]
    text = {}
    for key, value in sd.items():
        new = rename_key(key, OPENAI_RENAMES)
        if new in model_sd:
            text[new] = value
        elif not key.startswith("visual."):
            report.ignored.append(key)
    projection = text.get(f"{TEXT_PREFIX}text_projection")
    width = model_sd[f"{TEXT_PREFIX}text_projection"].shape[1]
    if projection is not None and projection.shape[1] != width:
        raise CheckpointError(
            f"{path}: the text tower projects to {projection.shape[1]} dimensions, the model "
            f"to {width}; set model.backbone.embed_dim: {projection.shape[1]}")
    missing = sorted(set(model_sd) - set(text))
    if missing:
        raise CheckpointError(f"{path}: the file lacks text-encoder weights ({len(missing)}): "
                              + ", ".join(missing[:20]))
    _load_fitted(model, text, model_sd, path, report)
    if image:
        report.notes.append(f"image tower ignored: {len(image)} visual.* tensors (the "
                            f"backbone's weights come from elsewhere)")
    return report
