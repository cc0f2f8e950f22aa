"""Loss functions: the spectral contrastive objective of FedSC."""

from __future__ import annotations

import torch


def clip_embeddings(z: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale rows whose L2 norm exceeds `max_norm` down to it (FedSC's norm clipping)."""
    norms = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return z * torch.clamp(max_norm / norms, max=1.0)


def correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Feature correlation matrix Z^T Z / N of both views stacked (Z = [z1; z2])."""
    z = torch.cat([z1, z2], dim=0)
    return z.T @ z / z.shape[0]


def spectral_contrastive_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    others_corr: torch.Tensor | None = None,
    others_weight: float = 0.0,
) -> torch.Tensor:
    """-2/N tr(z1 z2^T) + ||C||_F^2 with C = Z^T Z / N.

    With `others_corr` (the other clients' average correlation, detached), C is
    mixed as (1 - w) * C_local + w * others_corr: FedSC's shared-correlation
    regulariser, which pulls the local features towards a globally decorrelated
    representation.
    """
    n = z1.shape[0]
    attraction = -2.0 / n * torch.trace(z1 @ z2.T)
    corr = correlation(z1, z2)
    if others_corr is not None and others_weight > 0:
        corr = (1.0 - others_weight) * corr + others_weight * others_corr.detach()
    return attraction + (corr**2).sum()
