"""Stage 1 as the FedSC reference defines it, on fixed tensors (no Flower, no data files).

1. The FedSC loss (clip in mu units, R over both views, alpha tr(RR) + 2 (1 - alpha) tr(R C_ext))
   against an independent float64 loop transcription of the reference: values and gradients.
2. Shared correlations: a client's matrix (eval mode, received model), the others' average, the
   alpha ramp and the cosine learning rate.
3. The local update: one step equals hand-written SGD (momentum, weight decay, gradient clip);
   labelled masks; what each method trains.
4. Augmentations: background fill, geometry, torchvision-equivalent colour ops, identity kept.
5. The linear probe: standardised features, scale-free.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from nmoe.augment import (
    POLICIES,
    adjust_hue,
    background_value,
    policy_for,
    ssl_augmentation,
    warp,
)
from nmoe.losses import clip_to_mu, fedsc_loss
from nmoe.models import CNNExtractor, ExtractorBundle, Projector
from nmoe.probe import linear_probe
from nmoe.ssl import (
    Stage1Settings,
    client_correlation,
    local_update,
    others_average,
    round_lr,
    shared_alpha,
    ssl_validation_loss,
)

MUS = (0.25, 1.0, 4.0, 1e6)


# ---------------------------------------------------------------------------- 1. loss
def reference_loss(z1: list[list[float]], z0: list[list[float]], mu: float, c_ext=None, alpha=1.0):
    """Client_SPECshare.loss transcribed with float loops: rows with norm >= sqrt(mu) are
    normalised to sqrt(mu); posloss = -2/n sum_i z1_i.z0_i; R = Z^T Z / (2n) over both views;
    negaloss = alpha tr(R R) + 2 (1 - alpha) tr(R C_ext), or ||R||_F^2 without C_ext."""

    def clip(rows):
        out = []
        for row in rows:
            norm = math.sqrt(sum(v * v for v in row))
            out.append(row if norm < math.sqrt(mu) else [v / norm * math.sqrt(mu) for v in row])
        return out

    a, b = clip(z1), clip(z0)
    n, d = len(a), len(a[0])
    pos = -2.0 / n * sum(a[i][k] * b[i][k] for i in range(n) for k in range(d))
    rows = a + b
    r = [[sum(z[p] * z[q] for z in rows) / (2 * n) for q in range(d)] for p in range(d)]
    rr = sum(r[p][q] * r[q][p] for p in range(d) for q in range(d))
    if c_ext is None:
        return pos + sum(r[p][q] ** 2 for p in range(d) for q in range(d))
    rc = sum(r[p][q] * c_ext[q][p] for p in range(d) for q in range(d))
    return pos + alpha * rr + 2.0 * (1.0 - alpha) * rc


def numeric_grad(f, z: list[list[float]], eps: float = 1e-6) -> np.ndarray:
    grad = np.zeros((len(z), len(z[0])))
    for i in range(len(z)):
        for k in range(len(z[0])):
            up = [row[:] for row in z]
            down = [row[:] for row in z]
            up[i][k] += eps
            down[i][k] -= eps
            grad[i, k] = (f(up) - f(down)) / (2 * eps)
    return grad


def _pair(seed: int, n: int = 5, d: int = 3, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    z1 = scale * torch.randn(n, d, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * scale * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return z1, z2


def _cext(seed: int, d: int = 3) -> torch.Tensor:
    raw = torch.randn(d, d + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return raw @ raw.T / (d + 2)


@pytest.mark.parametrize("mu", MUS)
def test_local_loss_and_gradient_match_the_reference(mu: float) -> None:
    for seed in range(3):
        z1, z2 = _pair(seed, scale=1.5)
        a = z1.clone().requires_grad_(True)
        b = z2.clone().requires_grad_(True)
        loss, r = fedsc_loss(a, b, mu=mu)
        expected = reference_loss(z1.tolist(), z2.tolist(), mu)
        assert float(loss.detach()) == pytest.approx(expected, rel=1e-10, abs=1e-12)
        loss.backward()
        l1, l2 = z1.tolist(), z2.tolist()
        ga = numeric_grad(lambda z, other=l2: reference_loss(z, other, mu), l1)
        gb = numeric_grad(lambda z, other=l1: reference_loss(other, z, mu), l2)
        np.testing.assert_allclose(a.grad.numpy(), ga, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b.grad.numpy(), gb, rtol=1e-5, atol=1e-7)
        assert torch.allclose(r, r.T)


@pytest.mark.parametrize("mu", MUS)
@pytest.mark.parametrize("alpha", (1.0, 0.6, 0.2, 0.0))
def test_shared_loss_and_gradient_match_the_reference(mu: float, alpha: float) -> None:
    c_ext = _cext(7)
    z1, z2 = _pair(11, n=4, d=3, scale=1.2)
    a = z1.clone().requires_grad_(True)
    ext = c_ext.clone().requires_grad_(True)
    loss, _ = fedsc_loss(a, z2, mu=mu, c_ext=ext, alpha=alpha)
    ref_ext = c_ext.tolist()
    expected = reference_loss(z1.tolist(), z2.tolist(), mu, ref_ext, alpha)
    assert float(loss) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    loss.backward()
    assert ext.grad is None, "C_ext is a constant"
    grad = numeric_grad(lambda z: reference_loss(z, z2.tolist(), mu, ref_ext, alpha), z1.tolist())
    np.testing.assert_allclose(a.grad.numpy(), grad, rtol=1e-5, atol=1e-7)


def test_repulsion_gradient_is_the_references_not_a_mixture() -> None:
    """dLoss/dR = 2 alpha R + 2 (1 - alpha) C_ext: the full local repulsion at alpha = 1, not the
    (1 - w) share of ||(1 - w) R + w C_ext||^2."""
    z1, z2 = _pair(3, n=6, d=4)
    c_ext = _cext(4, d=4)
    for alpha in (1.0, 0.5, 0.2):
        r = torch.cat([z1, z2]).T @ torch.cat([z1, z2]) / 12
        r.requires_grad_(True)
        rep = alpha * (r * r.T).sum() + 2 * (1 - alpha) * (r * c_ext.T).sum()
        (grad,) = torch.autograd.grad(rep, r)
        assert torch.allclose(grad, 2 * alpha * r.detach() + 2 * (1 - alpha) * c_ext)
    # alpha = 1 ignores C_ext entirely
    with_ext, _ = fedsc_loss(z1, z2, mu=4.0, c_ext=c_ext, alpha=1.0)
    without, _ = fedsc_loss(z1, z2, mu=4.0)
    assert float(with_ext) == float(without)


def test_clip_is_in_mu_units_and_fixes_the_loss_floor() -> None:
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]])
    for mu in (1.0, 4.0, 9.0):
        clipped = clip_to_mu(z, mu)
        assert float(clipped.norm(dim=1).max()) == pytest.approx(min(mu**0.5, 10.0), rel=1e-6)
        assert torch.equal(clipped[1], z[1])
    # k equally used orthogonal directions at squared norm m: loss -2m + m^2/k; the collapsed
    # solution (k = 1) sits at -1 whatever mu >= 1, four directions at mu = 4 reach -4
    four = 2.0 * torch.eye(4, dtype=torch.float64)
    assert float(fedsc_loss(four, four, mu=4.0)[0]) == pytest.approx(-4.0)
    assert float(fedsc_loss(four, four, mu=1.0)[0]) == pytest.approx(-2.0 + 1.0 / 4)
    collapsed = torch.ones(8, 1, dtype=torch.float64).repeat(1, 3) / math.sqrt(3)
    assert float(fedsc_loss(collapsed, collapsed, mu=4.0)[0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="mu"):
        clip_to_mu(z, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        fedsc_loss(z, z, mu=1.0, alpha=1.5)


# ---------------------------------------------------------------------------- 2. sharing
def _bundle(seed: int = 0, dropout: bool = False) -> ExtractorBundle:
    torch.manual_seed(seed)
    fe = CNNExtractor(1, 4, 8)
    projector = Projector(8, 5)
    if dropout:  # makes train and eval mode differ
        projector.net = nn.Sequential(nn.Dropout(0.5), *projector.net)
    return ExtractorBundle(fe, nn.Linear(8, 3), projector)


def _noise_augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    return batch + 0.1 * torch.randn(batch.shape, generator=generator)


def test_client_correlation_is_the_references_compcov() -> None:
    bundle = _bundle(dropout=True)
    bundle.train()
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    mu, passes, batch = 0.5, 3, 4
    got = client_correlation(
        bundle, x, _noise_augment, mu=mu, passes=passes, batch_size=batch,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert bundle.training, "the caller's mode is restored"
    # the same views, drawn in the same order, summed by hand in float64 in eval mode
    gen = torch.Generator().manual_seed(5)
    bundle.eval()
    expected = torch.zeros(5, 5, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(passes):
            for xb in x.split(batch):
                v0, v1 = _noise_augment(xb, gen), _noise_augment(xb, gen)
                # both views of a batch pass the projector together (its BatchNorm normalises
                # over the batch at hand, in every mode)
                for z in bundle.projector(bundle.fe(torch.cat([v0, v1]))).double():
                    norm = float(z.norm())
                    z = z if norm < mu**0.5 else z / norm * mu**0.5
                    expected += torch.outer(z, z)
    expected /= passes * len(x) * 2
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert torch.allclose(got, got.T, atol=1e-7)
    assert float(torch.linalg.eigvalsh(got.double()).min()) > -1e-6
    noisy = client_correlation(
        bundle, x, _noise_augment, mu=mu, passes=passes, batch_size=batch, noise_std=0.01,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert 0.001 < float((noisy - got).std()) < 0.02


def test_others_average_leaves_each_client_out() -> None:
    gen = torch.Generator().manual_seed(0)
    corrs = [torch.randn(3, 3, generator=gen) for _ in range(4)]
    for i, avg in enumerate(others_average(corrs)):
        others = [c for j, c in enumerate(corrs) if j != i]
        assert torch.allclose(avg, sum(others) / 3, atol=1e-6)
    with pytest.raises(ValueError):
        others_average(corrs[:1])


def test_alpha_ramp_and_cosine_learning_rate_follow_the_reference() -> None:
    rounds = 10
    alphas = [shared_alpha(r, rounds) for r in range(rounds)]
    assert alphas[0] == 1.0
    assert alphas[-1] == pytest.approx(0.2 + 0.8 / rounds)
    assert np.allclose(np.diff(alphas), -0.8 / rounds)
    with pytest.raises(ValueError):
        shared_alpha(rounds, rounds)
    # one CosineAnnealingLR(T_max=rounds) step per round, read through the optimiser
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.03)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, rounds)
    for r in range(rounds):
        assert round_lr(0.03, r, rounds) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sched.step()
    assert round_lr(0.03, 5, rounds, cosine=False) == 0.03


# ---------------------------------------------------------------------------- 3. local update
def _data(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _manual_step(
    bundle: ExtractorBundle,
    loss_fn,
    params: list[nn.Parameter],
    lr: float,
    wd: float,
    clip: float,
) -> None:
    """First SGD step with momentum from a fresh optimiser: p -= lr * (clip(g) + wd * p)."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    scale = min(1.0, clip / (float(norm) + 1e-6)) if clip > 0 else 1.0
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= lr * (g * scale + wd * p)


