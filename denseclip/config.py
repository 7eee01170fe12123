"""Typed configuration: small dataclass sections, YAML presets and dotted overrides.

A preset is a YAML file under ``denseclip/configs``; it may name one ``_base_`` file (a path
relative to it, or a preset's name) whose values it extends (nested mappings are merged,
everything else replaced). Overrides are ``section.key=value`` strings whose value is
parsed as YAML (``optim.lr=2e-4``, ``data.crop_size=[256,256]``). Unknown keys are errors
that list the valid ones. Choice fields are typed ``Literal[...]``; a value outside the
choices is an error when the config loads, naming the key, the value and the allowed values.
Numeric fields declare their range with :func:`bounded` (e.g. ``batch_size >= 1``,
probabilities in [0, 1], ``eval_interval >= 0`` where 0 turns validation off); a value out of
range is refused when the config loads, naming the key, the value, the range and where the
value came from (the file, or the override that set it): ``override data.batch_size=0 (on
tiny.yaml): data.batch_size=0: must be >= 1``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .bounds import bounded, template_problem

PRESET_DIR = Path(__file__).parent / "configs"
# what `denseclip presets` lists, precomputed (denseclip.tools.presets writes it)
PRESET_TABLE = PRESET_DIR / "presets.json"

# CLIP's image normalisation in 0..1 units: the defaults of ``data.mean``/``data.std``.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The allowed values of each choice field (checked when a config loads).
Task = Literal["segmentation", "retinanet", "mask_rcnn"]
PosEmbed = Literal["interpolate", "crop"]
Prompting = Literal["post", "pre"]
LossAverage = Literal["all", "valid"]
DatasetKind = Literal["ade20k", "folder", "coco", "cityscapes", "voc"]
LrPolicy = Literal["poly", "step"]
EvalMode = Literal["slide", "whole"]
AmpMode = Literal["none", "bf16", "fp16"]
Precision = Literal["fp32", "bf16", "fp16", "auto", "int8"]
Kernels = Literal["fast", "reference"]
NonfiniteLoss = Literal["stop", "skip"]
DropPathMode = Literal["token", "sample"]
Activation = Literal["quick_gelu", "gelu"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]
WandbMode = Literal["auto", "online", "offline"]


# Keys renamed since: old dotted key → (new dotted key, old value → new value). Configs,
# checkpoints and saved models that use the old key still load; a mapping that gives both
# with contradicting values is an error.
RENAMED_KEYS: dict[str, tuple[str, Any]] = {
    "model.backbone.class_embedding_quirk": ("model.backbone.cls_embed_once",
                                             lambda quirk: not quirk),
}


class ConfigError(ValueError):
    """A configuration file, preset name or override is invalid. ``key`` is the dotted key
    of the offending value, where one is to blame."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class BackboneConfig:
    """The visual backbone: a CLIP visual tower (DESIGN §2), or an ImageNet feature pyramid
    (torchvision or timm) under a new attention pool."""

    # A registered backbone (denseclip.models.register_backbone; checked when the model is
    # built): "resnet" (CLIP ModifiedResNet), "vit" (CLIP ViT), "torchvision" (a ResNet or
    # Swin builder of torchvision.models, named by ``name``), "timm" (any timm model with
    # ``features_only``, named by ``name``), or one registered by other code.
    type: str = "resnet"
    # torchvision / timm only: the builder's name (``resnet50``, ``swin_t``,
    # ``convnext_tiny`` ...) and keyword arguments passed to it.
    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    # timm only: features_only ``out_indices``; empty picks the last feature map at each of
    # the strides 4, 8, 16 and 32 from the model's feature_info.
    feature_indices: list[int] = bounded(factory=list, ge=0)
    # ResNet: blocks per stage and stem width. ViT: ``layers[0]`` is the depth.
    layers: list[int] = bounded(factory=lambda: [3, 4, 6, 3], ge=1, nonempty=True)
    width: int = bounded(64, ge=1)  # ResNet base width, or ViT token width
    # attention-pool heads (ResNet, torchvision, timm) or transformer heads (ViT)
    heads: int = bounded(32, ge=1)
    # CLIP embedding dim D of the global/dense embeddings: the text encoder's output width
    # (1024 for RN50's text tower, 512 for RN101's and ViT-B/16's)
    embed_dim: int = bounded(1024, ge=1)
    # the stored position-embedding grid is resolution/stride
    input_resolution: int = bounded(512, ge=1)
    # Also return (global, dense) embeddings (attention pool, or ViT ln_post + proj).
    embeddings: bool = True
    # How the spatial position embedding meets a run-time grid of another size:
    # "interpolate" (segmentation) or "crop" to the top-left cells (official detection).
    pos_embed: PosEmbed = "interpolate"
    patch_size: int = bounded(16, ge=1)  # ViT only
    out_indices: list[int] = bounded(factory=lambda: [3, 5, 7, 11], ge=0)  # ViT only
    drop_path_rate: float = bounded(0.0, ge=0, lt=1)  # ViT only
    # ViT only: the official blocks run sequence-first and timm's drop_path draws its mask
    # over dim 0, dropping a residual branch per *token position* for the whole batch
    # ("token", official); "sample" drops it per image (the usual stochastic depth).
    drop_path_mode: DropPathMode = "token"
    # ViT only: the official code adds the class embedding a second time to the class
    # position (DESIGN §9); official ViT checkpoints need that (False, official). True adds
    # it once (the fix). Older configs' ``class_embedding_quirk`` (the inverse) still reads.
    cls_embed_once: bool = False
    # ViT only: the blocks' MLP activation, as the weights were trained: "quick_gelu"
    # (OpenAI's CLIP) or "gelu" (most OpenCLIP releases, e.g. the LAION-2B ViTs).
    act: Activation = "quick_gelu"


