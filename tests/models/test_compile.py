"""Every demo preset's training forward + backward is one graph: no host-device sync and no
data-dependent shape inside the model (issue 14).

`torch.compile(fullgraph=True)` fails on any graph break: `.item()`, `bool(tensor)`, `unique`,
`nonzero`, boolean indexing, a Python branch on a tensor's value. The AOT backends trace the
backward too, so data-dependent shapes there fail as well. Backend `aot_eager` (dynamo + AOT
autograd, no code generation) keeps this in seconds per preset on a CPU; inductor's C++ code
generation takes minutes per model on a loaded 2-core machine, so it is left to
`scripts/gpu_checks.py` (eager vs --compile on a GPU). Loss and gradients must equal eager.
"""

from __future__ import annotations

import pytest
import torch

from ummae.resolve import resolve_config
from ummae.models import build_pretrain_model
from ummae.presets import preset_names

DEMOS = [n for n in preset_names() if n.endswith("_demo")]


def _loss_and_grads(model, step, args):
    model.zero_grad(set_to_none=True)
    loss = step(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", DEMOS)
def test_demo_training_step_compiles_as_one_graph_and_equals_eager(name):
    torch._dynamo.reset()
    cfg = resolve_config(name, None, [], {})
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).train()
    imgs = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size, generator=torch.Generator().manual_seed(0))
    masks = model.sample_masks(2, generator=torch.Generator().manual_seed(1))

    def step(imgs, mask, ids_keep, secondary):
        # MaskSample, or EMAE's PartsSample ([B, K, L] masks): the same fields
        m = type(masks)(mask, ids_keep, masks.grid_size, secondary, masks.uniform)
        return model(imgs, m)[0]

    args = (imgs, masks.mask, masks.ids_keep, masks.secondary)
    loss, grads = _loss_and_grads(model, step, args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    c_loss, c_grads = _loss_and_grads(model, compiled, args)

    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
    assert c_grads.keys() == grads.keys() and len(grads) > 10
    for n in grads:
        torch.testing.assert_close(c_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_graph_break_fails_the_check():
    """Negative control: a value-dependent branch (what a sync would be) is refused."""
    def f(x):
        if bool((x > 0).all()):
            return x * 2
        return x

    with pytest.raises(Exception):
        torch.compile(f, fullgraph=True, backend="aot_eager")(torch.randn(3))
