"""Data: image decoding, datasets (ADE20K, your own folders, Cityscapes, Pascal VOC, COCO),
augmentation pipelines, samplers and loaders."""

from .io import DatasetError, load_image, load_label_map, pil_to_rgb
from .samplers import (
    InfiniteSampler,
    SeededSampler,
    ShardedSampler,
    build_test_loader,
    build_train_loader,
    collate_segmentation,
    sample_seed,
    seed_worker,
)
from .segmentation import (
    ADE20K_CLASSES_FILE,
    ADE20KDataset,
    CityscapesDataset,
    FolderDataset,
    SegmentationDataset,
    VOCDataset,
    build_segmentation_dataset,
)
from .synthetic import (
    SHAPE_CLASSES,
    SYNTHETIC_CLASSES,
    make_shapes_dataset,
    make_synthetic_dataset,
    synthetic_sample,
)
from .transforms import (
    IGNORE_INDEX,
    build_test_transforms,
    build_train_transforms,
)

__all__ = [
    "ADE20K_CLASSES_FILE",
    "ADE20KDataset",
    "CityscapesDataset",
    "DatasetError",
    "FolderDataset",
    "IGNORE_INDEX",
    "InfiniteSampler",
    "SHAPE_CLASSES",
    "SYNTHETIC_CLASSES",
    "SeededSampler",
    "SegmentationDataset",
    "ShardedSampler",
    "VOCDataset",
    "build_segmentation_dataset",
    "build_test_loader",
    "build_test_transforms",
    "build_train_loader",
    "build_train_transforms",
    "collate_segmentation",
    "load_image",
    "load_label_map",
    "make_shapes_dataset",
    "make_synthetic_dataset",
    "pil_to_rgb",
    "sample_seed",
    "seed_worker",
    "synthetic_sample",
]