@pytest.mark.parametrize("shared", (False, True))
@pytest.mark.parametrize("mu", (1.0, 4.0))
def test_one_fedsc_step_is_hand_written_sgd(shared: bool, mu: float) -> None:
    x, y = _data()
    c_ext = _cext(3, d=5).float() if shared else None
    alpha = 0.4 if shared else 1.0
    settings = Stage1Settings(method="fedsc", epochs=1, batch_size=len(x), mu=mu, grad_clip=0.05)
    got = _bundle()
    result = local_update(
        got, x, y, None, settings=settings, lr=0.1, seed=9, augment=_noise_augment,
        c_ext=c_ext, alpha=alpha,
    )  # fmt: skip
    assert result.steps == 1 and result.ce_loss == 0.0
    expected = _bundle()
    gen = torch.Generator().manual_seed(9)
    perm = torch.randperm(len(x), generator=gen)
    v0, v1 = _noise_augment(x[perm], gen), _noise_augment(x[perm], gen)
    params = [*expected.fe.parameters(), *expected.projector.parameters()]

    def loss_fn() -> torch.Tensor:  # both views through the projector's BatchNorm together
        z0, z1 = expected.projector(expected.fe(torch.cat([v0, v1]))).chunk(2)
        return fedsc_loss(z0, z1, mu=mu, c_ext=c_ext, alpha=alpha)[0]

    assert result.ssl_loss == pytest.approx(float(loss_fn()), rel=1e-5)
    _manual_step(expected, loss_fn, params, lr=0.1, wd=5e-4, clip=0.05)
    for (name, a), b in zip(got.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    # the clip bounds the step: ||delta|| <= lr * (clip + wd ||p||)
    start = [*_bundle().fe.parameters(), *_bundle().projector.parameters()]
    moved = [*got.fe.parameters(), *got.projector.parameters()]
    delta = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(moved, start, strict=True)))
    size = torch.sqrt(sum((p**2).sum() for p in start))
    assert float(delta) <= 0.1 * (0.05 + 5e-4 * float(size)) + 1e-6


