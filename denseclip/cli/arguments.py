"""Every command's help and arguments, importable without PyTorch.

``denseclip --help``, ``denseclip CMD --help`` and the light commands (``presets``,
``download --list``, ``plot``) build their parser from this module alone; a command's
``run`` function lives in its own module (:data:`denseclip.cli.COMMANDS` names it), which
is imported only when that command runs. So a new option goes here, and what it does goes
to the command's module.
"""

from __future__ import annotations

import argparse
import typing

from ..config import Precision, Task
from ..weights import hub

PRECISIONS = typing.get_args(Precision)  # denseclip.runtime.PRECISIONS, without torch
TASKS = typing.get_args(Task)
METRICS_LOG = "metrics.jsonl"  # what a training run logs to, in its work dir
DEMO_REQUEST_TIMEOUT = 20.0  # denseclip.tools.demo.REQUEST_TIMEOUT
DEMO_MAX_CONNECTIONS = 8  # denseclip.tools.demo.MAX_CONNECTIONS

TRAIN_HELP = "train a model (single process, or many under torchrun)"
TRAIN_EPILOG = ("SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 stop training after the current iteration "
                "with a checkpoint; the exit status is then 128 + the signal's number (143, "
                "130, 138) and --resume continues exactly where it stopped. A work dir takes "
                "one training at a time.")
FINETUNE_HELP = ("train on your own data folder with the official recipe fitted to it "
                 "(layout, task, classes and splits read from the folder)")
TEST_HELP = "evaluate a checkpoint on the validation split"
QUICKSTART_HELP = "generate synthetic data, train a tiny DenseCLIP on CPU, evaluate"
PREDICT_HELP = "segment or detect images: overlays, label maps, heatmaps, JSON"
EXPORT_HELP = ("export a model: ONNX (segmentation, text features baked in) or a safetensors "
               "directory")
EMBED_CLASSES_HELP = ("text embeddings of a class list (.npy) for a model exported with "
                      "--dynamic-classes, and the class names beside them")
DEMO_HELP = "serve a local web page to try a model on your own images"
FLOPS_HELP = "count parameters and multiply-adds (GMACs) of a config's model"
PRESETS_HELP = ("list the bundled config presets: task, backbone, classes, parameters, what "
                "each is for and whether released weights exist")
BENCH_HELP = ("time eval forward, training step and slide inference in fp32 and in the fast "
              "mode")
PLOT_HELP = ("draw the loss, learning rate and validation metrics of a training run (PNG "
             "files)")
DOWNLOAD_HELP = "download named weights (CLIP backbones, DenseCLIP releases) into the cache"


# ---------------------------------------------------------------------- shared arguments
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The config (preset name or YAML file) and its dotted overrides."""
    parser.add_argument("config", help="preset name (see `denseclip presets`) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.crop_size=[256,256]")


MODEL_HELP = ("the model: a work dir of `denseclip train` (its newest iter_N.pth and "
              "config.yaml), one of its checkpoints alone, a saved model directory "
              "(save_pretrained), or a preset name / YAML file followed by CHECKPOINT")


def set_model_epilog(parser: argparse.ArgumentParser, command: str, rest: str = "") -> None:
    """The ways to name a model, as examples at the end of ``denseclip COMMAND --help``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    tail = f" {rest}" if rest else ""
    parser.epilog = "\n".join([
        "the model, three ways:",
        f"  denseclip {command} work_dirs/quickstart{tail}",
        "      a work dir: its newest checkpoint, config.yaml and trained classes",
        f"  denseclip {command} work_dirs/quickstart/iter_150.pth{tail}",
        "      a checkpoint of `denseclip train` alone: it stores its config and classes",
        f"  denseclip {command} PRESET_OR_YAML CHECKPOINT{tail}",
        "      a config, then weights (official releases, weights names, 'pretrained')",
        *([parser.epilog] if parser.epilog else [])])


