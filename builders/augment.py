"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021).

A strategy such as ``"color_crop_cutout_flip_scale_rotate"`` names augmentation families. Each
draw picks ONE family uniformly at random (the paper's single-transform mode; ``color`` applies
brightness, saturation and contrast together) and the random parameters for it. A draw is either
*siamese* (one transform shared by every image of every batch it is applied to, e.g. the real and
the synthetic batch of one class) or *per-sample* (each image its own parameters, one family).

Every transform is differentiable with respect to the images: additions, products, gathers and
``grid_sample``, never an in-place write into the input. All randomness comes from an explicit CPU
``torch.Generator``; the global RNG is never touched, so the same generator state gives the same
output on any device.

Factor conventions follow the reference implementation of the paper:

- brightness: ``x + (u - 0.5) * brightness``
- saturation: ``m + (x - m) * (u * saturation)``, ``m`` the per-pixel mean over channels
- contrast: ``m + (x - m) * (u + contrast)``, ``m`` the per-image mean over channels and pixels
- crop: translate by an integer in ``[-s, s]`` per axis, ``s = int(side * crop + 0.5)``, zero fill
- cutout: zero a ``k x k`` square, ``k = int(side * cutout + 0.5)`` per axis, at a random centre
- flip: mirror left-right with probability ``flip``
- scale: sampling grid scaled by a factor in ``[1/scale, scale]`` per axis (>1 shrinks the content)
- rotate: rotate by an angle in ``[-rotate, rotate]`` degrees (positive: anticlockwise)

with ``u ~ U(0, 1)``. Scale and rotate use ``affine_grid``/``grid_sample`` (bilinear, zero padding,
``align_corners=False``) in normalised coordinates, as the reference does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from builders.transfer import to_device

__all__ = ["FAMILIES", "PACK_COLUMNS", "PACK_FAMILY", "PACK_IDENTITY", "PACK_WIDTH", "AugmentDraw", "Augmenter",
           "parse_strategy"]

#: The valid augmentation families, in canonical order.
FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")

# The parameter tensors each family's draw holds (each of shape [n], n = 1 or the batch size):
#   color:  brightness (offset added), saturation (factor), contrast (factor)
#   crop:   crop_row, crop_col: uniforms in [0, 1), mapped to an integer shift at apply time
#           (the shift range depends on the image size, unknown when a siamese draw is made)
#   cutout: cutout_row, cutout_col: uniforms in [0, 1), mapped to the square's centre at apply time
#   flip:   flip (bool: mirror this image)
#   scale:  scale_x (width axis), scale_y (height axis): diagonal of the sampling affine matrix
#   rotate: angle (degrees, anticlockwise)
_PARAMS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop_row", "crop_col"),
    "cutout": ("cutout_row", "cutout_col"),
    "flip": ("flip",),
    "scale": ("scale_x", "scale_y"),
    "rotate": ("angle",),
}


