"""Standard training augmentation, computed on the CPU, reproducible and independent of the worker count.

Images up to :data:`SMALL_IMAGE_MAX` px get a random crop of the image padded by :data:`CROP_PADDING` then a
horizontal flip (torchvision's ``RandomCrop(size, padding=4)``); larger ones (ImageNet) a random resized crop
(torchvision's ``RandomResizedCrop`` algorithm) then the flip. The random parameters are drawn for the whole
*global* batch from (seed, epoch, batch index) and each worker applies its rows' share, so training is the
same on 1 and N workers and after a resume. On the CPU, where the batch was decoded, so the result does not
depend on the device. Pure torch: no torchvision, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Largest side (px) that gets the small-image recipe (pad-and-crop); larger images get the resized crop.
SMALL_IMAGE_MAX = 64
#: Zero padding on every side before the small-image random crop.
CROP_PADDING = 4
#: Area fraction of the random resized crop.
RRC_SCALE = (0.08, 1.0)
#: Aspect-ratio range (width / height) of the random resized crop, sampled log-uniformly.
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Tries at a box that fits before falling back to a centre crop (torchvision's count).
RRC_ATTEMPTS = 10


@dataclass(frozen=True)
class AugmentParams:
    """The random choices for every row of one global batch.

    ``top``/``left``/``height``/``width`` is each row's crop box: in the padded image for the small-image
    recipe (height and width are then the input size), in the original image for the resized crop.
    """

    top: torch.Tensor  # int64 [G]
    left: torch.Tensor  # int64 [G]
    height: torch.Tensor  # int64 [G]
    width: torch.Tensor  # int64 [G]
    flip: torch.Tensor  # bool [G]
    padding: int  # zero pixels added on every side before cropping (0 for the resized crop)

    def rows(self, offset: int, size: int) -> AugmentParams:
        """The parameters of rows [offset, offset + size): one worker's share of the global batch."""
        sl = slice(offset, offset + size)
        return AugmentParams(self.top[sl], self.left[sl], self.height[sl], self.width[sl], self.flip[sl], self.padding)


def is_small(shape: tuple[int, ...]) -> bool:
    """Whether images of shape (C, H, W) get the pad-and-crop recipe (else the random resized crop)."""
    return max(int(shape[-2]), int(shape[-1])) <= SMALL_IMAGE_MAX


def draw_params(global_size: int, shape: tuple[int, ...], seed: int) -> AugmentParams:
    """Draw the augmentation of a whole global batch of ``global_size`` images of shape (C, H, W).

    A function of (global_size, shape, seed) only: every worker draws the same parameters and keeps the
    rows of its share (:meth:`AugmentParams.rows`).
    """
    h, w = int(shape[-2]), int(shape[-1])
    gen = torch.Generator().manual_seed(int(seed))
    flip = torch.rand(global_size, generator=gen) < 0.5
    if is_small(shape):
        p = CROP_PADDING
        top = torch.randint(0, 2 * p + 1, (global_size,), generator=gen)
        left = torch.randint(0, 2 * p + 1, (global_size,), generator=gen)
        full_h = torch.full((global_size,), h, dtype=torch.int64)
        full_w = torch.full((global_size,), w, dtype=torch.int64)
        return AugmentParams(top, left, full_h, full_w, flip, p)
    return _resized_crop_boxes(global_size, h, w, gen, flip)


def _resized_crop_boxes(n: int, h: int, w: int, gen: torch.Generator, flip: torch.Tensor) -> AugmentParams:
    """torchvision's RandomResizedCrop box choice, vectorised: every row draws all of its attempts at once
    (so the draws do not depend on which attempts succeed) and keeps the first box that fits."""
    k = RRC_ATTEMPTS
    area = float(h * w)
    lo_s, hi_s = RRC_SCALE
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    target = area * (lo_s + (hi_s - lo_s) * torch.rand(n, k, generator=gen, dtype=torch.float64))
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, k, generator=gen, dtype=torch.float64))
    u_top = torch.rand(n, k, generator=gen, dtype=torch.float64)
    u_left = torch.rand(n, k, generator=gen, dtype=torch.float64)
    cw = torch.round(torch.sqrt(target * aspect)).long()
    ch = torch.round(torch.sqrt(target / aspect)).long()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    # first fitting attempt per row (argmax of a bool picks the first True; rows without one fall back)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    ch = ch.gather(1, first).squeeze(1)
    cw = cw.gather(1, first).squeeze(1)
    top = torch.floor(u_top.gather(1, first).squeeze(1) * (h - ch + 1).double()).long()
    left = torch.floor(u_left.gather(1, first).squeeze(1) * (w - cw + 1).double()).long()
    # fallback: the centre crop of the whole image, its ratio clamped into RRC_RATIO
    ratio = w / h
    if ratio < RRC_RATIO[0]:
        fw, fh = w, round(w / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        fh, fw = h, round(h * RRC_RATIO[1])
    else:
        fw, fh = w, h
    ch = torch.where(any_fit, ch, torch.full_like(ch, fh))
    cw = torch.where(any_fit, cw, torch.full_like(cw, fw))
    top = torch.where(any_fit, top, torch.full_like(top, (h - fh) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (w - fw) // 2))
    return AugmentParams(top, left, ch, cw, flip, 0)


def apply(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Augment the images ``x`` [n, C, H, W] (float, values in [0, 1]) with one parameter row each.

    Returns a new tensor of the same shape and dtype with values in [0, 1]; ``x`` is not modified.
    """
    n, _, h, w = x.shape
    if params.flip.numel() != n:
        raise ValueError(f"{params.flip.numel()} augmentation rows for a batch of {n} images")
    p = params.padding
    src = F.pad(x, (p, p, p, p)) if p else x
    out = torch.empty_like(x)
    for i in range(n):
        t, le = int(params.top[i]), int(params.left[i])
        ch, cw = int(params.height[i]), int(params.width[i])
        crop = src[i : i + 1, :, t : t + ch, le : le + cw]
        if (ch, cw) != (h, w):
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            crop = crop.clamp_(0.0, 1.0)  # interpolation weights are convex, but rounding may step outside
        out[i] = crop[0]
    flip = params.flip.to(torch.bool)
    if bool(flip.any()):
        out[flip] = out[flip].flip(-1)
    return out


def augment_share(x: torch.Tensor, *, seed: int, offset: int, global_size: int) -> torch.Tensor:
    """Augment one worker's share ``x`` (rows [offset, offset + len(x)) of a global batch of ``global_size``)
    with the global batch's parameters drawn from ``seed`` (see the module docstring for why)."""
    params = draw_params(global_size, tuple(x.shape[1:]), seed)
    return apply(x, params.rows(offset, x.shape[0]))