def test_each_method_trains_its_parts_and_ce_sees_only_labelled_images() -> None:
    x, y = _data(16)
    labelled = torch.zeros(16, dtype=torch.bool)
    labelled[:5] = True
    init = _bundle().state_dict()

    def run(method: str, xs=x, ys=y, **kw) -> dict[str, torch.Tensor]:
        bundle = _bundle()
        settings = Stage1Settings(method=method, epochs=1, batch_size=8, **kw)
        result = local_update(
            bundle, xs, ys, labelled, settings=settings, lr=0.05, seed=3, augment=_noise_augment
        )
        assert math.isfinite(result.loss) and result.steps > 0
        return bundle.state_dict()

    trained = {
        "fedce": ("fe.", "head."),
        "fedsc": ("fe.", "projector."),
        "hybrid": ("fe.", "head.", "projector."),
    }
    relabelled = y.clone()
    relabelled[~labelled] = (y[~labelled] + 1) % 3
    other_images = x.clone()
    other_images[~labelled] += 1.0
    for method, parts in trained.items():
        state = run(method)
        for key, value in state.items():
            assert (not torch.equal(value, init[key])) == key.startswith(parts), (method, key)
        # the labels of unlabelled images are never read
        assert all(torch.equal(state[k], v) for k, v in run(method, ys=relabelled).items())
    # FedCE never sees an unlabelled image; the SSL methods do
    assert all(torch.equal(run("fedce")[k], v) for k, v in run("fedce", other_images).items())
    changed = run("hybrid", other_images)
    assert not all(torch.equal(run("hybrid")[k], v) for k, v in changed.items())
    # with lambda = 0 and one epoch, hybrid moves F exactly as FedCE on the same batches
    one = {"epochs": 1, "batch_size": 16}
    labelled[:] = True
    ce = _bundle()
    local_update(ce, x, y, None, settings=Stage1Settings("fedce", **one), lr=0.05, seed=4)
    hyb = _bundle()
    local_update(
        hyb, x, y, None, settings=Stage1Settings("hybrid", ssl_weight=0.0, **one), lr=0.05,
        seed=4, augment=_noise_augment,
    )  # fmt: skip
    for (k, a), b in zip(ce.fe.state_dict().items(), hyb.fe.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), k


