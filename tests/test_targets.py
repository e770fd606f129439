"""Target construction (per-layer norm -> average of top K -> final norm) and the losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data2vec.targets import build_targets, feature_std, instance_norm, loss_scale, regression_loss, relative_std

# ------------------------------------------------------------------ hand-written references


def hand_instance_norm(x: np.ndarray) -> np.ndarray:
    """Per sample, per channel, over time; population variance; eps 1e-5; no affine."""
    B, T, D = x.shape
    out = np.zeros((B, T, D), dtype=np.float64)
    for b in range(B):
        for d in range(D):
            vals = [float(x[b, t, d]) for t in range(T)]
            mean = sum(vals) / T
            var = sum((v - mean) ** 2 for v in vals) / T
            for t in range(T):
                out[b, t, d] = (vals[t] - mean) / math.sqrt(var + 1e-5)
    return out


def hand_layer_norm(x: np.ndarray) -> np.ndarray:
    """Per token, over channels; population variance; eps 1e-5; no affine."""
    B, T, D = x.shape
    out = np.zeros((B, T, D), dtype=np.float64)
    for b in range(B):
        for t in range(T):
            vals = [float(x[b, t, d]) for d in range(D)]
            mean = sum(vals) / D
            var = sum((v - mean) ** 2 for v in vals) / D
            for d in range(D):
                out[b, t, d] = (vals[d] - mean) / math.sqrt(var + 1e-5)
    return out


def hand_norm(x: np.ndarray, kind: str) -> np.ndarray:
    return {"instance": hand_instance_norm, "layer": hand_layer_norm, "none": lambda a: a.astype(np.float64)}[kind](x)


def hand_targets(layers: list[np.ndarray], k: int, layer_norm: str, final_norm: str) -> np.ndarray:
    total = None
    for layer in layers[-k:]:
        y = hand_norm(layer, layer_norm)
        total = y if total is None else total + y
    return hand_norm(total / k, final_norm)


def make_layers(n: int, shape=(2, 5, 6), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # different scales and offsets per layer so that skipping the per-layer norm shows
    return [torch.randn(*shape, generator=g) * (1 + 3 * i) + i for i in range(n)]


# ------------------------------------------------------------------ build_targets


@pytest.mark.parametrize(
    "layer_norm, final_norm",
    [
        ("instance", "none"),
        ("instance", "layer"),
        ("layer", "layer"),
        ("layer", "instance"),
        ("none", "none"),
        ("none", "layer"),
    ],
)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_build_targets_matches_hand_computation(layer_norm: str, final_norm: str, k: int) -> None:
    layers = make_layers(4)
    out = build_targets(layers, k, layer_norm, final_norm)
    assert out.shape == (2, 5, 6)
    assert out.dtype == torch.float32
    expected = hand_targets([layer.numpy() for layer in layers], k, layer_norm, final_norm)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_build_targets_uses_top_layers_not_bottom() -> None:
    layers = make_layers(4)
    out = build_targets(layers, 1, "none", "none")
    assert torch.equal(out, layers[-1])
    out2 = build_targets(layers, 2, "none", "none")
    torch.testing.assert_close(out2, (layers[2] + layers[3]) / 2)


def test_build_targets_bf16_inputs_give_float32() -> None:
    layers = [layer.bfloat16() for layer in make_layers(3)]
    out = build_targets(layers, 2, "instance", "layer")
    assert out.dtype == torch.float32
    expected = hand_targets([layer.float().numpy() for layer in layers], 2, "instance", "layer")
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_build_targets_rejects_bad_top_k() -> None:
    layers = make_layers(2)
    with pytest.raises(ValueError):
        build_targets(layers, 3, "instance", "none")
    with pytest.raises(ValueError):
        build_targets(layers, 0, "instance", "none")


# ------------------------------------------------------------------ padding


def test_instance_norm_matches_hand_without_padding() -> None:
    x = make_layers(1, shape=(3, 7, 4), seed=3)[0]
    np.testing.assert_allclose(instance_norm(x).numpy(), hand_instance_norm(x.numpy()), rtol=1e-5, atol=1e-5)


def test_instance_norm_with_padding_equals_unpadded_slice() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 4, generator=g) * 2 + 1
    lengths = [8, 5, 3]
    pad = torch.tensor([[t >= n for t in range(8)] for n in lengths])
    out = instance_norm(x, pad)
    for b, n in enumerate(lengths):
        alone = instance_norm(x[b : b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out[b, :n].numpy(), hand_instance_norm(x[b : b + 1, :n].numpy())[0], atol=1e-5)
        assert torch.equal(out[b, n:], torch.zeros(8 - n, 4))
    # no leak: padded values do not influence the real positions
    x2 = x.clone()
    x2[pad] = 1e4
    torch.testing.assert_close(instance_norm(x2, pad), out)


def test_build_targets_with_padding_equals_each_sample_alone() -> None:
    g = torch.Generator().manual_seed(2)
    layers = [torch.randn(2, 6, 4, generator=g) * (i + 1) for i in range(3)]
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    out = build_targets(layers, 2, "instance", "instance", padding_mask=pad)
    alone = build_targets([layer[1:, :4] for layer in layers], 2, "instance", "instance")
    torch.testing.assert_close(out[1, :4], alone[0], rtol=1e-5, atol=1e-5)
    full0 = build_targets([layer[:1] for layer in layers], 2, "instance", "instance")
    torch.testing.assert_close(out[0], full0[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ losses


def test_regression_loss_squared_error_no_half() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = 0.25
    out = regression_loss(pred, target, 0.0, scale)
    assert out.shape == (5,)
    p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
    expected = [sum((p[n, d] - t[n, d]) ** 2 for d in range(8)) * scale for n in range(5)]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.5, 2.0, 4.0])
def test_regression_loss_smooth_l1(beta: float) -> None:
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
    out = regression_loss(pred, target, beta, 0.2)
    torch_ref = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).sum(-1) * 0.2
    torch.testing.assert_close(out, torch_ref)

    def sl1(d: float) -> float:
        return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta

    diff = (pred - target).numpy().astype(np.float64)
    expected = [sum(sl1(diff[n, j]) for j in range(5)) * 0.2 for n in range(6)]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)


def test_v1_vision_loss_is_mean_smooth_l1() -> None:
    # beta 2 with 1/D scale, averaged over tokens == F.smooth_l1_loss mean over elements ([DV])
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(7, 16, generator=g) * 3, torch.randn(7, 16, generator=g)
    ours = regression_loss(pred, target, 2.0, loss_scale("inv_dim", 16)).mean()
    torch.testing.assert_close(ours, F.smooth_l1_loss(pred, target, beta=2.0))


def test_regression_loss_bf16_inputs_give_float32() -> None:
    pred = torch.ones(2, 3, dtype=torch.bfloat16)
    target = torch.zeros(2, 3)
    out = regression_loss(pred, target, 0.0, 1.0)
    assert out.dtype == torch.float32
    assert out.tolist() == [3.0, 3.0]


def test_loss_scale() -> None:
    assert loss_scale("rsqrt_dim", 768) == pytest.approx(1 / math.sqrt(768))
    assert loss_scale("inv_dim", 768) == pytest.approx(1 / 768)
    assert loss_scale("one", 768) == 1.0
    assert loss_scale("rsqrt_dim", 16) == 0.25


def test_feature_std() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 0.0])
    expected = np.mean([np.std(x.numpy()[:, d].astype(np.float64), ddof=1) for d in range(4)])
    assert float(feature_std(x)) == pytest.approx(expected, rel=1e-5)
    assert float(feature_std(torch.ones(5, 3))) == 0.0
    assert float(feature_std(torch.randn(1, 3))) == 0.0  # a single token has no spread
    y = torch.randn(4, 3, requires_grad=True)
    assert not feature_std(y).requires_grad
    assert feature_std(y.bfloat16()).dtype == torch.float32


def test_relative_std_separates_varied_from_collapsed_tokens() -> None:
    g = torch.Generator().manual_seed(4)
    varied = torch.randn(2, 50, 8, generator=g)
    assert float(relative_std(varied)) == pytest.approx(1.0, abs=0.1)
    one_vector = torch.randn(8, generator=g).expand(2, 50, 8)
    collapsed = one_vector + 0.01 * torch.randn(2, 50, 8, generator=g)
    assert float(relative_std(collapsed)) < 0.02
    assert float(relative_std(7.0 * varied)) == pytest.approx(float(relative_std(varied)), rel=1e-5)  # scale-free
    assert float(relative_std(torch.zeros(4, 3))) == 0.0
