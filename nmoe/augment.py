"""Two-view SSL augmentations that keep an image's identity, batched on tensors.

Images arrive standardised (the project's loaders subtract a mean and divide by a std), so a
geometric transform must fill uncovered pixels with the dataset's *background* in those units,
never with 0 (which is mid-grey after standardisation). Geometry (random resized crop, flip,
rotation, translation) is one affine map per sample applied with `grid_sample`; intensity and
colour changes are per-sample factors. Everything runs on the whole batch at once: torchvision's
v2 transforms draw one set of parameters per call, and calling them per image costs ~0.8 ms an
image on this machine (as much as the extractor's own forward and backward pass). The colour
operations follow torchvision.transforms.v2's definitions (ColorJitter's brightness, contrast,
saturation and hue, RandomGrayscale's luma weights) and are checked against them in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

Augment = Callable[..., torch.Tensor]  # (batch, generator=None) -> augmented batch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class AugmentPolicy:
    """Per-sample random transforms of one dataset (fractions are of the image side)."""

    crop_scale: tuple[float, float] = (1.0, 1.0)  # area kept by the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio of the crop
    flip: bool = False  # horizontal flips
    degrees: float = 0.0  # rotation in [-degrees, degrees]
    translate: float = 0.0  # shift in [-t, t] of the side
    brightness: float = 0.0  # intensity scaled by [1 - b, 1 + b] around the background
    contrast: float = 0.0  # blend with the image's mean by [1 - c, 1 + c]
    saturation: float = 0.0  # RGB only
    hue: float = 0.0  # RGB only, hue shift in [-h, h] turns
    jitter_p: float = 1.0  # probability of the intensity/colour jitter
    grayscale_p: float = 0.0  # RGB only
    noise_std: float = 0.0  # additive Gaussian noise (standardised units)


POLICIES: dict[str, AugmentPolicy] = {
    # 8x8 digits: a flip or a large crop changes the digit; sub-pixel geometry and mild intensity
    "digits": AugmentPolicy(
        crop_scale=(0.7, 1.0),
        crop_ratio=(0.85, 1.18),
        degrees=10.0,
        translate=0.08,
        brightness=0.3,
        contrast=0.3,
        jitter_p=0.8,
        noise_std=0.05,
    ),
    # 28x28 clothes on a black background: left/right flips keep the class, crops stay mild
    "fashion_mnist": AugmentPolicy(
        crop_scale=(0.35, 1.0),
        flip=True,
        degrees=10.0,
        translate=0.05,
        brightness=0.4,
        contrast=0.4,
        jitter_p=0.8,
    ),
    # SimCLR's CIFAR-10 policy (the FedSC reference uses exactly this)
    "cifar10": AugmentPolicy(
        crop_scale=(0.2, 1.0),
        flip=True,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        jitter_p=0.8,
        grayscale_p=0.2,
    ),
}
POLICY_ALIASES = {"fashion-mnist": "fashion_mnist", "fashionmnist": "fashion_mnist"}


def policy_for(dataset_name: str, strength: float = 1.0) -> AugmentPolicy:
    """The dataset's policy; `strength` scales every magnitude (0 = identity, 1 = the policy)."""
    name = POLICY_ALIASES.get(dataset_name.lower(), dataset_name.lower())
    if name not in POLICIES:
        raise ValueError(
            f"no augmentation policy for dataset '{dataset_name}' ({sorted(POLICIES)})"
        )
    if strength < 0:
        raise ValueError(f"augmentation strength must be >= 0, got {strength}")
    p = POLICIES[name]
    if strength == 1.0:
        return p
    lo = max(0.05, 1.0 - strength * (1.0 - p.crop_scale[0]))
    return replace(
        p,
        crop_scale=(min(lo, 1.0), 1.0),
        crop_ratio=tuple(math.exp(strength * math.log(r)) for r in p.crop_ratio),  # type: ignore[arg-type]
        degrees=p.degrees * strength,
        translate=p.translate * strength,
        brightness=p.brightness * strength,
        contrast=p.contrast * strength,
        saturation=p.saturation * strength,
        hue=p.hue * strength,
        noise_std=p.noise_std * strength,
        flip=p.flip and strength > 0,
        grayscale_p=p.grayscale_p * min(strength, 1.0),
        jitter_p=p.jitter_p if strength > 0 else 0.0,
    )


def background_value(images: torch.Tensor) -> float:
    """Background of standardised grey images: their minimum, the normalised black pixel."""
    return float(images.min())


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _geometry(n: int, policy: AugmentPolicy, generator: torch.Generator | None) -> torch.Tensor:
    """(n, 2, 3) affine maps from output to input coordinates ([-1, 1] square)."""
    area = _uniform(n, *policy.crop_scale, generator)
    log_ratio = _uniform(n, *(math.log(r) for r in policy.crop_ratio), generator)
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1.0 - width) * _uniform(n, -1.0, 1.0, generator)
    cy = (1.0 - height) * _uniform(n, -1.0, 1.0, generator)
    angle = torch.deg2rad(_uniform(n, -policy.degrees, policy.degrees, generator))
    tx = 2.0 * _uniform(n, -policy.translate, policy.translate, generator)
    ty = 2.0 * _uniform(n, -policy.translate, policy.translate, generator)
    flip = (
        torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        if policy.flip
        else torch.ones(n)
    )
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    # input = diag(width, height) @ rotation @ diag(flip, 1) @ output + centre + shift
    theta[:, 0, 0] = width * cos * flip
    theta[:, 0, 1] = -width * sin
    theta[:, 1, 0] = height * sin * flip
    theta[:, 1, 1] = height * cos
    theta[:, 0, 2] = cx + tx
    theta[:, 1, 2] = cy + ty
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Bilinear affine warp; pixels from outside the image take the `background` value."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    shifted = images - background
    return F.grid_sample(shifted, grid, align_corners=False, padding_mode="zeros") + background