def test_local_update_rejects_bad_input() -> None:
    x, y = _data()
    settings = Stage1Settings("fedsc", batch_size=6)
    with pytest.raises(ValueError, match="augmentation"):
        local_update(_bundle(), x, y, None, settings=settings, lr=0.05, seed=0)
    with pytest.raises(ValueError, match="mask"):
        local_update(
            _bundle(), x, y, torch.ones(3, dtype=torch.bool), settings=settings, lr=0.05, seed=0,
            augment=_noise_augment,
        )  # fmt: skip
    with pytest.raises(ValueError, match="method"):
        Stage1Settings("byol")
    with pytest.raises(FloatingPointError):
        local_update(
            _bundle(), x * float("nan"), y, None, settings=settings, lr=0.05, seed=0,
            augment=_noise_augment,
        )  # fmt: skip


# ---------------------------------------------------------------------------- 4. augment
def _digits(side: int = 8, channels: int = 1) -> tuple[torch.Tensor, float]:
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images / 16.0).float()[:300, None]
    if side != 8:
        images = nn.functional.interpolate(images, size=side, mode="bilinear")
    images = images.repeat(1, channels, 1, 1)
    standardised = (images - images.mean()) / images.std()
    return standardised, background_value(standardised)


def test_geometry_fills_with_the_background() -> None:
    x, bg = _digits(28)
    assert bg == pytest.approx(float(x.min())) and bg < -0.5
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)
    assert torch.allclose(warp(x[:4], identity, torch.tensor(bg)), x[:4], atol=1e-5)
    flip = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)
    assert torch.allclose(warp(x[:4], flip, torch.tensor(bg)), x[:4].flip(-1), atol=1e-5)
    # shift the content half an image to the right: the left half is pure background
    shift = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).expand(4, 2, 3)
    shifted = warp(x[:4] + 5.0, shift, torch.tensor(bg))
    assert torch.allclose(shifted[..., :13], torch.full_like(shifted[..., :13], bg), atol=1e-5)
    # an empty (all-background) image stays exactly background under every grey policy
    for name, side in (("digits", 8), ("fashion_mnist", 28)):
        augment = ssl_augmentation(name, (1, side, side), bg, strength=2.0)
        blank = torch.full((16, 1, side, side), bg)
        out = augment(blank, torch.Generator().manual_seed(0))
        noise = policy_for(name, 2.0).noise_std
        assert float((out - bg).abs().max()) <= 6 * noise + 1e-5, name


