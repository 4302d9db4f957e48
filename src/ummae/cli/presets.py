"""`ummae presets`: the named configurations, with size, input and masking."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list the named configurations",
                       description="List the presets usable with `ummae pretrain --preset NAME`.")
    p.set_defaults(run=run)


def _count_params(cfg) -> int:
    import torch

    from ..models import build_pretrain_model

    with torch.device("meta"):  # sizes only: no memory, no initialisation time
        model = build_pretrain_model(cfg)
    return sum(p.numel() for p in model.encoder.parameters())  # encoder only: what is kept


def _masking(cfg) -> str:
    k = cfg.masking
    if cfg.method == "emae":
        e = cfg.emae
        sm = f" + SM {k.secondary_ratio:g}" if e.parts == "uniform" else ""
        return f"{e.num_parts} disjoint {e.parts} parts{sm} + consistency, {k.unit_size}px units"
    if cfg.method == "ummae":
        return f"uniform 75% + SM {k.secondary_ratio:g}, {k.unit_size}px units"
    tokens = " -> mask tokens" if cfg.method == "simmim" else ""
    return f"random {k.mask_ratio:.0%}{tokens}, {k.unit_size}px units"


def run(args: argparse.Namespace) -> int:
    from ..config import stage_widths
    from ..presets import PRESETS, get_preset

    rows = []
    for name, (description, _) in PRESETS.items():
        cfg = get_preset(name)
        m = cfg.model
        rows.append((
            name,
            cfg.method,
            f"{m.arch} {'-'.join(map(str, stage_widths(m)))}d {'-'.join(map(str, m.depths))}",
            f"{_count_params(cfg) / 1e6:.1f}M",
            f"{cfg.data.img_size}px",
            _masking(cfg),
            f"{cfg.train.epochs} ep x {cfg.effective_batch}",
            description,
        ))
    header = ("preset", "method", "encoder", "params", "input", "masking", "schedule", "")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
    for row in [header] + rows:
        cells = [c.ljust(w) for c, w in zip(row, widths)]
        print("  ".join(cells).rstrip())
        if row[-1]:
            print(" " * 2 + row[-1])
    return 0