def _grey(rgb: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(LUMA, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


def _factors(n: int, magnitude: float, generator: torch.Generator | None) -> torch.Tensor:
    return _uniform(n, max(0.0, 1.0 - magnitude), 1.0 + magnitude, generator).view(n, 1, 1, 1)


def adjust_hue(rgb: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift (in turns) of RGB images in [0, 1], through HSV like torchvision."""
    r, g, b = rgb.unbind(dim=1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), 0.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    i = i.long() % 6
    candidates = torch.stack(
        [
            torch.stack([v, q, p, p, t, v], dim=1),
            torch.stack([t, v, v, q, p, p], dim=1),
            torch.stack([p, p, t, v, v, q], dim=1),
        ],
        dim=1,
    )  # (n, 3 channels, 6 sectors, H, W)
    index = i.unsqueeze(1).unsqueeze(2).expand(-1, 3, 1, -1, -1)
    return candidates.gather(2, index).squeeze(2)


def _colour(
    rgb: torch.Tensor, policy: AugmentPolicy, generator: torch.Generator | None
) -> torch.Tensor:
    """ColorJitter (brightness, contrast, saturation, hue; fixed order) on [0, 1] RGB, then
    RandomGrayscale."""
    n = rgb.shape[0]
    jitter = (torch.rand(n, generator=generator) < policy.jitter_p).view(n, 1, 1, 1)
    out = rgb
    if policy.brightness > 0:
        out = (out * _factors(n, policy.brightness, generator)).clamp(0, 1)
    if policy.contrast > 0:
        mean = _grey(out).mean(dim=(1, 2, 3), keepdim=True)
        c = _factors(n, policy.contrast, generator)
        out = (c * out + (1 - c) * mean).clamp(0, 1)
    if policy.saturation > 0:
        s = _factors(n, policy.saturation, generator)
        out = (s * out + (1 - s) * _grey(out)).clamp(0, 1)
    if policy.hue > 0:
        out = adjust_hue(out, _uniform(n, -policy.hue, policy.hue, generator))
    out = torch.where(jitter, out, rgb)
    if policy.grayscale_p > 0:
        grey = (torch.rand(n, generator=generator) < policy.grayscale_p).view(n, 1, 1, 1)
        out = torch.where(grey, _grey(out).expand_as(out), out)
    return out


def _intensity(
    images: torch.Tensor,
    policy: AugmentPolicy,
    background: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Grey images: brightness scales the ink above the background, contrast blends with the
    image's mean; the background stays where it is under brightness."""
    n = images.shape[0]
    jitter = (torch.rand(n, generator=generator) < policy.jitter_p).view(n, 1, 1, 1)
    out = images
    if policy.brightness > 0:
        out = background + (out - background) * _factors(n, policy.brightness, generator)
    if policy.contrast > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        c = _factors(n, policy.contrast, generator)
        out = c * out + (1 - c) * mean
    return torch.where(jitter, out, images)


def ssl_augmentation(
    dataset_name: str,
    image_shape: tuple[int, ...],
    background: float | tuple[float, ...],
    *,
    strength: float = 1.0,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
) -> Augment:
    """A batched view generator `augment(batch, generator=None)` for one dataset.

    `background` is the fill value in the images' standardised units (one per channel or one for
    all): for grey sets the normalised black pixel (`background_value`). RGB sets get their
    colour jitter in [0, 1] space, through `mean`/`std` (the standardisation the loader used).
    """
    policy = policy_for(dataset_name, strength)
    channels = image_shape[0]
    fill = torch.as_tensor(background, dtype=torch.float32).reshape(-1)
    if fill.numel() not in (1, channels):
        raise ValueError(f"background has {fill.numel()} values for {channels} channels")
    fill = fill.view(1, -1, 1, 1)
    rgb = channels == 3
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if batch.dim() != 4 or tuple(batch.shape[1:]) != tuple(image_shape):
            raise ValueError(f"expected a batch of {tuple(image_shape)} images, got {batch.shape}")
        n = batch.shape[0]
        x = warp(batch, _geometry(n, policy, generator), fill)
        if rgb:
            if policy.jitter_p > 0 or policy.grayscale_p > 0:
                x = (_colour((x * std_t + mean_t).clamp(0, 1), policy, generator) - mean_t) / std_t
        elif policy.jitter_p > 0 and (policy.brightness > 0 or policy.contrast > 0):
            x = _intensity(x, policy, fill, generator)
        if policy.noise_std > 0:
            x = x + policy.noise_std * torch.randn(x.shape, generator=generator)
        return x

    return augment
