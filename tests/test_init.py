"""Weight initialisation."""

from __future__ import annotations

import math

import torch

from data2vec.model import trunc_normal_


def test_trunc_normal_matches_the_truncated_distribution() -> None:
    torch.manual_seed(0)
    x = trunc_normal_(torch.empty(1_000_000), std=0.02)
    assert x.abs().max() <= 0.04 + 1e-7
    # Var of N(0, s) truncated at +-2s: s^2 * (1 - 2*2*phi(2) / (2*Phi(2) - 1)).
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    big_phi2 = 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    expected_std = 0.02 * math.sqrt(1 - 4 * phi2 / (2 * big_phi2 - 1))
    assert abs(float(x.std()) - expected_std) < 1e-4
    assert abs(float(x.mean())) < 1e-4
    # Same seed, same weights.
    torch.manual_seed(0)
    assert torch.equal(trunc_normal_(torch.empty(1_000_000), std=0.02), x)
