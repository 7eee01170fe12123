"""DenseCLIP models: the CLIP towers, the text guidance shared by every task (with the one
fusion step, :meth:`GuidedModel.forward_features`), the segmentor and the detectors, and their
builders (which one a config needs is its task's choice: :func:`denseclip.tasks.build_model`).
New backbones and segmentation heads are registered with :func:`register_backbone` and
:func:`register_head` (see :mod:`.registry`)."""

from .build import build_backbone, build_detector, build_guidance, build_segmentor
from .clip_resnet import CLIPResNet
from .clip_vit import CLIPViT
from .detection import DETECTORS, CLIPMaskRCNN, CLIPRetinaNet
from .guidance import (
    ContextDecoder,
    DenseFeatures,
    GuidanceOutput,
    GuidedModel,
    PromptGenerator,
    TextGuidance,
    fuse,
)
from .registry import (
    BACKBONES,
    HEADS,
    Backbone,
    Registry,
    register_backbone,
    register_head,
)
from .segmentor import Segmentor
from .text_encoder import CLIPTextEncoder, build_text_encoder, tokenize
from .zeroshot import PROMPT_TEMPLATES, ZeroShotSegmentor, build_zeroshot_segmentor

__all__ = [
    "BACKBONES", "DETECTORS", "HEADS", "Backbone", "CLIPMaskRCNN", "CLIPResNet", "CLIPRetinaNet",
    "CLIPTextEncoder", "CLIPViT", "ContextDecoder", "DenseFeatures", "GuidanceOutput",
    "GuidedModel", "PROMPT_TEMPLATES", "PromptGenerator", "Registry", "Segmentor",
    "TextGuidance", "ZeroShotSegmentor", "build_backbone", "build_detector", "build_guidance",
    "build_segmentor", "build_text_encoder", "build_zeroshot_segmentor", "fuse",
    "register_backbone", "register_head", "tokenize",
]