def test_colour_ops_match_torchvision() -> None:
    from torchvision.transforms.v2 import functional as tvf

    rgb = torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    for shift in (-0.1, 0.05, 0.3):
        ours = adjust_hue(rgb, torch.full((6,), shift))
        assert torch.allclose(ours, tvf.adjust_hue(rgb, shift), atol=1e-5), shift
    grey = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((rgb * grey).sum(1, keepdim=True), tvf.rgb_to_grayscale(rgb), atol=1e-6)


@pytest.mark.parametrize(
    "name,side,channels", [("digits", 8, 1), ("fashion_mnist", 28, 1), ("cifar10", 32, 3)]
)
def test_views_keep_the_image_identity(name: str, side: int, channels: int) -> None:
    x, bg = _digits(side, channels)
    fill = bg if channels == 1 else tuple(float(x[:, c].min()) for c in range(channels))
    augment = ssl_augmentation(name, (channels, side, side), fill)
    gen = torch.Generator().manual_seed(1)
    v1, v2 = augment(x, gen), augment(x, gen)
    assert v1.shape == x.shape and torch.isfinite(v1).all()
    assert not torch.allclose(v1, v2)
    # two views of one image are closer than views of two different images (pixel space), and
    # far closer than the audit's 0.95 of the image's norm under a grey (0) fill on digits
    same = (v1 - v2).flatten(1).norm(dim=1)
    different = (v1 - v2.roll(1, 0)).flatten(1).norm(dim=1)
    relative = same / (x - torch.as_tensor(fill).view(1, -1, 1, 1)).flatten(1).norm(dim=1)
    assert float(same.median()) < float(different.median())
    if name == "digits":
        assert float(same.median()) < 0.75 * float(different.median())
        assert float(relative.median()) < 0.7