# The packed form of per-image draws (:meth:`Augmenter.pack`): a float32 tensor [M, PACK_WIDTH], one row per
# image. Column PACK_FAMILY holds the index in FAMILIES of the image's family; column PACK_COLUMNS[key] holds
# parameter ``key`` (as the draw holds it; flip as 0/1) where the image's family has it, else
# PACK_IDENTITY[key], a value under which that family's transform leaves the image unchanged (crop: 0.5 maps
# to a shift of 0; cutout and the colour and warp families are masked by the family column as well).
#: Column of a packed row holding the index into :data:`FAMILIES` of the image's family.
PACK_FAMILY: int = 0
#: Column of a packed row holding each draw parameter.
PACK_COLUMNS: dict[str, int] = {
    "brightness": 1, "saturation": 2, "contrast": 3,  # color
    "crop_row": 4, "crop_col": 5,  # crop
    "cutout_row": 6, "cutout_col": 7,  # cutout
    "flip": 8,  # flip
    "scale_x": 9, "scale_y": 10,  # scale
    "angle": 11,  # rotate
}
#: Columns of a packed row.
PACK_WIDTH: int = 12
#: A parameter's value in the rows of images whose family is another.
PACK_IDENTITY: dict[str, float] = {
    "brightness": 0.0, "saturation": 1.0, "contrast": 1.0, "crop_row": 0.5, "crop_col": 0.5,
    "cutout_row": 0.0, "cutout_col": 0.0, "flip": 0.0, "scale_x": 1.0, "scale_y": 1.0, "angle": 0.0,
}
_FIRST_WARP = FAMILIES.index("scale")  # the families from here on are the affine warps
assert set(FAMILIES[_FIRST_WARP:]) == {"scale", "rotate"}
_IDENTITY_ROW = np.array([0.0] + [PACK_IDENTITY[k] for k in sorted(PACK_COLUMNS, key=PACK_COLUMNS.get)],
                         dtype=np.float32)


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split a strategy like ``"color_crop_cutout"`` into its families; ValueError if invalid."""
    if not isinstance(strategy, str):
        raise ValueError(f"augmentation strategy must be a string, got {type(strategy).__name__}")
    valid = ", ".join(FAMILIES)
    parts = tuple(strategy.split("_")) if strategy else ()
    if not parts:
        raise ValueError(f"empty augmentation strategy; valid families: {valid} (joined with '_')")
    unknown = [p for p in parts if p not in FAMILIES]
    if unknown:
        raise ValueError(
            f"unknown augmentation famil{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(repr(u) for u in unknown)} in {strategy!r}; valid families: {valid} "
            "(joined with '_')"
        )
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise ValueError(
            f"augmentation famil{'y' if len(repeated) == 1 else 'ies'} {', '.join(repeated)} "
            f"repeated in {strategy!r} (a repeat would bias the uniform choice); valid families: {valid}"
        )
    return parts


@dataclass(frozen=True)
class AugmentDraw:
    """One random augmentation: the chosen family and its parameter tensors (kept on CPU).

    ``batch_size`` is None for a siamese draw (every parameter has one entry, shared by all images
    of any batch), else the batch size the draw was made for (one entry per image).
    """

    family: str
    params: Mapping[str, Tensor] = field(default_factory=dict)
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.family not in _PARAMS:
            raise ValueError(f"unknown augmentation family {self.family!r}; valid: {', '.join(FAMILIES)}")
        missing = [k for k in _PARAMS[self.family] if k not in self.params]
        if missing:
            raise ValueError(f"{self.family} draw lacks parameter(s) {', '.join(missing)}")
        n = 1 if self.batch_size is None else self.batch_size
        for key in _PARAMS[self.family]:
            value = self.params[key]
            if value.dim() != 1 or value.shape[0] != n:
                raise ValueError(f"{self.family} draw: {key} must have shape [{n}], got {list(value.shape)}")

    @property
    def siamese(self) -> bool:
        """True when one transform is shared by every image."""
        return self.batch_size is None

    def rows(self, start: int, stop: int) -> "AugmentDraw":
        """The draw of images ``[start, stop)`` of its batch (a siamese draw is returned as it is)."""
        if self.batch_size is None:
            return self
        return AugmentDraw(self.family, {k: v[start:stop] for k, v in self.params.items()}, stop - start)


def _side_ratio(side: int, ratio: float) -> int:
    """``int(side * ratio + 0.5)``: the reference's rounding of a fraction of a side."""
    return int(side * ratio + 0.5)


