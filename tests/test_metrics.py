import itertools

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from edgepc.coherence import (
    coherence_metrics,
    coherence_metrics_from_dissimilarities,
    hard_ranks,
    pairwise_dissimilarity,
)
from edgepc.coherence.metrics import agreeing_pairs, count_inversions
from edgepc.distill.evaluate import better_than_chance
from edgepc.measure import peak_memory_in_fresh_process
from tests.conftest import random_rotation


def _brute_force(s, t):
    """The three metrics by their definitions, triplet by triplet."""
    n = s.shape[0]
    agree = total = 0
    for i, j, k in itertools.permutations(range(n), 3):
        total += 1
        agree += np.sign(s[i, j] - s[i, k]) == np.sign(t[i, j] - t[i, k])
    rs, rt = hard_ranks(torch.from_numpy(s)).numpy(), hard_ranks(torch.from_numpy(t)).numpy()
    off = ~np.eye(n, dtype=bool)
    rhos = [spearmanr(s[i][off[i]], t[i][off[i]]).statistic for i in range(n)]
    return np.abs(rs - rt)[off].mean(), agree / total, np.mean(rhos)


def test_count_inversions_equals_pair_loop():
    x = torch.randint(0, 5, (6, 23))
    expected = [sum(int(r[p] > r[q]) for p in range(23) for q in range(p + 1, 23)) for r in x]
    assert count_inversions(x).tolist() == expected


def test_agreeing_pairs_equals_pair_loop_with_ties():
    a, b = torch.randint(0, 4, (5, 19)), torch.randint(0, 4, (5, 19))
    expected = [
        sum(
            int(torch.sign(a[r, p] - a[r, q]) == torch.sign(b[r, p] - b[r, q]))
            for p in range(19)
            for q in range(p + 1, 19)
        )
        for r in range(5)
    ]
    assert agreeing_pairs(a, b).tolist() == expected


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_equal_brute_force(ties):
    s = pairwise_dissimilarity(torch.randn(14, 3, dtype=torch.float64))
    t = pairwise_dissimilarity(torch.randn(14, 5, dtype=torch.float64))
    if ties:
        s, t = torch.round(s), torch.round(t * 2)
    gap, agreement, rho = _brute_force(s.numpy(), t.numpy())
    m = coherence_metrics_from_dissimilarities(s, t, block_rows=4)
    assert m.rank_gap == pytest.approx(gap, abs=1e-12)
    assert m.triplet_agreement == pytest.approx(agreement, abs=1e-12)
    assert m.spearman == pytest.approx(rho, abs=1e-12)


def test_block_size_does_not_change_the_result():
    s, t = torch.randn(101, 8), torch.randn(101, 4)
    results = {coherence_metrics(s, t, block_rows=b) for b in (1, 13, 101, 500)}
    assert len(results) == 1


@pytest.mark.parametrize(
    "increasing_map",
    [lambda d: 3.7 * d, lambda d: d**3, torch.exp, lambda d: torch.log1p(d) + 5.0],
    ids=["scale", "power", "exp", "log"],
)
def test_exactly_invariant_to_increasing_maps(increasing_map):
    s = pairwise_dissimilarity(torch.randn(40, 6, dtype=torch.float64))
    t = pairwise_dissimilarity(torch.randn(40, 9, dtype=torch.float64))
    base = coherence_metrics_from_dissimilarities(s, t)
    assert coherence_metrics_from_dissimilarities(increasing_map(s), t) == base
    assert coherence_metrics_from_dissimilarities(s, increasing_map(t)) == base
    assert base.triplet_agreement < 0.9  # a non-trivial case


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_rotated_rescaled_copy_is_perfectly_coherent(metric):
    teacher = torch.randn(200, 16, dtype=torch.float64)
    student = 0.01 * teacher @ random_rotation(16)
    m = coherence_metrics(student, teacher, metric)
    assert m.rank_gap == pytest.approx(0.0, abs=1e-12)
    assert m.triplet_agreement == pytest.approx(1.0, abs=1e-12)
    assert m.spearman == pytest.approx(1.0, abs=1e-12)


