"""Guards against results that fool only the guide: DVCE's cone projection of the
guide's gradient, and DNO-style regularization that keeps z_T typical of a standard Gaussian.
Both are maths on tensors; loop.py and guided_ddim.py apply them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch


@dataclass(frozen=True)
class Cone:
    """DVCE's cone (Augustin et al., NeurIPS 2022): every loss step, each item's gradient of
    the guide's loss with respect to its classifier views is projected onto the cone of
    half-angle `degrees` around the gradient of `reference` with respect to the same views
    (cone_projection). Terms of the image and latent alone (the distances) are not projected.

    reference: views (B, V, 3, S, S) -> (B,) a loss whose descent a second, robust classifier
    agrees with, e.g. objectives.ClassLoss(robust, class). Only its gradient's direction counts."""

    reference: Callable[[torch.Tensor], torch.Tensor]
    degrees: float

    def __post_init__(self) -> None:
        if not 0 < self.degrees <= 90:
            raise ValueError(f"the cone's half-angle must be in (0, 90] degrees, not {self.degrees}")


def cone_projection(g: torch.Tensor, r: torch.Tensor, degrees: float) -> torch.Tensor:
    """Each row of g (B, N) projected onto the circular cone of half-angle `degrees` around
    the same row of r (B, N). Returns (B, N).

    With theta the angle between g and r, the Euclidean projection onto the cone (the DVCE
    formula; its norm is |g| cos(theta - alpha), not g's: the part of g that leaves the cone
    is dropped, not rescaled back):
    - theta <= alpha: g itself, exactly;
    - alpha < theta < alpha + 90 deg: the vector at angle alpha from r in the plane of r and g,
      of length |g| cos(theta - alpha);
    - theta >= alpha + 90 deg: zero (nothing of g points into the cone).
    A row whose r is zero carries no direction, and its g is left as it is.
    """
    alpha = math.radians(degrees)
    # The angle test in float64: with r = c * g (a reference equal to the guide) the cosine
    # must not round below cos(alpha) for a small alpha.
    g64, r64 = g.double(), r.double()
    r_norm = r64.norm(dim=1, keepdim=True)  # (B, 1)
    r_unit = r64 / r_norm.clamp_min(1e-300)  # (B, N)
    along = (g64 * r_unit).sum(dim=1, keepdim=True)  # (B, 1) |g| cos(theta)
    across = g64 - along * r_unit  # (B, N) the part of g orthogonal to r
    across_norm = across.norm(dim=1, keepdim=True)  # (B, 1) |g| sin(theta)
    # g (anti)parallel to r leaves only rounding noise across it, which must not set a
    # direction: below 1e-12 of |g| the orthogonal part counts as none.
    negligible = across_norm <= 1e-12 * g64.norm(dim=1, keepdim=True)  # (B, 1)
    across_norm = torch.where(negligible, torch.zeros_like(across_norm), across_norm)
    across_unit = torch.where(negligible, torch.zeros_like(across), across / across_norm.clamp_min(1e-300))  # (B, N)
    inside = (along >= 0) & (across_norm <= along * math.tan(alpha)) if degrees < 90 else along >= 0  # (B, 1)
    # The cone's boundary ray in the plane of r and g, and g's length along it,
    # |g| (cos theta cos alpha + sin theta sin alpha), written with g's two parts (exact for
    # g parallel to r, which a dot product with the boundary would not be); negative: 0.
    boundary = math.cos(alpha) * r_unit + math.sin(alpha) * across_unit  # (B, N) unit
    length = (along * math.cos(alpha) + across_norm * math.sin(alpha)).clamp_min(0)  # (B, 1)
    projected = (length * boundary).to(g.dtype)  # (B, N)
    keep = inside | (r_norm == 0)  # (B, 1)
    return torch.where(keep, g, projected)


# noise_regularization: a kind of statistic counts as atypical where one of its K entries lies
# beyond the two-sided tail that a standard Gaussian z_T reaches with probability 0.27% in all
# K together (3 sd for one entry, 4.6 for 256, 5.2 for 4096): a single odd patch among many is
# seen, and a typical sample pays (almost) nothing however many patches it has.
TYPICAL_TAIL = 0.0027
# The patch sides (latent cells) whose per-channel statistics are tested, where the latent is
# at least that large: local drift (a spot pushed bright, a smoothed region) that the
# per-channel statistics average away.
NOISE_REG_PATCHES = (2, 4, 8)


