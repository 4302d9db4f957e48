"""How good are the frozen features of a pre-trained encoder? k-NN and linear probing.

Both evaluations share one pass over the labeled images (`features.py`): the encoder of a
pre-training checkpoint, frozen, turns every image (evaluation transform, no augmentation) into
one vector by global average pooling of its final features. The two evaluations then work on
those cached vectors only, so they take tensors and know nothing about images or checkpoints:

    knn.py       weighted k-nearest-neighbour vote on cosine similarity (DINO's protocol)
    linprobe.py  BatchNorm (no affine) + linear head trained with SGD (MAE's protocol)

`ummae knn` and `ummae linprobe` are the command-line front ends; `--init-random` evaluates the
same architecture randomly initialised, the baseline any pre-training has to beat.
"""

from __future__ import annotations

from .features import (LabeledFeatures, eval_datasets, extract_features, labeled_features,
                       load_frozen_backbone, pool_features)
from .knn import knn_accuracy, knn_evaluate, knn_scores
from .linprobe import LinearProbeHead, ProbeResult, linear_probe

__all__ = [
    "LabeledFeatures",
    "LinearProbeHead",
    "ProbeResult",
    "eval_datasets",
    "extract_features",
    "knn_accuracy",
    "knn_evaluate",
    "knn_scores",
    "labeled_features",
    "linear_probe",
    "load_frozen_backbone",
    "pool_features",
]
