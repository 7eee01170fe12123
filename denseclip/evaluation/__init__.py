"""Evaluation: test-time inference for segmentation (whole image, sliding window,
multi-scale + flip), mIoU over a dataset, COCO box / mask AP (overall and per category), and
figures of the results and of training logs (:mod:`.plots`, needs matplotlib)."""
