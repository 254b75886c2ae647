import pytest
import torch

from edgepc.coherence import DISSIMILARITIES, pairwise_dissimilarity
from edgepc.coherence.dissimilarity import check_features


def _by_definition(x, y, metric):
    diff = x[:, None, :] - y[None, :, :]
    if metric == "euclidean":
        return diff.norm(dim=2)
    if metric == "sqeuclidean":
        return diff.square().sum(2)
    cos = (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :])
    return 1 - cos


@pytest.mark.parametrize("metric", DISSIMILARITIES)
def test_values_match_definition(metric):
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(pairwise_dissimilarity(x, y, metric), _by_definition(x, y, metric))
    square = pairwise_dissimilarity(x, metric=metric)
    torch.testing.assert_close(square, square.T)
    assert torch.allclose(square.diagonal(), torch.zeros(9, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("metric", DISSIMILARITIES)
def test_gradient_finite_at_zero_distance(metric):
    x = torch.randn(6, 3)
    x = torch.cat([x, x[:2], torch.zeros(1, 3)]).requires_grad_()  # duplicates, a zero vector
    d = pairwise_dissimilarity(x, metric=metric)
    (grad,) = torch.autograd.grad(d.sum(), x)
    assert torch.isfinite(grad).all()
    assert d[0, 6] == 0  # exact zero for duplicates
    assert d[1, 7] == 0


def test_unknown_metric_is_a_value_error():
    with pytest.raises(ValueError, match=r"unknown dissimilarity 'manhattan'.*euclidean"):
        pairwise_dissimilarity(torch.randn(4, 2), metric="manhattan")


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        (torch.randn(5, 3), torch.randn(6, 3), "mismatched batch sizes"),
        (torch.randn(2, 3), torch.randn(2, 3), "batch size 2 < 3"),
        (torch.full((4, 3), float("nan")), torch.randn(4, 3), "NaN or Inf"),
        (torch.randn(4, 3), torch.tensor([[float("inf")]] * 4), "NaN or Inf"),
        (torch.randn(4, 3, 2), torch.randn(4, 3), "2-D"),
    ],
)
def test_bad_features_raise(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        check_features(student, teacher)