def test_policies_by_dataset() -> None:
    assert not POLICIES["digits"].flip and POLICIES["fashion_mnist"].flip
    assert POLICIES["cifar10"].crop_scale == (0.2, 1.0) and POLICIES["cifar10"].grayscale_p == 0.2
    assert policy_for("Fashion-MNIST") == POLICIES["fashion_mnist"]
    weak = policy_for("fashion_mnist", 0.5)
    assert weak.degrees == POLICIES["fashion_mnist"].degrees / 2
    assert weak.crop_scale[0] > POLICIES["fashion_mnist"].crop_scale[0]
    none = policy_for("digits", 0.0)
    x, bg = _digits()
    identity = ssl_augmentation("digits", (1, 8, 8), bg, strength=0.0)
    assert none.noise_std == 0.0 and torch.allclose(identity(x), x, atol=1e-5)
    with pytest.raises(ValueError, match="policy"):
        policy_for("imagenet")
    with pytest.raises(ValueError, match="batch"):
        identity(x[0])


# ---------------------------------------------------------------------------- 5. probe
def test_probe_is_scale_free_and_standardised() -> None:
    gen = np.random.default_rng(0)
    y = gen.integers(0, 3, 600)
    signal = np.eye(3)[y] + 0.8 * gen.normal(size=(600, 3))
    feats = np.concatenate([signal, gen.normal(size=(600, 5))], axis=1)
    base = linear_probe(feats[:400], y[:400], feats[400:], y[400:])
    assert base > 0.6
    scales = np.array([1e-3, 1e3, 1.0, 10, 0.1, 1, 1, 1])
    scaled = linear_probe(feats[:400] * scales, y[:400], feats[400:] * scales, y[400:])
    assert scaled == pytest.approx(base, abs=0.006)
    shifted = linear_probe(feats[:400] + 50, y[:400], feats[400:] + 50, y[400:])
    assert shifted == pytest.approx(base, abs=0.006)
    dead = np.concatenate([feats, np.zeros((600, 2))], axis=1)
    assert linear_probe(dead[:400], y[:400], dead[400:], y[400:]) == pytest.approx(base, abs=0.006)
    with pytest.raises(ValueError):
        linear_probe(feats[:400], y[:300], feats[400:], y[400:])
    with pytest.raises(ValueError, match="non-finite"):
        linear_probe(feats[:400] * np.nan, y[:400], feats[400:], y[400:])


def test_expert_input_norm_makes_experts_scale_free() -> None:
    from nmoe.models import Expert

    torch.manual_seed(0)
    plain, normed = Expert(6, 8, 3), Expert(6, 8, 3, input_norm=True)
    assert [k for k, _ in normed.named_parameters()] == ["net.1.weight", "net.1.bias"] + [
        "net.3.weight",
        "net.3.bias",
    ]
    h = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(normed(h), normed(100 * h), atol=1e-4)
    assert not torch.allclose(plain(h), plain(100 * h), atol=1e-2)


# ---------------------------------------------------------------------------- 5. collapse
def _digits_pool() -> tuple[torch.Tensor, torch.Tensor]:
    from nmoe.data import load_digits_arrays

    data = load_digits_arrays()
    return torch.as_tensor(data.images[:600]), torch.as_tensor(data.labels[:600])