class Augmenter:
    """Differentiable siamese augmentation with one randomly chosen family per draw."""

    def __init__(
        self,
        strategy: str,
        *,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        crop: float = 0.125,
        cutout: float = 0.5,
        flip: float = 0.5,
        scale: float = 1.2,
        rotate: float = 15.0,
    ) -> None:
        self.families: tuple[str, ...] = parse_strategy(strategy)
        self.strategy: str = "_".join(self.families)
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {flip}")
        if scale < 1.0:
            raise ValueError(f"scale must be >= 1 (factors lie in [1/scale, scale]), got {scale}")
        for name, value in (("brightness", brightness), ("saturation", saturation), ("contrast", contrast),
                            ("crop", crop), ("cutout", cutout), ("rotate", rotate)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.brightness = float(brightness)
        self.saturation = float(saturation)
        self.contrast = float(contrast)
        self.crop = float(crop)
        self.cutout = float(cutout)
        self.flip = float(flip)
        self.scale = float(scale)
        self.rotate = float(rotate)

    def __repr__(self) -> str:
        return f"Augmenter({self.strategy!r})"

    # -- drawing ------------------------------------------------------------------------------
    def sample(self, generator: torch.Generator, batch_size: int | None = None) -> AugmentDraw:
        """Draw a family and its parameters from ``generator`` (a CPU generator).

        ``batch_size`` None makes a siamese draw: one transform for every image of any batch.
        """
        if generator.device.type != "cpu":
            raise ValueError(f"Augmenter needs a CPU torch.Generator, got one on {generator.device}")
        if batch_size is not None and batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 or None, got {batch_size}")
        n = 1 if batch_size is None else batch_size
        family = self.families[int(torch.randint(len(self.families), (1,), generator=generator))]

        def uniform() -> Tensor:
            return torch.rand(n, generator=generator)

        if family == "color":
            params = {
                "brightness": (uniform() - 0.5) * self.brightness,
                "saturation": uniform() * self.saturation,
                "contrast": uniform() + self.contrast,
            }
        elif family == "crop":
            params = {"crop_row": uniform(), "crop_col": uniform()}
        elif family == "cutout":
            params = {"cutout_row": uniform(), "cutout_col": uniform()}
        elif family == "flip":
            params = {"flip": uniform() < self.flip}
        elif family == "scale":
            low = 1.0 / self.scale
            params = {"scale_x": uniform() * (self.scale - low) + low,
                      "scale_y": uniform() * (self.scale - low) + low}
        else:  # rotate
            params = {"angle": (uniform() - 0.5) * (2.0 * self.rotate)}
        return AugmentDraw(family, params, batch_size)

    # -- applying -----------------------------------------------------------------------------
    def apply(self, x: Tensor, draw: AugmentDraw) -> Tensor:
        """Apply ``draw`` to the batch ``x`` [N, C, H, W]; returns a new tensor (differentiable)."""
        if x.dim() != 4:
            raise ValueError(f"expected images [N, C, H, W], got shape {list(x.shape)}")
        if draw.batch_size is not None and draw.batch_size != x.shape[0]:
            raise ValueError(f"draw was made for {draw.batch_size} images, batch has {x.shape[0]}")
        n = x.shape[0]

        def param(key: str, dtype: torch.dtype | None = None) -> Tensor:
            # drawn on the host; copied to a GPU without waiting for the work already queued there
            return to_device(draw.params[key], x.device, dtype).expand(n)

        fam = draw.family
        if fam == "color":
            return self._color(x, *(param(k, x.dtype).view(n, 1, 1, 1) for k in _PARAMS["color"]))
        if fam == "crop":
            return self._crop(x, param("crop_row", torch.float64), param("crop_col", torch.float64))
        if fam == "cutout":
            return self._cutout(x, param("cutout_row", torch.float64), param("cutout_col", torch.float64))
        if fam == "flip":
            return torch.where(param("flip", torch.bool).view(n, 1, 1, 1), x.flip(3), x)
        if fam == "scale":
            sx, sy = param("scale_x", torch.float64), param("scale_y", torch.float64)
            zero = torch.zeros_like(sx)
            theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
            return self._warp(x, theta)
        # rotate
        rad = param("angle", torch.float64) * (math.pi / 180.0)
        cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        return self._warp(x, theta)

    @staticmethod
    def _color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
        x = x + brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * saturation + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * contrast + mean

    def _crop(self, x: Tensor, u_row: Tensor, u_col: Tensor) -> Tensor:
        n, c, h, w = x.shape
        rows = self._shifted_index(u_row, h, _side_ratio(h, self.crop))  # [n, h] into the padded rows
        cols = self._shifted_index(u_col, w, _side_ratio(w, self.crop))  # [n, w] into the padded cols
        padded = F.pad(x, (1, 1, 1, 1))  # one zero row/column each side: the fill for shifted-in pixels
        out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2))
        return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))

    @staticmethod
    def _shifted_index(u: Tensor, side: int, max_shift: int) -> Tensor:
        """Index into a 1-zero-padded axis: output pixel i reads input i + shift, or a zero border."""
        choices = 2 * max_shift + 1
        shift = (u * choices).floor().clamp(max=choices - 1).long() - max_shift  # uniform on [-s, s]
        index = torch.arange(side, device=u.device).view(1, side) + shift.view(-1, 1) + 1
        return index.clamp(0, side + 1)

    def _cutout(self, x: Tensor, u_row: Tensor, u_col: Tensor) -> Tensor:
        n, _, h, w = x.shape
        inside_rows = self._cutout_span(u_row, h, _side_ratio(h, self.cutout))  # [n, h]
        inside_cols = self._cutout_span(u_col, w, _side_ratio(w, self.cutout))  # [n, w]
        hole = inside_rows.view(n, 1, h, 1) & inside_cols.view(n, 1, 1, w)
        return x * (~hole).to(x.dtype)

    @staticmethod
    def _cutout_span(u: Tensor, side: int, size: int) -> Tensor:
        """Which positions of an axis the cut-out square covers; its centre is uniform on
        ``[0, side - size % 2]`` and it spans ``[centre - size // 2, centre - size // 2 + size)``."""
        choices = side + 1 - size % 2
        centre = (u * choices).floor().clamp(max=choices - 1).long()
        start = (centre - size // 2).view(-1, 1)
        pos = torch.arange(side, device=u.device).view(1, side)
        return (pos >= start) & (pos < start + size)

    @staticmethod
    def _warp(x: Tensor, theta: Tensor) -> Tensor:
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # -- conveniences -------------------------------------------------------------------------
    def __call__(self, x: Tensor, generator: torch.Generator, siamese: bool = False) -> Tensor:
        """Draw and apply: per-sample parameters (one family), or one shared transform if ``siamese``."""
        return self.apply(x, self.sample(generator, None if siamese else x.shape[0]))

    def apply_each(self, batches: Sequence[Tensor], draws: Sequence[AugmentDraw]) -> list[Tensor]:
        """``[apply(b, d) for b, d in zip(batches, draws)]`` with siamese ``draws``, in one call per family
        (:meth:`apply_many`, split back into the batches)."""
        if len(batches) != len(draws):
            raise ValueError(f"apply_each: {len(batches)} batches need as many draws, got {len(draws)}")
        if any(not d.siamese for d in draws):
            raise ValueError("apply_each takes siamese draws (one transform per batch)")
        if not batches:
            return []
        return list(self.apply_many(batches, draws).split([b.shape[0] for b in batches]))

    def apply_many(self, batches: Sequence[Tensor], draws: Sequence[AugmentDraw]) -> Tensor:
        """``torch.cat([apply(b, d) for b, d in zip(batches, draws)])`` in one call per family.

        ``draws`` may be per-sample (one per image of its batch, e.g. each of N networks' own draw
        from its own generator) or siamese. The batches whose draws share a family are concatenated
        with their parameters and transformed together; every transform acts on each image alone, so
        each image gets what ``apply`` gives it. Fewer, larger kernel launches on a GPU.
        """
        if len(batches) != len(draws):
            raise ValueError(f"apply_many: {len(batches)} batches need as many draws, got {len(draws)}")
        sizes = [b.shape[0] for b in batches]
        parts: list[Tensor | None] = [None] * len(batches)
        for family in dict.fromkeys(d.family for d in draws):  # first-seen order
            members = [i for i, d in enumerate(draws) if d.family == family]
            if len(members) == 1:  # no copies: the draw as it is
                done = self.apply(batches[members[0]], draws[members[0]])
            else:
                params = {key: torch.cat([draws[i].params[key] if draws[i].batch_size is not None
                                          else draws[i].params[key].expand(sizes[i]) for i in members])
                          for key in _PARAMS[family]}
                joined = torch.cat([batches[i] for i in members])
                done = self.apply(joined, AugmentDraw(family, params, sum(sizes[i] for i in members)))
            for i, part in zip(members, done.split([sizes[i] for i in members])):
                parts[i] = part
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # type: ignore[arg-type]

    # -- packed: every family in one fixed sequence of operators ----------------------------------
    def pack(self, draws: Sequence[AugmentDraw], sizes: Sequence[int] | None = None) -> Tensor:
        """The draws of consecutive batches as one float32 CPU tensor [M, PACK_WIDTH], a row per image
        (layout: :data:`PACK_FAMILY`, :data:`PACK_COLUMNS`, :data:`PACK_IDENTITY`), for :meth:`apply_packed`.

        ``sizes`` gives each batch's size; it may be left out when every draw is per-sample (its own
        ``batch_size``); a siamese draw is repeated over its batch.
        """
        if sizes is None:
            if any(d.siamese for d in draws):
                raise ValueError("pack: a siamese draw needs its batch's size; pass sizes=[...] (one per draw)")
            sizes = [d.batch_size for d in draws]  # type: ignore[misc]
        if len(sizes) != len(draws):
            raise ValueError(f"pack: {len(draws)} draws need as many sizes, got {len(sizes)}")
        for draw, size in zip(draws, sizes):
            if draw.family not in self.families:
                raise ValueError(f"pack: a {draw.family} draw, but this augmenter's strategy is {self.strategy!r}; "
                                 "pack the draws of this augmenter's sample()")
            if draw.batch_size is not None and draw.batch_size != size:
                raise ValueError(f"pack: a draw made for {draw.batch_size} images given a batch of {size}")
        out = np.empty((sum(sizes), PACK_WIDTH), dtype=np.float32)
        out[:] = _IDENTITY_ROW
        if not draws:
            return torch.from_numpy(out)
        # every parameter of every draw in one vector (cat promotes a bool flip to float; one tensor-to-numpy
        # conversion, not one per key)
        values = torch.cat([draw.params[key] for draw in draws for key in _PARAMS[draw.family]])
        values, at, start = values.numpy(), 0, 0
        for draw, size in zip(draws, sizes):
            rows = out[start : start + size]
            rows[:, PACK_FAMILY] = FAMILIES.index(draw.family)
            for key in _PARAMS[draw.family]:
                length = draw.params[key].shape[0]  # size, or 1 for a siamese draw (broadcast over its rows)
                rows[:, PACK_COLUMNS[key]] = values[at : at + length]
                at += length
            start += size
        return torch.from_numpy(out)

    def apply_packed(self, x: Tensor, packed: Tensor) -> Tensor:
        """Each image ``x[i]`` [M, C, H, W] transformed by the draw in row ``packed[i]`` (:meth:`pack`, on
        ``x``'s device): ``torch.cat([apply(b, d) for b, d in zip(batches, draws)])`` for
        ``apply_packed(torch.cat(batches), pack(draws))``.

        One fixed sequence of operators whatever the draws (each of this augmenter's families runs on every
        image, identity where it is not the image's own), no host synchronisation: fit for a CUDA graph.
        """
        if x.dim() != 4:
            raise ValueError(f"expected images [N, C, H, W], got shape {list(x.shape)}")
        if tuple(packed.shape) != (x.shape[0], PACK_WIDTH):
            raise ValueError(f"apply_packed: {x.shape[0]} images need packed draws of shape "
                             f"[{x.shape[0]}, {PACK_WIDTH}] (Augmenter.pack), got {list(packed.shape)}")
        n, present = x.shape[0], set(self.families)
        col = packed.to(torch.float64).unbind(1)  # [n] each; float64 for the index and angle maths, as apply does
        per_image = packed.to(x.dtype).view(n, PACK_WIDTH, 1, 1, 1).unbind(1)  # [n, 1, 1, 1] each
        family = per_image[PACK_FAMILY]

        if "color" in present:
            b, s, c = (per_image[PACK_COLUMNS[k]] for k in _PARAMS["color"])
            x = torch.where(family == FAMILIES.index("color"), self._color(x, b, s, c), x)
        if "crop" in present:  # identity rows hold 0.5: a shift of 0, the gather copies every pixel
            x = self._crop(x, col[PACK_COLUMNS["crop_row"]], col[PACK_COLUMNS["crop_col"]])
        if "cutout" in present:
            _, _, h, w = x.shape
            cut = col[PACK_FAMILY] == FAMILIES.index("cutout")
            rows = self._cutout_span(col[PACK_COLUMNS["cutout_row"]], h, _side_ratio(h, self.cutout)) & cut.view(n, 1)
            inside_cols = self._cutout_span(col[PACK_COLUMNS["cutout_col"]], w, _side_ratio(w, self.cutout))
            x = x * (~(rows.view(n, 1, h, 1) & inside_cols.view(n, 1, 1, w))).to(x.dtype)  # x * 1 elsewhere
        if "flip" in present:
            x = torch.where(per_image[PACK_COLUMNS["flip"]] != 0, x.flip(3), x)
        if "scale" in present or "rotate" in present:
            # diag(scale_x, scale_y) @ rotation: an image of one family has the other's identity (1, 0), so its
            # theta is apply's own, bit for bit (cos 0 = 1, sin 0 = 0, 1 * v = v, -(v * w) = v * -w)
            rad = col[PACK_COLUMNS["angle"]] * (math.pi / 180.0)
            cos, sin = rad.cos(), rad.sin()
            zero = torch.zeros_like(rad)
            rotation = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(n, 2, 3)
            scale = torch.stack([col[PACK_COLUMNS["scale_x"]], col[PACK_COLUMNS["scale_y"]]], 1).view(n, 2, 1)
            warped = family >= _FIRST_WARP  # scale or rotate, the last two families
            x = torch.where(warped, self._warp(x, scale * rotation), x)  # grid_sample of the identity is not exact
        return x

    def siamese(self, generator: torch.Generator, *batches: Tensor) -> tuple[Tensor, ...]:
        """Apply one siamese draw to every batch (e.g. the real and synthetic batch of one class)."""
        draw = self.sample(generator, None)
        return tuple(self.apply(b, draw) for b in batches)
