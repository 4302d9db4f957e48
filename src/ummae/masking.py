"""Which mask units are hidden from the encoder.

Works on a grid of *mask units* (SPEC sec. 1; 16 px squares by default). Masks follow MAE's
convention: `True` = masked (removed, to be reconstructed). Units are indexed in row-major
order over the unit grid, `index = row * grid_w + col`.

- `RandomMasking`: MAE's random sampling (RS): a fixed number of units, chosen uniformly.
- `UniformMasking`: UM-MAE's Uniform Masking = Uniform Sampling (exactly one visible unit in
  every 2x2 block, its position drawn uniformly) + Secondary Masking (a fraction of the visible
  units gets its embedding replaced by a learnable token).
- `DisjointPartsMasking`: EMAE's K parts per image (SPEC sec. 7): K masks whose visible sets are
  disjoint and together cover the grid; random, or uniform (each 2x2 block dealt to 4 parts).

Both are usable on their own, with any training loop:

    masking = UniformMasking((16, 16), secondary_ratio=0.25)
    m = masking(batch_size, generator=torch.Generator().manual_seed(0))
    m.mask       # [B, 256] bool, True = masked (exactly 192 per row)
    m.secondary  # [B, 256] bool, True = visible but replaced by the secondary mask token
    m.ids_keep   # [B, 64] visible unit indices, in block row-major order
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError, UmmaeError

__all__ = [
    "DisjointPartsMasking",
    "MaskSample",
    "PartsSample",
    "RandomMasking",
    "UniformMasking",
    "check_uniform",
    "require_uniform",
    "uniform_ids_keep",
]


def _grid(grid_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid_size, int):
        grid_size = (grid_size, grid_size)
    h, w = (int(v) for v in grid_size)
    if h < 1 or w < 1:
        raise ConfigError(f"mask grid must be at least 1x1, got {h}x{w}")
    return h, w


def _check_ratio(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise ConfigError(f"{name} must be in [0, 1), got {value}")
    return value


# How the number of secondary-masked units is rounded (`masking.secondary_rounding`).
SECONDARY_ROUNDINGS = ("round", "official")


def secondary_count(num_visible: int, ratio: float, rounding: str = "round") -> int:
    """Visible units given the secondary mask token.

    "round": `round(ratio x visible)` (ummae's default). "official": what the official UM-MAE
    code hides, `visible - int(visible x (1 - ratio))` (it keeps the floor of the kept count).
    The two agree at the paper's Swin/PVT setting (64 visible: 16 either way) and differ by one
    where `ratio x visible` has a fraction below one half, e.g. ViT-B at 224 px (49 visible: 12
    vs 13, `int(36.75)` kept), which matters when continuing an official run.
    """
    if rounding == "round":
        return int(round(num_visible * ratio))
    if rounding == "official":
        return num_visible - int(num_visible * (1.0 - ratio))
    raise ConfigError(f"secondary_rounding must be one of {', '.join(SECONDARY_ROUNDINGS)}, got {rounding!r}")


@dataclass
class _Masks:
    """What a `MaskSample` and a `PartsSample` share: tensors with a leading image axis that are
    concatenated, moved, and carried from DataLoader workers to the model as batch entries."""

    mask: torch.Tensor
    ids_keep: torch.Tensor
    grid_size: tuple[int, int]
    secondary: torch.Tensor | None = None
    uniform: bool = False

    @classmethod
    def cat(cls, samples: list):
        """Concatenate samples of the same grid along the image batch."""
        secondary = None
        if samples[0].secondary is not None:
            secondary = torch.cat([s.secondary for s in samples])
        return cls(torch.cat([s.mask for s in samples]), torch.cat([s.ids_keep for s in samples]),
                   samples[0].grid_size, secondary, all(s.uniform for s in samples))

    def to(self, device: torch.device | str, non_blocking: bool = False):
        secondary = None if self.secondary is None else self.secondary.to(device, non_blocking=non_blocking)
        return type(self)(self.mask.to(device, non_blocking=non_blocking),
                          self.ids_keep.to(device, non_blocking=non_blocking), self.grid_size, secondary,
                          self.uniform)

    def item(self) -> dict[str, torch.Tensor | bool]:
        """The masks of ONE image (a sample of batch 1) as entries of a DataLoader item:
        `mask`, `ids_keep`, `secondary` (if any), `mask_grid` `[2]` and `mask_uniform`; torch's
        default collate stacks them, `from_batch` reads them back."""
        entries = {"mask": self.mask[0], "ids_keep": self.ids_keep[0], "mask_grid": torch.tensor(self.grid_size),
                   "mask_uniform": self.uniform}
        if self.secondary is not None:
            entries["secondary"] = self.secondary[0]
        return entries

    @classmethod
    def from_batch(cls, batch: dict):
        """The masks of a collated batch of `item()` entries (on the CPU, as the workers drew them)."""
        return cls(batch["mask"], batch["ids_keep"], tuple(int(v) for v in batch["mask_grid"][0]),
                   batch.get("secondary"), bool(batch["mask_uniform"].all()))


@dataclass
class MaskSample(_Masks):
    """One batch of masks.

    Attributes:
        mask: `[B, L]` bool, True = masked unit (hidden, reconstructed, in the loss).
        ids_keep: `[B, L_vis]` long, indices of the visible units. For uniform masks they are in
            block row-major order, so `ids_keep[:, k]` is the visible unit of block `k`; that is
            the order of the compact image (see `models.swin`).
        grid_size: `(h, w)` of the unit grid, `L = h * w`.
        secondary: `[B, L]` bool or None, True = a *visible* unit whose embedding the encoder
            replaces by the secondary mask token (never overlaps `mask`).
        uniform: True = known to be a uniform mask (drawn by `UniformMasking`, uniform by
            construction, or already checked). Encoders that need uniform masks trust the flag
            and skip `check_uniform`, which reads the mask back to the host (a device sync on
            CUDA, a graph break under `torch.compile`); masks built by hand keep the default
            False and are checked.
    """

    def picture_rows(self, imgs: torch.Tensor) -> tuple[torch.Tensor, "MaskSample"]:
        """`(imgs, masks)` with one picture row per prediction: these images and masks."""
        return imgs, self


class RandomMasking:
    """MAE's random sampling: `round(L * mask_ratio)` units masked, chosen uniformly per sample.

    Args:
        grid_size: unit grid `(h, w)` or one int for a square grid.
        mask_ratio: fraction of units masked, in [0, 1).
    """

    sample_type = MaskSample

    def __init__(self, grid_size: int | tuple[int, int], mask_ratio: float = 0.75):
        self.grid_size = _grid(grid_size)
        self.mask_ratio = _check_ratio("mask_ratio", mask_ratio)
        num_units = self.grid_size[0] * self.grid_size[1]
        self.num_visible = num_units - int(round(num_units * self.mask_ratio))
        if self.num_visible < 1:
            raise ConfigError(f"mask_ratio {mask_ratio} leaves no visible unit on a {self.grid_size} grid")

    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> MaskSample:
        """Draw `batch_size` independent masks (on the generator's device, then moved)."""
        B, L = int(batch_size), self.grid_size[0] * self.grid_size[1]
        gen_device = generator.device if generator is not None else "cpu"
        noise = torch.rand(B, L, generator=generator, device=gen_device)
        # The num_visible smallest noise values are kept; sort them so the visible tokens
        # keep the image's raster order (order does not matter for global attention).
        ids_keep = noise.argsort(dim=1)[:, : self.num_visible].sort(dim=1).values
        mask = torch.ones(B, L, dtype=torch.bool, device=gen_device)
        mask.scatter_(1, ids_keep, False)
        sample = MaskSample(mask, ids_keep, self.grid_size)
        return sample.to(device) if device is not None else sample


class UniformMasking:
    """UM-MAE's Uniform Masking: uniform sampling + secondary masking (SPEC sec. 2).

    Uniform sampling keeps exactly one unit of each 2x2 block, its position in the block drawn
    uniformly and independently per block and per sample, so exactly 75% of units are masked and
    the visible units tile a regular half-size grid. Secondary masking then picks
    `round(secondary_ratio * L/4)` of the visible units per sample, uniformly.

    Args:
        grid_size: unit grid `(h, w)`, both even, or one even int.
        secondary_ratio: fraction of visible units replaced by the secondary mask token, [0, 1).
        secondary_rounding: "round" or "official" (`secondary_count`).
    """

    mask_ratio = 0.75
    sample_type = MaskSample

    def __init__(self, grid_size: int | tuple[int, int], secondary_ratio: float = 0.25,
                 secondary_rounding: str = "round"):
        self.grid_size = _grid(grid_size)
        h, w = self.grid_size
        if h % 2 or w % 2:
            raise ConfigError(
                f"uniform masking needs an even unit grid (whole 2x2 blocks), got {h}x{w}; "
                "choose an image size that is a multiple of 2 x mask unit"
            )
        self.secondary_ratio = _check_ratio("secondary_ratio", secondary_ratio)
        self.num_visible = (h // 2) * (w // 2)
        self.num_secondary = secondary_count(self.num_visible, self.secondary_ratio, secondary_rounding)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> MaskSample:
        """Draw `batch_size` independent uniform masks (on the generator's device, then moved)."""
        B = int(batch_size)
        h, w = self.grid_size
        hb, wb = h // 2, w // 2
        gen_device = generator.device if generator is not None else "cpu"

        # Position of the kept unit inside each block: 0..3 = (dr, dc) in row-major order.
        pos = torch.randint(0, 4, (B, hb, wb), generator=generator, device=gen_device)
        block_r = torch.arange(hb, device=gen_device).view(1, hb, 1)
        block_c = torch.arange(wb, device=gen_device).view(1, 1, wb)
        rows = 2 * block_r + pos // 2
        cols = 2 * block_c + pos % 2
        ids_keep = (rows * w + cols).reshape(B, hb * wb)  # block row-major order

        mask = torch.ones(B, h * w, dtype=torch.bool, device=gen_device)
        mask.scatter_(1, ids_keep, False)

        secondary = torch.zeros(B, h * w, dtype=torch.bool, device=gen_device)
        if self.num_secondary:
            noise = torch.rand(B, self.num_visible, generator=generator, device=gen_device)
            chosen = noise.argsort(dim=1)[:, : self.num_secondary]
            secondary.scatter_(1, ids_keep.gather(1, chosen), True)

        sample = MaskSample(mask, ids_keep, self.grid_size, secondary, uniform=True)
        return sample.to(device) if device is not None else sample


def check_uniform(mask: torch.Tensor, grid_size: tuple[int, int]) -> None:
    """Raise `UmmaeError` unless every 2x2 block of every sample has exactly one visible unit.

    The compacted encoders rely on this: with any other mask the visible units do not tile a
    half-size grid, and packing them anyway would silently compute nonsense.

    Args:
        mask: `[B, L]` bool, True = masked.
        grid_size: `(h, w)`, both even.
    """
    h, w = grid_size
    if h % 2 or w % 2 or mask.shape[-1] != h * w:
        raise UmmaeError(f"a uniform mask needs an even unit grid matching the mask; got grid {h}x{w} "
                         f"for a mask of {mask.shape[-1]} units")
    visible = (~mask).reshape(-1, h // 2, 2, w // 2, 2).sum(dim=(2, 4))  # [B, h/2, w/2]
    if not bool((visible == 1).all()):
        raise UmmaeError(
            "this encoder needs a uniform mask (exactly one visible unit in every 2x2 block, "
            "as drawn by UniformMasking); got a mask that is not"
        )


def require_uniform(masks: MaskSample) -> None:
    """`check_uniform` unless `masks.uniform` says the masks are uniform already.

    What the compacting encoders call: masks from `UniformMasking` (in the training loop, the
    data workers, anywhere) pass without touching their values, so the model's forward never
    waits for the device; any other mask is checked and a non-uniform one gets the clear error.
    """
    if not masks.uniform:
        check_uniform(masks.mask, masks.grid_size)


def uniform_ids_keep(mask: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Visible unit indices of a uniform mask, in block row-major order.

    Args:
        mask: `[B, L]` bool uniform mask (checked).
        grid_size: `(h, w)` unit grid.

    Returns:
        `[B, L/4]` long; entry `k` is the visible unit of block `k`.
    """
    check_uniform(mask, grid_size)
    h, w = grid_size
    B = mask.shape[0]
    visible = (~mask).reshape(B, h // 2, 2, w // 2, 2).permute(0, 1, 3, 2, 4)  # [B, hb, wb, 2, 2]
    pos = visible.reshape(B, h // 2, w // 2, 4).float().argmax(dim=-1)  # 0..3 in block
    block_r = torch.arange(h // 2, device=mask.device).view(1, -1, 1)
    block_c = torch.arange(w // 2, device=mask.device).view(1, 1, -1)
    ids = (2 * block_r + pos // 2) * w + (2 * block_c + pos % 2)
    return ids.reshape(B, -1)


# ---------------------------------------------------------------------------------------------
# EMAE: K disjoint parts per image


@dataclass
class PartsSample(_Masks):
    """K masks per image whose visible sets are disjoint and cover the grid (EMAE).

    Attributes:
        mask: `[B, K, L]` bool, True = masked in that part (each unit is visible in exactly one
            of the K parts, masked in the other K-1).
        ids_keep: `[B, K, L_vis]` long, visible units of each part (same order rules as
            `MaskSample.ids_keep`: sorted for random parts, block row-major for uniform parts).
        grid_size: `(h, w)` of the unit grid.
        secondary: `[B, K, L]` bool or None; uniform parts: visible units of that part given the
            secondary mask token (drawn independently per part).
        uniform: True = every part is known to be a uniform mask (see `MaskSample.uniform`).
    """

    @property
    def num_parts(self) -> int:
        return self.mask.shape[1]

    def flatten(self) -> MaskSample:
        """One `MaskSample` of batch `B*K`, **image-major**: row `b*K + k` is part `k` of image `b`
        (the K parts of an image are consecutive), the order of `imgs.repeat_interleave(K, 0)`."""
        secondary = None if self.secondary is None else self.secondary.flatten(0, 1)
        return MaskSample(self.mask.flatten(0, 1), self.ids_keep.flatten(0, 1), self.grid_size, secondary,
                          self.uniform)

    def picture_rows(self, imgs: torch.Tensor) -> tuple[torch.Tensor, MaskSample]:
        """`(imgs, masks)` with one picture row per prediction: each image repeated K times beside
        its flattened parts (predictions are `[B*K, L, D]` image-major)."""
        return imgs.repeat_interleave(self.num_parts, dim=0), self.flatten()


class DisjointPartsMasking:
    """EMAE's masking: every image is split into K parts with disjoint visible sets that together
    cover the unit grid (SPEC sec. 7); each part is an ordinary mask of ratio `1 - 1/K`.

    - random (`uniform=False`, for ViT): one random permutation of the L units per image, dealt
      in K consecutive slices of `L/K` units; slice `k` is part `k`'s visible set.
    - uniform (`uniform=True`, K = 4, for Swin/PVT/ViT): the 4 units of every 2x2 block are dealt
      to the 4 parts in an order drawn uniformly (one of the 24 permutations) per block and per
      image, so every part keeps exactly one unit per block: a valid `UniformMasking` sample that
      the compact encoders accept. Secondary masking is then drawn per part, independently, as
      `UniformMasking` does for one mask.

    Called like the other maskings: `masking(B, generator=g)` -> `PartsSample`; use
    `.flatten()` for a `MaskSample` of batch `B*K` (image-major).

    Args:
        grid_size: unit grid `(h, w)` or one int.
        num_parts: K >= 2. Random: must divide `h*w`. Uniform: must be 4.
        uniform: deal 2x2 blocks (True) or a random permutation (False).
        secondary_ratio: uniform parts only: fraction of each part's visible units given the
            secondary mask token, in [0, 1).
        secondary_rounding: "round" or "official" (`secondary_count`).
    """

    sample_type = PartsSample

    def __init__(self, grid_size: int | tuple[int, int], num_parts: int = 4, uniform: bool = True,
                 secondary_ratio: float = 0.25, secondary_rounding: str = "round"):
        self.grid_size = _grid(grid_size)
        h, w = self.grid_size
        L = h * w
        if isinstance(num_parts, bool) or int(num_parts) != num_parts or num_parts < 2:
            raise ConfigError(f"num_parts must be an integer >= 2, got {num_parts}")
        self.num_parts = K = int(num_parts)
        self.uniform = bool(uniform)
        if self.uniform:
            if K != 4:
                raise ConfigError(f"uniform disjoint parts deal the 4 units of each 2x2 block to 4 parts; "
                                  f"num_parts must be 4, got {K}")
            if h % 2 or w % 2:
                raise ConfigError(f"uniform disjoint parts need an even unit grid (whole 2x2 blocks), got {h}x{w}")
            self.secondary_ratio = _check_ratio("secondary_ratio", secondary_ratio)
        else:
            if L % K:
                raise ConfigError(f"{K} disjoint parts of equal size do not fit a {h}x{w} grid "
                                  f"({L} units is not a multiple of {K})")
            self.secondary_ratio = 0.0  # random parts have no secondary masking
        self.num_visible = L // K
        self.num_secondary = secondary_count(self.num_visible, self.secondary_ratio, secondary_rounding)
        self.mask_ratio = 1.0 - 1.0 / K

    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> PartsSample:
        """Draw `batch_size` images' K parts (on the generator's device, then moved)."""
        B, K = int(batch_size), self.num_parts
        h, w = self.grid_size
        L = h * w
        gen_device = generator.device if generator is not None else "cpu"
        if self.uniform:
            hb, wb = h // 2, w // 2
            # A uniformly random permutation of the 4 in-block positions per block: deal[..., k]
            # = position (0..3, (dr, dc) row-major) of the unit that part k keeps.
            deal = torch.rand(B, hb * wb, 4, generator=generator, device=gen_device).argsort(dim=-1)
            block = torch.arange(hb * wb, device=gen_device).view(1, -1, 1)
            rows = 2 * (block // wb) + deal // 2
            cols = 2 * (block % wb) + deal % 2
            ids_keep = (rows * w + cols).permute(0, 2, 1)  # [B, 4, L/4], block row-major per part
        else:
            perm = torch.rand(B, L, generator=generator, device=gen_device).argsort(dim=-1)
            # Slice k of the permutation is part k; sorted to keep raster order, as RandomMasking.
            ids_keep = perm.view(B, K, self.num_visible).sort(dim=-1).values  # [B, K, L/K]
        mask = torch.ones(B, K, L, dtype=torch.bool, device=gen_device)
        mask.scatter_(2, ids_keep, False)
        secondary = None
        if self.uniform:
            secondary = torch.zeros(B, K, L, dtype=torch.bool, device=gen_device)
            if self.num_secondary:
                noise = torch.rand(B, K, self.num_visible, generator=generator, device=gen_device)
                chosen = noise.argsort(dim=-1)[..., : self.num_secondary]
                secondary.scatter_(2, ids_keep.gather(2, chosen), True)
        sample = PartsSample(mask, ids_keep, self.grid_size, secondary, uniform=self.uniform)
        return sample.to(device) if device is not None else sample

    def from_batch(self, batch: dict) -> PartsSample:
        """The parts of a DataLoader batch of `SeededSamples` items (`PartsSample.from_batch`)."""
        return PartsSample.from_batch(batch)