@dataclass
class TextConfig:
    """The CLIP text transformer with learnable context vectors (DESIGN §3)."""

    # total sequence: n_ctx contexts + SOT/name/EOT positions
    context_length: int = bounded(13, ge=1)
    n_ctx: int = bounded(8, ge=0)
    width: int = bounded(512, ge=1)
    layers: int = bounded(12, ge=1)
    heads: int = bounded(8, ge=1)
    vocab_size: int = bounded(49408, ge=1)
    act: Activation = "quick_gelu"  # as model.backbone.act, for the text tower
    # Prompt templates, e.g. ["a photo of a {}.", "a sketch of a {}."]: each class text is
    # put into each (one ``{}`` apiece), embedded behind the learned contexts, and the class
    # embedding is their ensemble. Empty (official): the class text alone.
    templates: list[str] = field(default_factory=list,
                                 metadata={"check": template_problem})


@dataclass
class GuidanceConfig:
    """Text guidance: context decoder, gamma, score maps and their losses (DESIGN §1, §4)."""

    enabled: bool = True  # False builds the plain CLIP baseline (no text at all)
    # "post" (official) or "pre" (paper §3.3, image-conditioned contexts)
    prompting: Prompting = "post"
    decoder_width: int = bounded(256, ge=1)
    decoder_heads: int = bounded(4, ge=1)
    decoder_layers: int = bounded(3, ge=0)
    decoder_dropout: float = bounded(0.1, ge=0, lt=1)
    gamma_init: float = bounded(1e-4)
    tau: float = bounded(0.07, gt=0)
    # backbone level that receives the score map (3 = x4; 2 for ViT)
    score_level: int = bounded(3, ge=0, le=3)
    aux_loss_weight: float = bounded(0.4, ge=0)  # identity-head loss on score/tau


@dataclass
class DetectionConfig:
    """Detector settings (RetinaNet / Mask R-CNN on torchvision, DESIGN §5–6)."""

    min_size: int = bounded(800, ge=1)  # input scale (1333, 800), keep ratio
    max_size: int = bounded(1333, ge=1)
    size_divisor: int = bounded(32, ge=1)  # batches are padded to a multiple of this
    seg_loss: bool = True  # auxiliary box-mask loss on the score map (DenseCLIP only)
    seg_loss_weight: float = bounded(1.0, ge=0)
    # Official recipe: RetinaNet's classification bias keeps PyTorch's default init
    # (False); True applies the usual focal-loss prior (torchvision's default).
    focal_prior_init: bool = False
    # Official recipe: every BatchNorm of the CLIP ResNet trains (batch statistics).
    train_bn: bool = True
    score_thresh: float = bounded(0.05, ge=0, le=1)
    detections_per_img: int = bounded(100, ge=1)
    # Mask R-CNN only: RPN proposals kept per image before/after NMS as (training, test),
    # and RoIs sampled per image for the box head in training (mmdet 2.17's settings).
    rpn_pre_nms_top_n: list[int] = bounded(factory=lambda: [2000, 1000], ge=1, length=2)
    rpn_post_nms_top_n: list[int] = bounded(factory=lambda: [1000, 1000], ge=1, length=2)
    box_batch_size_per_image: int = bounded(512, ge=1)


