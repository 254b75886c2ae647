import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from edgepc.coherence import hard_ranks, pairwise_dissimilarity, soft_ranks
from edgepc.coherence.ranks import (
    drop_self,
    hard_ranks_reference,
    midranks,
    soft_ranks_reference,
)


def test_midranks_match_scipy_with_ties():
    x = torch.randint(0, 6, (7, 40)).double()
    expected = rankdata(x.numpy(), axis=1) - 1
    np.testing.assert_array_equal(midranks(x).numpy(), expected)


def test_hard_ranks_hand_case():
    # Anchor 0 sees 1 nearest, then 2 and 3 tied: R(0, 1) = 0, R(0, 2) = R(0, 3) = ½ · ½ + ½.
    d = torch.tensor(
        [[0.0, 1.0, 2.0, 2.0], [1.0, 0.0, 3.0, 4.0], [2.0, 3.0, 0.0, 5.0], [2.0, 4.0, 5.0, 0.0]]
    )
    r = hard_ranks(d)
    assert r[0].tolist() == [0.0, 0.0, 0.75, 0.75]
    assert r[1].tolist() == [0.0, 0.0, 0.5, 1.0]


@pytest.mark.parametrize("b", [3, 4, 17, 60])
def test_hard_ranks_equal_definition_with_ties(b):
    d = pairwise_dissimilarity(torch.randn(b, 4, dtype=torch.float64))
    d = torch.round(d * 2) / 2  # many ties
    torch.testing.assert_close(hard_ranks(d), hard_ranks_reference(d))


def test_hard_ranks_of_row_blocks_equal_full_matrix():
    d = pairwise_dissimilarity(torch.randn(30, 4, dtype=torch.float64))
    anchors = torch.tensor([3, 7, 29])
    torch.testing.assert_close(hard_ranks(d[anchors], anchors), hard_ranks(d)[anchors])


def test_drop_self_removes_each_rows_own_column():
    d = torch.arange(16.0).view(4, 4)
    assert drop_self(d, torch.arange(4)).tolist() == [
        [1, 2, 3],
        [4, 6, 7],
        [8, 9, 11],
        [12, 13, 14],
    ]


@pytest.mark.parametrize(("b", "chunk"), [(3, None), (20, 1), (20, 7), (50, None)])
def test_soft_ranks_equal_definition(b, chunk):
    d = pairwise_dissimilarity(torch.randn(b, 5, dtype=torch.float64))
    torch.testing.assert_close(soft_ranks(d, 0.2, chunk), soft_ranks_reference(d, 0.2))


def test_soft_ranks_tend_to_hard_ranks_as_tau_shrinks():
    d = pairwise_dissimilarity(torch.randn(25, 3, dtype=torch.float64))
    gaps = [(soft_ranks(d, tau) - hard_ranks(d)).abs().max().item() for tau in (1.0, 1e-2, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-9
