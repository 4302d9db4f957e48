"""timm's model API on ummae's registered models: the classifier interface, output_fmt, FX
tracing, and DDP training of a timm-built classifier with `find_unused_parameters=False`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import ummae  # noqa: F401 - registers the models

TINY = {
    "ummae_swin": dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4),
    "ummae_pvt": dict(embed_dims=(8, 8, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                      mlp_ratios=(2, 2, 2, 2)),
    "ummae_vit": dict(img_size=64, embed_dim=16, depth=2, num_heads=2),
}
PYRAMIDS = ["ummae_swin", "ummae_pvt"]


def image(size: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", PYRAMIDS)
def test_classifier_api(name):
    model = timm.create_model(name, num_classes=5, **TINY[name]).eval()
    assert model.num_classes == 5 and model.global_pool == "avg" and model.output_fmt == "NHWC"
    C = model.num_features  # Swin 64 (8 doubled 3 times), PVT 16
    assert model.head_hidden_size == C == model.embed_dims[-1]
    assert model.get_classifier() is model.head and model.head.out_features == 5
    x = image()
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, C)  # NHWC, as output_fmt says
    assert model(x).shape == (2, 5)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(dim=(1, 2)))

    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, C)
    model.reset_classifier(3, global_pool="max")
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.amax(dim=(1, 2)))
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 2, 2, C)  # no pooling: the map

    unpooled = timm.create_model(name, num_classes=0, global_pool="", img_size=96, **TINY[name])
    assert unpooled(image(96)).shape == (2, 3, 3, C) and unpooled.img_size == 96
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model(name, global_pool="token", **TINY[name])


@pytest.mark.parametrize("name", ["ummae_swin", "ummae_pvt", "ummae_vit"])
def test_timm_built_models_have_no_unused_parameters(name):
    model = timm.create_model(name, num_classes=3, **TINY[name]).train()
    model(image()).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert model.mask_token is None
    # Negative control: keeping the mask token leaves a parameter without a gradient.
    kept = timm.create_model(name, num_classes=3, mask_token=True, **TINY[name]).train()
    kept(image()).sum().backward()
    assert [n for n, p in kept.named_parameters() if p.grad is None] == ["mask_token"]


@pytest.mark.parametrize("name", ["ummae_swin", "ummae_pvt", "ummae_vit"])
def test_fx_feature_extraction(name):
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True, **TINY[name]).eval()
    torch.manual_seed(0)  # the same weights
    fx = timm.create_model(name, features_only=True, feature_cfg=dict(feature_cls="fx"), **TINY[name]).eval()
    x = image()
    with torch.no_grad():
        a, b = getter(x), fx(x)
    b = list(b.values()) if isinstance(b, dict) else b
    assert len(a) == len(b)
    for ga, fb in zip(a, b):
        if name in PYRAMIDS:  # the fx extractor hooks the stage outputs as they are: NHWC
            fb = fb.permute(0, 3, 1, 2)
        else:  # ViT blocks: tokens [B, 1+N, C] -> maps
            fb = fb[:, 1:].transpose(1, 2).reshape(ga.shape)
        torch.testing.assert_close(fb, ga)


@pytest.mark.parametrize("name", ["ummae_pvt", "ummae_vit"])
def test_plain_torchvision_fx_traces_pvt_and_vit(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = timm.create_model(name, num_classes=3, **TINY[name]).eval()
    traced = create_feature_extractor(model, return_nodes={"head": "logits"})
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(traced(x)["logits"], model(x))


DDP_SCRIPT = textwrap.dedent('''
    import sys
    import timm
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    import ummae  # noqa: F401
    from ummae.engine.distributed import shutdown_distributed


    def train(name, keep_mask_token, args):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=3, mask_token=keep_mask_token, **args)
        ddp = DDP(model, find_unused_parameters=False)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(dist.get_rank())
        for step in range(3):
            x, y = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 3, (2,), generator=g)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        # DDP keeps the replicas identical.
        w = torch.cat([p.detach().flatten() for p in model.parameters()])
        ws = [torch.zeros_like(w) for _ in range(2)]
        dist.all_gather(ws, w)
        assert torch.equal(ws[0], ws[1])
        if dist.get_rank() == 0:  # one writer: two processes' prints can interleave
            print("trained", name, "on", dist.get_world_size(), "processes", flush=True)

    dist.init_process_group("gloo")
    train(sys.argv[1], sys.argv[2] == "1", eval(sys.argv[3]))
    shutdown_distributed()  # the DDP wrapper gone with train()'s frame: the group is freed now
''')


def _torchrun(tmp_path, name: str, keep_mask_token: bool) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           name, "1" if keep_mask_token else "0", repr(TINY[name])]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["ummae_swin", "ummae_pvt", "ummae_vit"])
def test_timm_classifier_trains_under_ddp_without_find_unused_parameters(tmp_path, name):
    res = _torchrun(tmp_path, name, keep_mask_token=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"trained {name} on 2 processes" in res.stdout


def test_ddp_negative_control_an_unused_mask_token_fails(tmp_path):
    # What the issue reported: with the (never used) mask token, DDP stops at the second step.
    res = _torchrun(tmp_path, "ummae_pvt", keep_mask_token=True)
    assert res.returncode != 0
    assert "did not receive grad" in res.stderr or "unused" in res.stderr.lower(), res.stderr[-2000:]