def test_reversed_orderings_agree_nowhere():
    t = pairwise_dissimilarity(torch.randn(60, 4, dtype=torch.float64))
    reversed_ = t.max() + 1.0 - t  # strictly decreasing in t: every ordering reversed
    m = coherence_metrics_from_dissimilarities(reversed_, t)
    assert m.triplet_agreement == pytest.approx(0.0, abs=1e-12)
    assert m.spearman == pytest.approx(-1.0, abs=1e-12)


def test_random_student_agrees_half_the_time():
    m = coherence_metrics(torch.randn(400, 32), torch.randn(400, 32))
    assert m.triplet_agreement == pytest.approx(0.5, abs=0.02)
    assert m.spearman == pytest.approx(0.0, abs=0.03)
    assert m.rank_gap == pytest.approx(1 / 3, abs=0.02)  # E|U - V| for independent uniforms


def test_metric_names_are_the_logged_ones():
    m = coherence_metrics(torch.randn(10, 3), torch.randn(10, 3))
    assert set(m.as_dict()) == {"pc_rank_gap", "pc_triplet_agreement", "pc_spearman"}


@pytest.mark.parametrize(
    ("s", "t", "message"),
    [
        (torch.randn(5, 5), torch.randn(4, 4), "B×N matrices of one shape"),
        (torch.randn(3, 5), torch.randn(3, 5), "square N×N matrices"),  # the loss takes B×N
        (torch.randn(2, 2), torch.randn(2, 2), "at least 3"),
        (torch.full((4, 4), float("nan")), torch.rand(4, 4), "NaN or Inf"),
    ],
)
def test_bad_dissimilarities_raise(s, t, message):
    with pytest.raises(ValueError, match=message):
        coherence_metrics_from_dissimilarities(s, t)


def _features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher (n, 64) and a student (n, 48) that keeps part of its geometry, seeded."""
    gen = torch.Generator().manual_seed(n)
    teacher = torch.randn(n, 64, generator=gen)
    student = teacher[:, :48] + 0.5 * torch.randn(n, 48, generator=gen)
    return student, teacher


def metrics_of(n: int):
    """The thunk computing the metrics of :func:`_features` (importable, for the probe)."""
    student, teacher = _features(n)
    return lambda: coherence_metrics(student, teacher, block_rows=128)


@pytest.mark.slow
def test_ten_thousand_embeddings_in_bounded_memory():
    n = 10_000
    peak, m = peak_memory_in_fresh_process(metrics_of, (n,), warmup=False)
    # One N×N float64 matrix is 800 MB, an N×N×N tensor 8 TB: blocks of 128 anchors stay small.
    assert peak < 450 * 2**20
    # An independent Monte-Carlo estimate over random triplets must agree within 5 SE.
    student, teacher = (x.double() for x in _features(n))
    gen = torch.Generator().manual_seed(1)
    samples = 400_000
    i, j, k = (torch.randint(0, n, (samples,), generator=gen) for _ in range(3))
    keep = (i != j) & (j != k) & (i != k)
    i, j, k = i[keep], j[keep], k[keep]

    def order(x):
        return torch.sign((x[i] - x[j]).norm(dim=1) - (x[i] - x[k]).norm(dim=1))

    agree = (order(student) == order(teacher)).double()
    estimate, se = agree.mean().item(), agree.std().item() / keep.sum().item() ** 0.5
    assert abs(m.triplet_agreement - estimate) < 5 * se
    assert 0.6 < m.triplet_agreement < 0.95  # a non-trivial case
    assert 0.0 < m.rank_gap < 0.3
    assert 0.3 < m.spearman < 1.0


def test_better_than_chance_is_a_three_sigma_binomial_bound():
    # 10 classes, 900 images: chance 0.1, sigma 0.01, bound 0.13
    assert not better_than_chance(0.13, 900, 10)
    assert better_than_chance(0.1301, 900, 10)
    assert not better_than_chance(0.3, 9, 10)  # 0.1 + 3 * 0.1 = 0.4 on 9 images
    assert better_than_chance(0.66, 100, 2)  # two classes: 0.5 + 3 * 0.05 = 0.65
    assert not better_than_chance(0.64, 100, 2)