def add_model_arguments(parser: argparse.ArgumentParser, weights_help: str,
                        command: str) -> None:
    """``MODEL [CHECKPOINT] [key=value ...]``: see :func:`model_config`. Positionals may
    also follow options (the CLI hands them to ``overrides``)."""
    set_model_epilog(parser, command)
    parser.add_argument("config", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("overrides", nargs="*", metavar="[CHECKPOINT] key=value",
                        help=f"CHECKPOINT, after a preset or YAML file: {weights_help}; then "
                             f"config overrides, e.g. data.root=DIR")
    parser.set_defaults(_positionals_anywhere=True)


def _positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "positive whole number"  # what argparse's error message says


def add_max_pixels_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-image-pixels N``: the ``data.max_image_pixels`` override."""
    parser.add_argument("--max-image-pixels", type=_positive_int, metavar="N",
                        help="refuse images (and label maps) with more pixels, width x height, "
                             "before decoding them (default: data.max_image_pixels, else "
                             "$DENSECLIP_MAX_IMAGE_PIXELS, else 89478485)")


def add_class_arguments(parser: argparse.ArgumentParser, help_names: str) -> None:
    """``--classes`` / ``--classes-file`` (mutually exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--classes", metavar="NAMES", help=help_names)
    group.add_argument("--classes-file", metavar="FILE",
                       help="open-vocabulary classes, one 'name' or 'name: text to embed' "
                            "per line")


def add_precision_argument(parser: argparse.ArgumentParser, default: str | None = None,
                           note: str = "") -> None:
    """``--precision fp32|bf16|fp16|auto``."""
    what = f"default {default}" if default else "default: the config's precision, auto"
    parser.add_argument("--precision", default=default, choices=PRECISIONS,
                        help=f"inference precision; auto = the fastest one this hardware runs "
                             f"natively ({what}){note}")


def add_int8_arguments(parser: argparse.ArgumentParser) -> None:
    """``--calibration DIR`` and ``--calibration-images N`` (for ``--precision int8``)."""
    parser.add_argument("--calibration", metavar="DIR",
                        help="--precision int8: calibrate on the images in this folder "
                             "(default: the config's training split)")
    parser.add_argument("--calibration-images", type=int, default=32, metavar="N",
                        help="--precision int8: calibration images, evenly spaced "
                             "(default 32)")


# ---------------------------------------------------------------------- train, test, quickstart
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip train``."""
    parser.epilog = TRAIN_EPILOG
    add_config_arguments(parser)
    parser.add_argument("--work-dir", help="checkpoints and logs (default: work_dirs/<config>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the work dir; overrides "
                             "may change only the schedule's length and intervals, "
                             "evaluation, logging and data.num_workers")
    parser.add_argument("--load-from", metavar="CKPT",
                        help="initialise weights only: OpenAI CLIP (RN50.pt, or the name "
                             "RN50), an ImageNet torchvision/timm state dict, a release or "
                             "our checkpoint")
    parser.add_argument("--text-weights", metavar="CKPT",
                        help="load only CLIP's text tower from this OpenAI CLIP file (for "
                             "ImageNet backbones; its image tower is ignored)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip finetune``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n".join([
        "DATA layouts (each with classes.txt: one 'name' or 'name: description' per line):",
        "  folder  images/{training,validation}/*.jpg|png, annotations/{...}/*.png",
        "  COCO    train/, val/, annotations/instances_{train,val}.json (or train2017...)",
        "  also the Cityscapes and Pascal VOC release layouts (bundled classes)",
        "without a validation split, a seeded 10 % of the training images is held out",
        "", TRAIN_EPILOG])
    parser.add_argument("data", metavar="DATA", help="the data folder")
    parser.add_argument("overrides", nargs="*", metavar="[PRESET] key=value",
                        help="PRESET: a preset name or YAML file of the data's task "
                             "(default: denseclip_fpn_res50_512x512_80k for label maps, "
                             "retinanet_denseclip_r50_fpn_1x_coco for COCO boxes, "
                             "mask_rcnn_denseclip_r50_fpn_1x_coco for COCO masks); then "
                             "config overrides, applied last")
    parser.set_defaults(_positionals_anywhere=True)
    parser.add_argument("--work-dir", required=True,
                        help="checkpoints, logs, best.pth and the trained model/")
    parser.add_argument("--load-from", metavar="W", default="pretrained",
                        help="initial weights: 'pretrained' (default: the CLIP release of "
                             "the preset's backbone, e.g. RN50), 'none' (random), or any "
                             "file or name `denseclip train --load-from` takes")
    parser.add_argument("--epochs", type=_positive_int, metavar="N",
                        help="train N passes over the training images: ceil(N x images / "
                             "effective batch) iterations (default: the preset's schedule)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_test_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip test``."""
    add_model_arguments(parser, "our checkpoint, a state dict, an official release, a "
                                "weights name (`denseclip download --list`) or 'pretrained'",
                        "test")
    parser.add_argument("--aug-test", action="store_true",
                        help="multi-scale + flip test-time augmentation")
    parser.add_argument("--out-dir", help="write predicted label PNGs and metrics.json here")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    add_precision_argument(parser, "fp32", note=", so that reproduced numbers are "
                                               "reproducible")
    parser.add_argument("--compare-precision", metavar="PRECISION", choices=PRECISIONS,
                        help="evaluate again in this precision and print how far it moves "
                             "each metric")
    add_int8_arguments(parser)
    add_max_pixels_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip quickstart``."""
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the quickstart preset")
    parser.add_argument("--work-dir", default="work_dirs/quickstart")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------- predict, export, demo
def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip predict``."""
    parser.add_argument("config", metavar="MODEL", help=MODEL_HELP)
    set_model_epilog(parser, "predict", "photo.jpg --out out/")
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="after a preset or YAML file, first its CHECKPOINT: our "
                             "checkpoint, a state dict, an official release, a weights name "
                             "(`denseclip download --list`) or 'pretrained' (the preset's "
                             "release); 'none' for random weights (meaningless output, for "
                             "trying out). Then image files, video files (.mp4 .avi .mov "
                             ".mkv .webm .m4v .mpg .mpeg), folders (searched recursively for "
                             "images) or glob patterns (quote them); section.key=value items "
                             "are config overrides")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="images and sliding windows per forward call; video frames "
                             "read and preprocessed together (default 4)")
    parser.add_argument("--source", metavar="SOURCE",
                        help="also predict a live source: a camera index (0), a stream URL "
                             "(rtsp://, http(s)://, ...) or a video file; writes "
                             "<name>_overlay.mp4 like a video input")
    parser.add_argument("--save-frames", action="store_true",
                        help="videos: also write <stem>_frames/<index>_labels.png "
                             "(detection: <index>.json) for every frame")
    parser.add_argument("--max-frames", type=_positive_int, metavar="N",
                        help="videos and --source: read at most N frames of each")
    add_class_arguments(parser, "open-vocabulary classes, comma-separated: 'cat,dog,grass'")
    parser.add_argument("--heatmaps", action="store_true",
                        help="also write <stem>_heatmap_<class>.png per open class (or per "
                             "trained class present, without open classes)")
    add_precision_argument(parser)
    add_int8_arguments(parser)
    parser.add_argument("--score-thr", type=float, default=0.3,
                        help="detection: draw and list detections scoring at least this")
    add_max_pixels_argument(parser)
    parser.set_defaults(overrides=[], _positionals_anywhere=True)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip export``."""
    add_model_arguments(parser, "weights to export (a file, a weights name or "
                                "'pretrained'); 'none' for random weights", "export")
    parser.add_argument("--format", default="onnx", choices=["onnx", "safetensors"],
                        help="onnx (default), or safetensors: a directory with "
                             "model.safetensors, config.yaml, classes.txt and a model card")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="the .onnx file, or the directory for safetensors")
    parser.add_argument("--metrics", metavar="FILE",
                        help="safetensors: a metrics.json of `denseclip test` for the model card")
    add_class_arguments(parser, "also output score maps for these comma-separated classes")
    add_precision_argument(parser, "fp32", note="; the file stores fp32 or fp16 (auto "
                                                "means fp32 for a portable file; bf16 is "
                                                "refused; int8: quantised QDQ graph)")
    add_int8_arguments(parser)
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--dynamic-classes", action="store_true",
                      help="onnx: take the classes as an input, class_embeddings (K x D) "
                           "from `denseclip embed-classes`, instead of baking them in; "
                           "outputs logits and open_scores (post-model prompting only)")
    what.add_argument("--text-encoder", action="store_true",
                      help="onnx: export the text encoder alone, learned contexts baked in: "
                           "tokens (K x L, CLIP BPE ids) -> class_embeddings (K x D)")


def add_embed_classes_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip embed-classes``."""
    add_model_arguments(parser, "weights (a file, a weights name or 'pretrained'); 'none' "
                                "for random weights", "embed-classes")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--classes", metavar="NAMES", help="classes, comma-separated: 'cat,dog'")
    group.add_argument("--classes-file", metavar="FILE",
                       help="classes, one 'name' or 'name: text to embed' per line")
    parser.add_argument("--out", required=True, metavar="FILE.npy",
                        help="the embeddings (K x D float32, .npy); the class names are "
                             "written beside it with .txt")
    add_precision_argument(parser, "fp32", note="; fp32 is what an fp32 ONNX export computes in")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip demo``."""
    add_model_arguments(parser, "weights to serve (a file, a weights name or 'pretrained'); "
                                "'none' for random weights", "demo")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_precision_argument(parser)
    parser.add_argument("--max-side", type=int, default=1024,
                        help="uploads larger than this (pixels, longer side) are reduced")
    add_max_pixels_argument(parser)
    parser.add_argument("--timeout", type=float, default=DEMO_REQUEST_TIMEOUT,
                        metavar="SECONDS",
                        help="drop a connection whose client sends nothing for this long "
                             f"(default {DEMO_REQUEST_TIMEOUT:g})")
    parser.add_argument("--max-connections", type=int, default=DEMO_MAX_CONNECTIONS,
                        metavar="N",
                        help="connections served at once; more are answered 503 "
                             f"(default {DEMO_MAX_CONNECTIONS})")


# ---------------------------------------------------------------------- the other commands
def add_flops_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip flops``."""
    add_config_arguments(parser)
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="input size (default: the config's data.crop_size; for detection, "
                             "where it is the raw tensor, not resized: 1280 800, or the padded "
                             "model.detection max_size x min_size when the backbone's stored "
                             "position grid is smaller)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="meta",
                        help="device to count on (default: meta, shapes only, no arithmetic)")
    parser.add_argument("--transposed-conv", choices=("input", "output"), default=None,
                        help="count a transposed convolution per input position (correct) or "
                             "per output position (fvcore < 2021, as the official detection "
                             "figures did); default: input for segmentation, output for "
                             "detection")