@dataclass
class ModelConfig:
    # "segmentation", "retinanet" or "mask_rcnn"
    task: Task = "segmentation"
    # Zero-shot segmentation from CLIP's own weights (MaskCLIP, see
    # denseclip.models.zeroshot): no neck, head or training; the classes' prompt-ensemble
    # embeddings score CLIP's dense embeddings. Needs task: segmentation.
    zeroshot: bool = False
    classes: str = "ade20k"  # a bundled list (ade20k, coco, cityscapes, voc) or a file
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    neck_channels: int = bounded(256, ge=1)
    # Segmentation head: a registered name (denseclip.models.register_head; checked when
    # the model is built), "semantic_fpn" by default. The detectors have their own heads.
    head: str = "semantic_fpn"
    head_channels: int = bounded(256, ge=1)
    head_dropout: float = bounded(0.1, ge=0, lt=1)
    ignore_index: int = bounded(255, ge=0, le=255)  # label PNGs hold 0..255
    # Cross-entropy mean over "all" pixels, ignored ones included (mmseg 0.19, official),
    # or over "valid" pixels only.
    loss_average: LossAverage = "all"
    align_corners: bool = False
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    pretrained: str | None = None  # CLIP weights loaded by build_model, if given


@dataclass
class DataConfig:
    dataset: DatasetKind = "ade20k"  # "ade20k", "folder", "coco", "cityscapes" or "voc"
    root: str = "data/ade/ADEChallengeData2016"
    # ADE20K/folder: images/<split>, annotations/<split>; COCO: <split>/ images with
    # annotations/instances_<split>.json.
    train_split: str = "training"
    val_split: str = "validation"
    reduce_zero_label: bool = True  # label 0 -> ignore, 1..K -> 0..K-1
    img_suffix: str = ".jpg"
    seg_suffix: str = ".png"
    scale: list[int] = bounded(factory=lambda: [2048, 512], ge=1, length=2)  # (long, short) bound
    ratio_range: list[float] = bounded(factory=lambda: [0.5, 2.0], gt=0, length=2,
                                       ascending=True)
    crop_size: list[int] = bounded(factory=lambda: [512, 512], ge=1, length=2)  # (H, W)
    cat_max_ratio: float = bounded(0.75, gt=0, le=1)
    flip_prob: float = bounded(0.5, ge=0, le=1)
    photometric: bool = True
    test_scale: list[int] = bounded(factory=lambda: [2048, 512], ge=1, length=2)
    mean: list[float] = bounded(factory=lambda: list(CLIP_MEAN), ge=0, le=1, length=3)  # 0..1 units
    std: list[float] = bounded(factory=lambda: list(CLIP_STD), gt=0, le=1, length=3)
    batch_size: int = bounded(4, ge=1)  # per process
    num_workers: int = bounded(4, ge=0)
    # Detection training: batches hold only landscape or only portrait images (mmdet's
    # group sampler, seeded per epoch); false draws plain shuffled passes.
    group_by_aspect_ratio: bool = True
    # Images and label maps whose header declares more pixels (width x height) are refused
    # before decoding; None: $DENSECLIP_MAX_IMAGE_PIXELS, else 89_478_485 (Pillow's limit).
    max_image_pixels: int | None = bounded(None, ge=1)
    # > 0: hold this fraction of data.train_split out of training (round(fraction x N),
    # at least 1, drawn with the run's seed: the same images every run); a data.val_split
    # equal to data.train_split then validates on exactly those (denseclip.data.holdout).
    holdout_fraction: float = bounded(0.0, ge=0, lt=1)


@dataclass
class KeyMultipliers:
    """Learning-rate and weight-decay multipliers of one ``optim.custom_keys`` entry."""

    lr_mult: float = bounded(1.0, ge=0)
    decay_mult: float = bounded(1.0, ge=0)


@dataclass
class OptimConfig:
    """AdamW and mmcv's parameter-wise settings (DESIGN §7, §9)."""

    lr: float = bounded(1e-4, gt=0)
    weight_decay: float = bounded(1e-4, ge=0)
    betas: list[float] = bounded(factory=lambda: [0.9, 0.999], ge=0, lt=1, length=2)
    # mmcv's ``paramwise_cfg.custom_keys``: a parameter takes the multipliers of the first
    # key, longest first (alphabetical among equal lengths), that is a substring of its
    # *official* name (this package's name mapped back through the release's rename
    # table); a parameter matching no key keeps 1 and 1. The presets state the official
    # keys: backbone lr ×0.1, text_encoder lr ×0, norm decay ×0.
    custom_keys: dict[str, KeyMultipliers] = field(default_factory=dict)
    # Official runs keep the text encoder trainable at lr multiplier 0, so mmcv's absolute
    # poly min_lr (1e-6) trains it slightly and its gradients count in gradient clipping.
    # True freezes it (requires_grad_(False)): no drift, and faster.
    freeze_text_encoder: bool = False
    grad_clip: float | None = bounded(None, gt=0)  # max gradient norm, or None
    accumulate: int = bounded(1, ge=1)  # gradient-accumulation steps per optimiser step