def test_batch_norm_projector_leaves_the_collapsed_plateau() -> None:
    """The spectral loss's collapsed solution (all embeddings alike, norm 1) scores exactly -1;
    with the plain MLP projector FedSC sits there for hundreds of steps (the probe then trails a
    random extractor). The batch-normalised projector leaves it within a few dozen steps."""
    x, y = _digits_pool()
    augment = ssl_augmentation("digits", (1, 8, 8), float(x.min()))
    settings = Stage1Settings("fedsc", epochs=3, batch_size=64)
    losses = {}
    for norm in ("none", "batch"):
        torch.manual_seed(0)
        fe = CNNExtractor(1, 32, 64)
        bundle = ExtractorBundle(fe, nn.Linear(64, 10), Projector(64, 64, norm))
        result = local_update(bundle, x, y, None, settings=settings,
                              lr=0.05, seed=0, augment=augment)  # fmt: skip
        losses[norm] = ssl_validation_loss(bundle, x, augment, mu=4.0, seed=1)
        assert math.isfinite(result.loss)
    print(f"FedSC loss after 30 steps: plain projector {losses['none']:.3f}, "
          f"batch-norm projector {losses['batch']:.3f}")  # fmt: skip
    assert losses["none"] > -1.5  # on the plateau of the collapsed solution
    assert losses["batch"] < -3.0  # well below it: the embeddings spread over many directions
    with pytest.raises(ValueError, match="projector norm"):
        Projector(8, 5, "layer")


def test_the_validation_loss_normalises_both_views_in_one_batch_as_training_does() -> None:
    """FedSC's validation score is the training loss's form: both views through the batch-norm
    projector together (separately, each view would be normalised by its own statistics)."""
    x, _ = _digits_pool()
    x = x[:128]
    augment = ssl_augmentation("digits", (1, 8, 8), float(x.min()))
    torch.manual_seed(0)
    bundle = ExtractorBundle(CNNExtractor(1, 32, 64), nn.Linear(64, 10), Projector(64, 64, "batch"))
    generator = torch.Generator().manual_seed(5)
    v1, v2 = augment(x, generator), augment(x, generator)
    bundle.eval()
    with torch.no_grad():
        z = bundle.projector(bundle.fe(torch.cat([v1, v2])))
        together, _ = fedsc_loss(z[:128], z[128:], mu=4.0)
        apart, _ = fedsc_loss(bundle.projector(bundle.fe(v1)), bundle.projector(bundle.fe(v2)),
                              mu=4.0)  # fmt: skip
    bundle.train()
    score = ssl_validation_loss(bundle, x, augment, mu=4.0, seed=5)
    assert score == pytest.approx(float(together), abs=1e-6)
    assert abs(float(apart) - float(together)) > 1e-4  # the two forms differ: the test can fail
    assert bundle.training  # the bundle's mode is restored


def test_stage1_validation_loss_is_the_objective_each_method_trains() -> None:
    """FedCE: CE on the labelled held-out images; FedSC: its SSL loss on all of them; hybrid:
    CE + ssl_weight x SSL (on CE alone, hybrid's patience kept its first round's F on digits:
    CE sat at chance while the SSL part reshaped the features). None where nothing scores."""
    from nmoe.training import stage1_validation_loss, validation_loss

    x, y = _digits_pool()
    x, y = x[:96], y[:96]
    labelled = torch.arange(96) % 3 == 0
    augment = ssl_augmentation("digits", (1, 8, 8), float(x.min()))
    torch.manual_seed(0)
    bundle = ExtractorBundle(CNNExtractor(1, 32, 64), nn.Linear(64, 10), Projector(64, 64, "batch"))
    ce = validation_loss(lambda inp: bundle.head(bundle.fe(inp)), x[labelled], y[labelled])
    ssl = ssl_validation_loss(bundle, x, augment, mu=4.0, seed=7)
    assert ce > 0 > ssl  # the two parts differ in sign: a wrong sum cannot pass

    def score(method: str, mask: torch.Tensor = labelled) -> float | None:
        return stage1_validation_loss(
            bundle, method, x, y, mask, augment, mu=4.0, ssl_weight=0.5, seed=7
        )

    assert score("fedce") == pytest.approx(ce)
    assert score("fedsc") == pytest.approx(ssl)
    assert score("hybrid") == pytest.approx(ce + 0.5 * ssl)
    nothing_labelled = torch.zeros(96, dtype=torch.bool)
    assert score("fedce", nothing_labelled) is None
    assert score("hybrid", nothing_labelled) is None
    assert score("fedsc", nothing_labelled) == pytest.approx(ssl)  # FedSC reads no label