def noise_statistics(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of z (B, C, h, w), each standardized so that for z ~ N(0, I) it has mean 0
    and variance 1 (exactly, from the moments of the normal distribution): name -> (B, K).

    - per channel: the mean (sd 1/sqrt(n)), the second moment about 0 (n times it is
      chi-square with n degrees of freedom: standardized by Wilson and Hilferty's cube root,
      near normal even for the 4 values of a 2 x 2 patch), the third (mean 0, sd sqrt(15/n))
      and the fourth (mean 3, sd sqrt(96/n)), n = h * w;
    - per channel, the lag-1 correlation of horizontal and of vertical neighbours, mean(z_i z_j)
      over the n' pairs (mean 0, sd 1/sqrt(n')): a smoothed latent shows it at once;
    - per channel and p x p patch, p in NOISE_REG_PATCHES: the mean and the second moment.
    """
    batch, channels, height, width = z.shape
    n = height * width
    flat = z.flatten(2)  # (B, C, n)
    moments = [flat.pow(k).mean(dim=2) for k in (1, 2, 3, 4)]  # 4 x (B, C)
    stats = {
        "channel_mean": moments[0] * math.sqrt(n),
        "channel_m2": chi_square_score(moments[1], n),
        "channel_m3": moments[2] * math.sqrt(n / 15),
        "channel_m4": (moments[3] - 3) * math.sqrt(n / 96),
    }
    if width > 1:
        pairs = z[..., :, 1:] * z[..., :, :-1]  # (B, C, h, w - 1)
        stats["neighbour_x"] = pairs.mean(dim=(2, 3)) * math.sqrt(pairs[0, 0].numel())
    if height > 1:
        pairs = z[..., 1:, :] * z[..., :-1, :]  # (B, C, h - 1, w)
        stats["neighbour_y"] = pairs.mean(dim=(2, 3)) * math.sqrt(pairs[0, 0].numel())
    for side in NOISE_REG_PATCHES:
        if height < side or width < side:
            continue
        m = side * side
        # Whole patches only; a remainder at the right or bottom edge is left out.
        patch_mean = torch.nn.functional.avg_pool2d(z, side)  # (B, C, h // side, w // side)
        patch_m2 = torch.nn.functional.avg_pool2d(z.square(), side)
        stats[f"patch{side}_mean"] = patch_mean.flatten(1) * math.sqrt(m)  # (B, C * patches)
        stats[f"patch{side}_m2"] = chi_square_score(patch_m2.flatten(1), m)
    return stats


def chi_square_score(second_moment: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of n squares of N(0, 1) values as a near-standard-normal score: Wilson and
    Hilferty's (x / n)^(1/3) ~ N(1 - 2 / (9n), 2 / (9n)) for x chi-square with n degrees."""
    spread = 2 / (9 * n)
    # Clamped off 0, where the cube root's gradient is infinite (an all-zero patch is atypical anyway).
    return (second_moment.clamp_min(1e-6).pow(1 / 3) - (1 - spread)) / math.sqrt(spread)


def typical_bound(entries: int) -> float:
    """The |score| that any of `entries` standard normal scores exceeds with probability TYPICAL_TAIL."""
    return NormalDist().inv_cdf(1 - TYPICAL_TAIL / (2 * entries))


def noise_regularization(z: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """How atypical z (B, C, h, w) is of a N(0, sigma^2) sample, per item: (B,), >= 0.

    In the spirit of DNO's probability regularization (Tang et al., ICML 2025): an optimized
    noise can drift to where a Gaussian sample has vanishing probability (reward hacking),
    which its statistics show. Each standardized statistic u (noise_statistics) of a kind
    with K entries costs (|u| - t_K)^2 / 2 beyond t_K = typical_bound(K), nothing inside: the
    negative log of a Gaussian tail bound relative to the typical range, added up over the
    entries and the kinds as log-probabilities of independent blocks add up. Typical noise
    pays (almost) nothing and is not pulled to the mode (zero mean and unit moments in every
    patch are themselves atypical).
    """
    costs = [
        0.5 * (u.abs() - typical_bound(u.shape[1])).clamp_min(0).square().sum(dim=1)  # (B,)
        for u in noise_statistics(z / sigma).values()
    ]
    return torch.stack(costs).sum(dim=0)
