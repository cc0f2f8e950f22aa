"""Loss functions: FedSC's spectral contrastive objective, as Jing et al. (ICML 2024) define it
(reference code: github.com/ShusenJing/FedSC_ICML2024, `clients.py` Client_SPEC /
Client_SPECshare).

Projector outputs are clipped to squared norm `mu` (the reference's unit: the clip radius is
sqrt(mu)); R = Z^T Z / (2n) over both views stacked; the loss is
    -2/n tr(z1 z2^T) + alpha tr(R R) + 2 (1 - alpha) tr(R C_ext)
with C_ext the other clients' correlation of the current global model (a constant), and
alpha = 1 (no sharing) the local loss -2/n tr(z1 z2^T) + ||R||_F^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRIOR_FLOOR = 1e-4  # the prior of a class a client holds no image of (log: -9.2, nearly excluded)


def label_log_prior(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log of the label frequencies in `y` (absent classes at `PRIOR_FLOOR`): the client's prior
    that logit adjustment adds to its logits."""
    if len(y) == 0:
        raise ValueError("no labels to estimate a prior from")
    counts = torch.bincount(y, minlength=num_classes).float()
    return torch.log((counts / counts.sum()).clamp_min(PRIOR_FLOOR))


def adjusted_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, log_prior: torch.Tensor | None, tau: float = 1.0
) -> torch.Tensor:
    """Logit-adjusted cross entropy (Menon et al., ICLR 2021; Balanced Softmax, Ren et al.,
    NeurIPS 2020; in FL under label skew: FedLC, Zhang et al., ICML 2022): CE of
    logits + tau * log prior, so the raw logits model the label-balanced posterior and a client
    whose data holds few classes stops pulling the shared head towards them. None: plain CE."""
    if log_prior is None or tau == 0.0:
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), y)


def clip_embeddings(z: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale rows whose L2 norm exceeds `max_norm` down to it."""
    norms = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return z * torch.clamp(max_norm / norms, max=1.0)


def clip_to_mu(z: torch.Tensor, mu: float) -> torch.Tensor:
    """Rows with squared norm above `mu` scaled to norm sqrt(mu) (FedSC's clip; mu = radius^2)."""
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return clip_embeddings(z, mu**0.5)


def correlation(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """R = Z^T Z / (2n) with Z = [z1; z2] (both views stacked)."""
    z = torch.cat([z1, z2], dim=0)
    return z.T @ z / z.shape[0]


def fedsc_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    *,
    mu: float,
    c_ext: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSC's spectral contrastive loss on two views' (unclipped) projector outputs; returns
    (loss, R). Without `c_ext` (or alpha = 1) the repulsion is tr(R R) = ||R||_F^2; C_ext is a
    constant (no gradient flows into it)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"views must be matching (n, d) tensors, got {z1.shape}, {z2.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    z1, z2 = clip_to_mu(z1, mu), clip_to_mu(z2, mu)
    attraction = -2.0 / z1.shape[0] * (z1 * z2).sum()
    r = correlation(z1, z2)
    if c_ext is None or alpha == 1.0:
        repulsion = (r * r).sum()
    else:
        if c_ext.shape != r.shape:
            raise ValueError(f"c_ext has shape {tuple(c_ext.shape)}, expected {tuple(r.shape)}")
        c = c_ext.detach().to(r.dtype)
        repulsion = alpha * (r * r.T).sum() + 2.0 * (1.0 - alpha) * (r * c.T).sum()
    return attraction + repulsion, r
