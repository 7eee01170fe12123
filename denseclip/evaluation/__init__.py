"""Evaluation: test-time inference for segmentation (whole image, sliding window,
multi-scale + flip), mIoU over a dataset, and COCO box / mask AP."""