@dataclass
class ScheduleConfig:
    policy: LrPolicy = "poly"  # "poly" (segmentation) or "step" (detection)
    # Epoch-based runs (max_epochs > 0) convert epochs to iterations from the dataset size;
    # ``steps`` are epochs at which a step policy multiplies the lr by ``step_gamma``.
    max_epochs: int = bounded(0, ge=0)  # 0: iteration-based (max_iters)
    steps: list[int] = bounded(factory=list, ge=1, ascending=True)
    step_gamma: float = bounded(0.1, gt=0)
    max_iters: int = bounded(80000, ge=1)
    warmup_iters: int = bounded(1500, ge=0)  # 0: no warm-up
    warmup_ratio: float = bounded(1e-6, ge=0, le=1)
    power: float = bounded(0.9, ge=0)
    min_lr: float = bounded(1e-6, ge=0)
    checkpoint_interval: int = bounded(8000, ge=1)  # and at the end
    eval_interval: int = bounded(8000, ge=0)  # 0: no validation during training
    log_interval: int = bounded(50, ge=1)
    # Keep only the newest N ``iter_*.pth`` of the work dir (0: keep all); ``best.pth`` and
    # ``latest.pth`` are never deleted. May change on resume.
    keep_checkpoints: int = bounded(0, ge=0)
    # At the end of a completed run, write ``work_dir/model/`` (save_pretrained: weights of
    # ``best.pth`` when evaluation ran, else the final ones, config, classes, model card).
    save_model: bool = True


@dataclass
class EvalConfig:
    mode: EvalMode = "slide"  # "slide" or "whole"
    crop_size: list[int] = bounded(factory=lambda: [512, 512], ge=1, length=2)
    stride: list[int] = bounded(factory=lambda: [341, 341], ge=1, length=2)
    aug_ratios: list[float] = bounded(factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], gt=0,
                                      nonempty=True)
    aug_flip: bool = True


