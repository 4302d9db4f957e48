"""k-NN (k 10, 20; T 0.07) and a linear probe (`ummae linprobe` defaults: 90 epochs, blr 0.1, batch 256,
warm-up 10) of one checkpoint from ONE frozen-feature pass (the two commands each make their own).

    python scripts/frozen_eval.py CKPT pre|random OUT.json   # digits folder at data/digits (see docs)
"""
import json, sys
import torch
torch.set_num_threads(1)
from ummae.evaluate.features import labeled_features
from ummae.evaluate.knn import knn_evaluate
from ummae.evaluate.linprobe import linear_probe
ckpt, init_random, out = sys.argv[1], sys.argv[2] == "random", sys.argv[3]
DATA = sys.argv[4] if len(sys.argv) > 4 else "data/digits"
f = labeled_features(ckpt, DATA + "/train", DATA + "/val", device="cpu", num_workers=0,
                     init_random=init_random, seed=0)
knn = knn_evaluate(f.train_features, f.train_labels, f.val_features, f.val_labels, [10, 20], 0.07,
                   num_classes=len(f.classes))
p = linear_probe(f.train_features, f.train_labels, f.val_features, f.val_labels, num_classes=len(f.classes),
                 epochs=90, blr=0.1, batch_size=256, warmup_epochs=10, seed=0)
json.dump({"checkpoint": ckpt, "init_random": init_random, "feature_dim": f.feature_dim,
           "knn": {str(k): v for k, v in knn.items()}, "linprobe_final_top1": p.final["top1"],
           "linprobe_best_top1": p.best_top1}, open(out, "w"))
