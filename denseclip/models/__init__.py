"""DenseCLIP model components."""

from .build import build_backbone, build_guidance, build_model, build_segmentor
from .clip_resnet import CLIPResNet
from .clip_vit import CLIPViT
from .guidance import ContextDecoder, GuidanceOutput, PromptGenerator, TextGuidance
from .segmentor import Segmentor
from .text_encoder import CLIPTextEncoder, tokenize

__all__ = [
    "CLIPResNet", "CLIPViT", "CLIPTextEncoder", "ContextDecoder", "GuidanceOutput",
    "PromptGenerator", "Segmentor", "TextGuidance", "build_backbone", "build_guidance",
    "build_model", "build_segmentor", "tokenize",
]