@dataclass
class LogConfig:
    """Where the metrics stream goes besides ``metrics.jsonl`` (denseclip.engine.trackers):
    each backend also records the resolved config and the final model card."""

    # "tensorboard" (work_dir/tb), "mlflow" and "wandb" (extras denseclip[mlflow] / [wandb])
    backends: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    # MLflow tracking URI; None: a file store in work_dir/mlruns
    mlflow_uri: str | None = None
    mlflow_experiment: str = "denseclip"
    wandb_project: str = "denseclip"
    # "auto": $WANDB_MODE if set, else online when an API key is configured
    # ($WANDB_API_KEY or ~/.netrc), else offline (files in work_dir/wandb)
    wandb_mode: WandbMode = "auto"


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    amp: AmpMode = "none"  # training autocast: "none", "bf16" or "fp16" (+ loss scaling)
    # Inference precision (predict, demo, the Predictor): "auto" is the fastest one the
    # hardware runs natively (see denseclip.runtime); `denseclip test` uses fp32 unless
    # told otherwise, so reproduced numbers are reproducible.
    precision: Precision = "auto"
    # "fast": channels_last, fused attention, BatchNorm folded at inference, the text
    # prefix shared by all classes; "reference": the computation as written (equal up to
    # floating-point rounding). Training and inference alike.
    kernels: Kernels = "fast"
    # Training forward through torch.compile (off by default: compilation takes minutes
    # and pays only in long runs; `denseclip bench --compile` measures both). Any backend
    # torch.compile accepts: "inductor" (needs a C++ compiler on CPU), "aot_eager", ...
    compile: bool = False
    compile_backend: str = "inductor"
    nonfinite_loss: NonfiniteLoss = "stop"  # "stop" or "skip"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_presets() -> list[str]:
    """Names of the bundled presets (files under ``denseclip/configs``), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"{path}: circular _base_ chain {[str(p) for p in seen]}")
    try:
        data = _upgrade_keys(_read_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.key) from None
    base = data.pop("_base_", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if not base_path.is_file():  # a preset's name (with or without .yaml) also works
        preset = PRESET_DIR / (base if str(base).endswith(".yaml") else f"{base}.yaml")
        if not preset.is_file():
            raise ConfigError(f"{path}: _base_ {base!r} is neither a file ({base_path}) nor "
                              f"a preset (see `denseclip presets`)")
        base_path = preset
    return _merge(_load_raw(base_path, seen + (path,)), data)


def _resolve_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path.resolve()
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"unknown preset {str(name_or_path)!r}; available presets: "
        + ", ".join(available_presets())
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        # Equal and of the same type: True must not pass for a literal 1.
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{where}: {value!r} is not one of {allowed}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, item = typing.get_args(tp)
        return {_coerce(k, key_type, where): _coerce(v, item, f"{where}.{k}")
                for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-4" (no dot) as a string
        except ValueError:
            pass
    if tp is Any:
        return value
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:  # the key lets load_config blame the override that set it
        prefix = f"{where}." if where else ""
        close = [f"{prefix}{m[0]}" for u in unknown
                 if (m := difflib.get_close_matches(u, names, n=1, cutoff=0.6))]
        guess = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}{guess} "
                          f"(valid keys: {', '.join(names)})", prefix + unknown[0])
    kwargs = {}
    for k, v in data.items():
        key = f"{where}.{k}" if where else k
        try:
            kwargs[k] = _coerce(v, hints[k], key)
        except ConfigError as e:
            raise ConfigError(str(e), e.key or key) from None
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):  # defaults too: an override may not touch them
        bounds = f.metadata.get("bounds")
        value = getattr(obj, f.name)
        problem = bounds.problem(value) if bounds is not None else None
        check = f.metadata.get("check")
        problem = problem or (check(value) if check is not None else None)
        if problem:
            key = f"{where}.{f.name}" if where else f.name
            raise ConfigError(f"{key}={_show(value)}: {problem}", key)
    return obj


def _show(value: Any) -> str:
    """A value as a user writes it in an override (``[0, 0]``, ``0.5``, ``nan``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _upgrade_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (one file's or one saved config's mapping) with the old keys of
    :data:`RENAMED_KEYS` replaced by the new ones, in place; both given with contradicting
    values, or an old value of the wrong type, raise :class:`ConfigError`."""
    for old, (new, convert) in RENAMED_KEYS.items():
        *parents, old_name = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_name not in node:
            continue
        value = _coerce(node.pop(old_name), bool, old)
        new_name = new.rsplit(".", 1)[1]
        mapped = convert(value)
        if new_name in node and node[new_name] != mapped:
            raise ConfigError(
                f"{old}={_show(value)} contradicts {new}={_show(node[new_name])} "
                f"({old_name} is the old name of {new_name}, inverted); give only "
                f"{new}", new)
        node[new_name] = mapped
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, _, text = override.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from None
    _upgrade_keys(data)  # an old key already there must not contradict the override
    if key.strip() in RENAMED_KEYS:  # an old key: set the new one (the override wins)
        new, convert = RENAMED_KEYS[key.strip()]
        if not isinstance(value, bool):
            raise ConfigError(f"override {override}: {key.strip()}: expected bool, got "
                              f"{value!r}", key.strip())
        key, value = new, convert(value)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build a validated :class:`Config` from a plain (e.g. saved) dictionary (keys renamed
    since, :data:`RENAMED_KEYS`, are read under their new names)."""
    try:
        return _build(Config, _upgrade_keys(copy.deepcopy(data)), "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}", e.key) from None


def load_config(name_or_path: str | Path, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a preset by name (see :func:`available_presets`) or a YAML file, then apply
    dotted ``key=value`` overrides."""
    path = _resolve_path(name_or_path)
    data = _load_raw(path)
    data.setdefault("name", path.stem)
    overrides = list(overrides)
    for override in overrides:
        _apply_override(data, override)
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{_source(path, overrides, e.key)}: {e}", e.key) from None
    # a class file named relative to a config file (a saved model's classes.txt) is found
    # next to it when the working directory has none
    classes = Path(cfg.model.classes)
    if not classes.is_absolute() and not classes.exists() and (path.parent / classes).is_file():
        cfg.model.classes = str(path.parent / classes)
    return cfg


def _source(path: Path, overrides: list[str], key: str | None) -> str:
    """Where a bad value came from: the last override that set ``key`` (or a section or
    item of it), else the config file."""
    for override in reversed(overrides):
        name = override.partition("=")[0].strip()
        if key is not None and (key == name or key.startswith((f"{name}.", f"{name}["))
                                or name.startswith(f"{key}.")):
            return f"override {override} (on {path})"
    return str(path)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