def add_presets_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip presets``."""
    parser.add_argument("--task", choices=TASKS, help="only the presets of this task")
    parser.add_argument("--json", action="store_true",
                        help="print a JSON list, one object per preset")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip bench``."""
    add_config_arguments(parser)
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="input size (default: data.crop_size for segmentation, "
                             "model.detection min_size x max_size for detection)")
    parser.add_argument("--batch", type=int, default=2, help="images per call (default 2)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda if available, else cpu)")
    add_precision_argument(parser, note="; the precision of the fast mode (fp32 and "
                                        "fp32_fast always run in fp32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per measurement; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls before each measurement (default 1)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure the fast mode under torch.compile (compile time "
                             "reported separately)")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="skip the training steps")
    parser.add_argument("--no-slide", dest="slide", action="store_false",
                        help="skip the sliding-window inference (segmentation)")
    parser.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                        help="skip the data-pipeline throughput")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the int8 mode (segmentation on CPUs: ONNX Runtime, "
                             "quantised and calibrated first)")
    parser.add_argument("--pipeline-images", type=int, default=16,
                        help="generated images the data pipeline is timed on (default 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip plot``."""
    parser.add_argument("work_dir", metavar="WORK_DIR",
                        help=f"a training work dir holding {METRICS_LOG} (or that file itself)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where the PNGs go (default: WORK_DIR/plots)")


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denseclip download``."""
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="registered names (see --list) or http(s) URLs to download")
    parser.add_argument("--list", action="store_true",
                        help="list the registered weights: URL, size, checksum and whether "
                             "they are cached")
    parser.add_argument("--json", action="store_true",
                        help="with --list: print a JSON list, one object per entry")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help=f"cache directory (default: ${hub.ENV_CACHE}, else "
                             f"{hub.DEFAULT_CACHE})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
