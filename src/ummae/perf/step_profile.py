"""Where a training step's time and memory go, per component (`ummae bench --profile`).

The model code marks its parts with `torch.profiler.record_function` labels (`patch_embed`,
`compaction`, `swin.position_bias`, `swin.attention`, `swin.mlp`, `swin.merging`, `pvt.*`,
`decoder`, `loss`, ...); this module runs a few training steps of a preset under
`torch.profiler` and adds up, per label:
    forward   self time of every op inside the label (the innermost label owns an op, except
              under `decoder` and `loss`, which own everything inside them);
    backward  time of the autograd nodes whose forward op ran inside the label (the profiler
              gives a backward node the `sequence_nr` of the forward op that made it);
    memory    bytes the label's forward ops allocated (profile_memory), i.e. mostly what the
              backward keeps: activations; frees are not subtracted.
The step's own phases are labelled here: `masks` (drawing the masks: the data part of a bench
step, which has no loader), `optimizer` (AdamW step + zero_grad), and whatever is not inside any
label is `other`. ViT's timm blocks get `vit.attention` / `vit.mlp` / `vit.norm` labels from
module hooks while profiling. On CUDA the same is done for device (kernel) time.

Times are per step (the mean over the profiled steps), in milliseconds. Profiling adds overhead
per op, so the total is above `ummae bench`'s step time; the shares are what to read.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..config import PretrainConfig
from ..models import build_pretrain_model
from ..models.specs import backbone_spec
from .bench import BenchStep, sync_device

__all__ = ["profile_step", "format_profile"]

# Labels that own everything inside them (their inner labels, e.g. the decoder's attention, are
# not the encoder's components).
_OWNING = ("decoder", "loss", "optimizer", "masks")


def _known_labels() -> set[str]:
    return {
        "patch_embed", "compaction", "position_embedding", "encoder", "decoder", "loss", "masks",
        "optimizer", "backward", "forward",
        "swin.qkv", "swin.position_bias", "swin.attention", "swin.proj", "swin.mlp", "swin.norm",
        "swin.window_partition", "swin.merging",
        "pvt.qkv", "pvt.spatial_reduction", "pvt.attention", "pvt.proj", "pvt.mlp", "pvt.norm",
        "pvt.merging", "vit.blocks", "vit.attention", "vit.mlp", "vit.norm",
    }


@contextlib.contextmanager
def _block_labels(model: torch.nn.Module, blocks: tuple[str, type] | None):
    """Label the attention / MLP / norms of the blocks its backbone names (`BackboneSpec.
    profile_blocks`: `(prefix, block class)`, e.g. timm's ViT blocks, whose code has no labels of
    its own) as `prefix.attention`, `prefix.mlp`, `prefix.norm`."""
    handles, stack = [], []

    def enter(name):
        def hook(module, args):
            rf = record_function(name)
            rf.__enter__()
            stack.append(rf)
        return hook

    def leave(module, args, out):
        stack.pop().__exit__(None, None, None)

    prefix, block_class = blocks or ("", ())
    encoder = getattr(model, "encoder", model)
    for block in encoder.modules():
        if not isinstance(block, block_class):
            continue
        for name, module in ((f"{prefix}.attention", block.attn), (f"{prefix}.mlp", block.mlp),
                             (f"{prefix}.norm", block.norm1), (f"{prefix}.norm", block.norm2)):
            if isinstance(module, torch.nn.Identity):
                continue
            handles += [module.register_forward_pre_hook(enter(name)),
                        module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_step(cfg: PretrainConfig, device: torch.device, batch_size: int, steps: int = 3,
                 warmup: int = 1, build_model: Callable | None = None) -> dict:
    """Profile `steps` training steps of one configuration (after `warmup` unprofiled ones): the
    step `ummae bench` times (`BenchStep`), whose phases are labelled forward / backward / optimizer."""
    cfg.train.batch_size = batch_size
    cfg.train.accum_steps = 1
    run = BenchStep(cfg, device, build_model or build_pretrain_model)
    model, step = run.model, run.step
    with _block_labels(model, backbone_spec(cfg.model.arch).profile_blocks):
        for _ in range(warmup):
            step()
        sync_device(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities, profile_memory=True) as prof:
            for _ in range(steps):
                step()
            sync_device(device)
    table = _attribute(prof.events(), steps, device.type == "cuda")
    return {"preset": cfg.preset, "batch_size": batch_size, "steps": steps, "device": str(device),
            "components": table}


def _attribute(events, steps: int, cuda: bool) -> dict:
    labels = _known_labels()

    def component_of(e) -> str:
        names, node = [], e.cpu_parent
        while node is not None:
            if node.name in labels:
                names.append(node.name)
            node = node.cpu_parent
        names.reverse()  # outermost first
        owning = [n for n in names if n in _OWNING]
        inner = [n for n in names if n not in ("forward", "backward")]
        return owning[0] if owning else (inner[-1] if inner else "other")

    fwd_ms = defaultdict(float)
    bwd_ms = defaultdict(float)
    dev_ms = defaultdict(float)
    alloc = defaultdict(int)
    seq_comp: dict[tuple[int, int], str] = {}
    backward_nodes = []
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function"):
            backward_nodes.append(e)
            continue
        if e.name in labels:
            continue
        comp = component_of(e)
        # Ops below a backward node are counted with the node.
        node, in_backward = e.cpu_parent, False
        while node is not None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                in_backward = True
                break
            node = node.cpu_parent
        if in_backward:
            continue
        fwd_ms[comp] += e.self_cpu_time_total / 1e3
        if cuda:
            dev_ms[comp] += getattr(e, "self_device_time_total", 0.0) / 1e3
        alloc[comp] += max(e.self_cpu_memory_usage, 0) + max(getattr(e, "self_device_memory_usage", 0), 0)
        if e.sequence_nr >= 0 and comp not in ("optimizer",):
            seq_comp.setdefault((e.thread, e.sequence_nr), comp)
            seq_comp.setdefault((-1, e.sequence_nr), comp)
    for e in backward_nodes:
        comp = seq_comp.get((e.fwd_thread, e.sequence_nr)) or seq_comp.get((-1, e.sequence_nr), "other")
        bwd_ms[comp] += e.cpu_time_total / 1e3
        if cuda:
            dev_ms[comp] += getattr(e, "device_time_total", 0.0) / 1e3
    comps = sorted(set(fwd_ms) | set(bwd_ms), key=lambda c: -(fwd_ms[c] + bwd_ms[c]))
    total = sum(fwd_ms.values()) + sum(bwd_ms.values())
    out = {}
    for c in comps:
        t = fwd_ms[c] + bwd_ms[c]
        out[c] = {"forward_ms": fwd_ms[c] / steps, "backward_ms": bwd_ms[c] / steps,
                  "total_ms": t / steps, "share": t / total if total else 0.0,
                  "allocated_bytes": alloc[c] / steps}
        if cuda:
            out[c]["device_ms"] = dev_ms[c] / steps
    return out


def format_profile(report: dict) -> str:
    lines = []
    for prof in report["profiles"]:
        comps = prof["components"]
        cuda = any("device_ms" in v for v in comps.values())
        lines.append(f"{prof['preset']} (batch {prof['batch_size']}, {prof['steps']} profiled steps, "
                     f"{prof['device']}): per step")
        header = ["component", "forward ms", "backward ms", "total ms", "share", "alloc MiB"]
        if cuda:
            header.append("device ms")
        rows = [header]
        for name, v in comps.items():
            row = [name, f"{v['forward_ms']:.1f}", f"{v['backward_ms']:.1f}", f"{v['total_ms']:.1f}",
                   f"{100 * v['share']:.1f}%", f"{v['allocated_bytes'] / 2**20:.1f}"]
            if cuda:
                row.append(f"{v['device_ms']:.1f}")
            rows.append(row)
        total = sum(v["total_ms"] for v in comps.values())
        rows.append(["total", "", "", f"{total:.1f}", "100%", ""] + ([""] if cuda else []))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        lines.append("")
    return "\n".join(lines).rstrip()
