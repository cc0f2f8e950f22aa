"""Torch modules: feature extractor F, expert H, gate G, heads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

GROUPS_PER_NORM = 4
PROJECTOR_NORMS = ("batch", "none")  # the SSL projector's hidden-layer norm
CNN_POOLED_SIDE = 2


class CNNExtractor(nn.Module):
    """Two conv layers, pooled to a 2x2 map, projected to `feature_dim` features; `stride` is
    the first layer's (2 halves each side before the costly second layer: 28x28 images)."""

    def __init__(self, in_channels: int, channels: int, feature_dim: int, stride: int = 1) -> None:
        super().__init__()
        half = max(1, channels // 2)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, padding=1, stride=stride),
            nn.ReLU(),
            nn.Conv2d(half, channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(CNN_POOLED_SIDE),
            nn.Flatten(),
        )
        self.proj = nn.Sequential(nn.Linear(channels * CNN_POOLED_SIDE**2, feature_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x))


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (no running statistics to average)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.GroupNorm(min(GROUPS_PER_NORM, cout), cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.GroupNorm(min(GROUPS_PER_NORM, cout), cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False),
                nn.GroupNorm(min(GROUPS_PER_NORM, cout), cout),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class ResNetExtractor(nn.Module):
    """ResNet-style extractor for 32x32 RGB: 3 stages of `blocks` blocks, widths w, 2w, 4w."""

    def __init__(self, in_channels: int, width: int, blocks: int, feature_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.GroupNorm(min(GROUPS_PER_NORM, width), width),
            nn.ReLU(),
        ]
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(BasicBlock(cin, width * mult, stride))
                cin = width * mult
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Sequential(nn.Linear(cin, feature_dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))


class Expert(nn.Module):
    """Personal expert H: features -> class logits. With `input_norm` each feature row is first
    normalised to zero mean and unit variance across its features (a parameter-free LayerNorm):
    the expert then sees no feature scale (self-supervised features have norm ~1, supervised
    ones ~15), as the linear probe does not."""

    def __init__(
        self, feature_dim: int, hidden: int, num_classes: int, input_norm: bool = False
    ) -> None:
        super().__init__()
        norm: list[nn.Module] = (
            [nn.LayerNorm(feature_dim, elementwise_affine=False)] if input_norm else []
        )
        self.net = nn.Sequential(
            *norm, nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def mean_of_probabilities(*logits: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is the mean of the members' class probabilities (the log of it)."""
    probs = torch.stack([torch.softmax(z, dim=-1) for z in logits]).mean(dim=0)
    return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


class MeanOfProbabilities(nn.Module):
    """Several classifiers answering as one: `mean_of_probabilities` of their logits."""

    def __init__(self, *members: nn.Module) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return mean_of_probabilities(*(m(h) for m in self.members))


class Gate(nn.Module):
    """Gate G: features -> one score per expert id. `trunk` and `head` sync separately."""

    def __init__(self, feature_dim: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_experts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(h))


class Projector(nn.Module):
    """SSL projector on top of F: Linear -> norm -> ReLU -> Linear. `norm="batch"` is a
    BatchNorm over the batch without running statistics (every mode normalises by the batch at
    hand, so no statistics are averaged across clients): it keeps the spectral loss off its
    collapsed plateau (all embeddings alike, loss -1), where the plain MLP stays for hundreds of
    steps; `"none"` is the plain MLP."""

    def __init__(self, feature_dim: int, out_dim: int, norm: str = "batch") -> None:
        super().__init__()
        if norm not in PROJECTOR_NORMS:
            raise ValueError(f"unknown projector norm '{norm}' (one of {PROJECTOR_NORMS})")
        layers: list[nn.Module] = [nn.Linear(feature_dim, feature_dim)]
        if norm == "batch":
            layers.append(nn.BatchNorm1d(feature_dim, track_running_stats=False))
        self.net = nn.Sequential(*layers, nn.ReLU(), nn.Linear(feature_dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class ExtractorBundle(nn.Module):
    """Everything stage 1 trains and shares: F (`fe`), a linear CE head, an SSL projector."""

    def __init__(self, fe: nn.Module, head: nn.Linear, projector: Projector) -> None:
        super().__init__()
        self.fe = fe
        self.head = head
        self.projector = projector

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of F + the CE head (the stage-1 / FedAvg model)."""
        return self.head(self.fe(x))


def build_extractor(model_cfg: Any, image_shape: tuple[int, ...]) -> nn.Module:
    """Feature extractor F for the configured architecture."""
    channels = image_shape[0]
    if model_cfg.extractor == "cnn":
        return CNNExtractor(
            channels,
            int(model_cfg.cnn_channels),
            int(model_cfg.feature_dim),
            int(getattr(model_cfg, "cnn_stride", 1)),
        )
    if model_cfg.extractor == "resnet":
        return ResNetExtractor(
            channels,
            int(model_cfg.resnet_width),
            int(model_cfg.resnet_blocks),
            int(model_cfg.feature_dim),
        )
    raise ValueError(f"unknown extractor '{model_cfg.extractor}'")


# the parts of the stage-1 bundle each method trains (and so shares): FedCE never touches the
# projector, FedSC never the CE head; the untrained part stays at its seeded initialisation
STAGE1_PARTS = {
    "fedce": ("fe", "head"),
    "fedsc": ("fe", "projector"),
    "hybrid": ("fe", "head", "projector"),
}


def stage1_keys(bundle: ExtractorBundle, method: str) -> list[str]:
    """The bundle's parameter keys that stage-1 `method` trains."""
    parts = STAGE1_PARTS[method]
    return sorted(k for k in bundle.state_dict() if k.split(".", 1)[0] in parts)


def build_bundle(
    model_cfg: Any, image_shape: tuple[int, ...], num_classes: int, seed: int
) -> ExtractorBundle:
    """F + linear head + projector, initialised from `seed` (identical on every node)."""
    torch.manual_seed(seed)
    fe = build_extractor(model_cfg, image_shape)
    dim = int(model_cfg.feature_dim)
    projector = Projector(
        dim, int(model_cfg.projector_dim), str(getattr(model_cfg, "projector_norm", "batch"))
    )
    return ExtractorBundle(fe, nn.Linear(dim, num_classes), projector)


def build_expert(model_cfg: Any, num_classes: int, seed: int) -> Expert:
    """A freshly initialised expert."""
    torch.manual_seed(seed)
    return Expert(
        int(model_cfg.feature_dim),
        int(model_cfg.expert_hidden),
        num_classes,
        bool(getattr(model_cfg, "expert_input_norm", False)),
    )


def build_gate(model_cfg: Any, num_experts: int, seed: int) -> Gate:
    """A freshly initialised gate over `num_experts` expert ids."""
    torch.manual_seed(seed)
    return Gate(int(model_cfg.feature_dim), int(model_cfg.gate_hidden), num_experts)


def state_numpy(module: nn.Module, prefix: str = "") -> dict[str, Any]:
    """A module's parameters as numpy arrays, optionally keeping only one prefix."""
    return {
        k: v.detach().cpu().numpy() for k, v in module.state_dict().items() if k.startswith(prefix)
    }


def load_numpy(
    module: nn.Module,
    arrays: dict[str, Any],
    strict: bool = True,
    expected: list[str] | None = None,
) -> None:
    """Load numpy arrays into a module; shapes and key sets must match: all of the module's keys
    (`strict`), exactly `expected`, or (neither) any subset."""
    own = module.state_dict()
    allowed = set(own) if expected is None else set(expected)
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise ValueError(f"unknown parameter keys: {unknown[:5]}")
    if (strict or expected is not None) and set(arrays) != allowed:
        raise ValueError(f"missing parameter keys: {sorted(allowed - set(arrays))[:5]}")
    for key, value in arrays.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(
                f"shape mismatch for '{key}': got {tuple(value.shape)}, "
                f"expected {tuple(own[key].shape)}"
            )
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise ValueError(f"non-finite values (NaN/Inf) in '{key}'")
    module.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()}, strict=False)
