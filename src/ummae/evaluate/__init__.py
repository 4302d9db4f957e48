"""How good are the frozen features of a pre-trained encoder? k-NN and linear probing.

Both evaluations share one pass over the labeled images (`features.py`): the encoder of a
pre-training checkpoint, frozen, turns every image (evaluation transform, no augmentation) into
one vector by global average pooling of its final features. The two evaluations then work on
those cached vectors only, so they take tensors and know nothing about images or checkpoints:

    knn.py       weighted k-nearest-neighbour vote on cosine similarity (DINO's protocol)
    linprobe.py  BatchNorm (no affine) + linear head trained with SGD (MAE's protocol)

`ummae knn` and `ummae linprobe` are the command-line front ends. Two baselines any pre-training
has to beat come with them: `--init-random` (the same architecture randomly initialised) and
`--raw-pixels` (`raw_pixel_features`: the flattened input pixels, same images, split and
transform). `few_label.py` repeats either evaluation on small stratified subsets of the training
labels (`--labels-per-class N --draws D`), reusing the one feature pass.
"""

from __future__ import annotations

from .features import (LabeledFeatures, eval_datasets, extract_features, flatten_pixels, labeled_features,
                       load_frozen_backbone, pool_features, raw_pixel_features)
from .few_label import FewLabelDraw, draw_generator, few_label, per_class_subset, summarize
from .knn import knn_accuracy, knn_evaluate, knn_scores
from .linprobe import LinearProbeHead, ProbeResult, linear_probe

__all__ = [
    "FewLabelDraw",
    "LabeledFeatures",
    "LinearProbeHead",
    "ProbeResult",
    "draw_generator",
    "eval_datasets",
    "extract_features",
    "few_label",
    "flatten_pixels",
    "knn_accuracy",
    "knn_evaluate",
    "knn_scores",
    "labeled_features",
    "linear_probe",
    "load_frozen_backbone",
    "per_class_subset",
    "pool_features",
    "raw_pixel_features",
    "summarize",
]
