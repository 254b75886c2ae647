import pytest
import torch

from edgepc.coherence import (
    DISSIMILARITIES,
    PerceptionCoherenceLoss,
    coherence_metrics,
    pairwise_dissimilarity,
    pc_loss_from_dissimilarities,
    pc_loss_reference_from_dissimilarities,
    perception_coherence_loss,
    perception_coherence_loss_reference,
)
from edgepc.measure import peak_memory_in_fresh_process
from tests.conftest import random_rotation

OPTIONS = [
    {"teacher_ranks": "soft", "penalty": "square", "tau": 0.3},
    {"teacher_ranks": "hard", "penalty": "square", "tau": 0.1},
    {"teacher_ranks": "soft", "penalty": "abs", "tau": 1.0},
    {"teacher_ranks": "hard", "penalty": "abs", "tau": 0.05},
    {"teacher_ranks": "soft", "penalty": "square", "tau": 0.3, "neighbourhood": 0.1},
    {"teacher_ranks": "hard", "penalty": "abs", "tau": 0.1, "neighbourhood": 0.3},
]


def _value_and_grad(loss_fn, student, teacher, **options):
    s = student.clone().requires_grad_()
    loss = loss_fn(s, teacher, **options)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


@pytest.mark.parametrize("metric", DISSIMILARITIES)
@pytest.mark.parametrize(("b", "chunk_rows"), [(3, None), (8, 3), (33, 5), (64, None)])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_memory_bounded_equals_reference(metric, b, chunk_rows, options):
    student = torch.randn(b, 7, dtype=torch.float64)
    teacher = torch.randn(b, 19, dtype=torch.float64)  # d_T ≠ d_S
    value, grad = _value_and_grad(
        perception_coherence_loss,
        student,
        teacher,
        dissimilarity=metric,
        chunk_rows=chunk_rows,
        **options,
    )
    ref_value, ref_grad = _value_and_grad(
        perception_coherence_loss_reference, student, teacher, dissimilarity=metric, **options
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-14)
    assert value > 0


def test_hand_computed_value():
    # B = 3: each (i, j) has one k, so R̃(i, j) = σ((Ŝ_ij - Ŝ_ik) / τ). mean(S) = 2 and τ = ½
    # make (Ŝ_ij - Ŝ_ik) / τ = S_ij - S_ik. Teacher (hard): anchor 0 nearer to 1, anchors 1
    # and 2 nearer to each other than to 0. The student agrees on anchor 0 only.
    s = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 0.5, 0.0]])
    loss = pc_loss_from_dissimilarities(s, t, tau=0.5, teacher_ranks="hard")

    def sig(x):
        return torch.sigmoid(torch.tensor(x))

    errors = [sig(-1.0) - 0, sig(1.0) - 1]  # anchor 0: targets 0, 1
    errors += [sig(-2.0) - 1, sig(2.0) - 0]  # anchor 1: targets 1, 0
    errors += [sig(-1.0) - 1, sig(1.0) - 0]  # anchor 2: targets 1, 0
    expected = torch.stack(errors).square().mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        pc_loss_from_dissimilarities(s, t, tau=0.5, teacher_ranks="hard", penalty="abs"),
        torch.stack(errors).abs().mean(),
    )
    # Neighbourhood width h = 1: a pair the teacher ranks 0 weighs 1, one it ranks 1 weighs e⁻¹.
    weights = torch.exp(-torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(
        pc_loss_from_dissimilarities(s, t, tau=0.5, teacher_ranks="hard", neighbourhood=1.0),
        (weights * torch.stack(errors).square()).sum() / weights.sum(),
    )


def test_a_wide_neighbourhood_weighs_every_pair_alike():
    s, t = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 6, dtype=torch.float64)
    plain = perception_coherence_loss(s, t)
    torch.testing.assert_close(perception_coherence_loss(s, t, neighbourhood=1e9), plain)
    assert perception_coherence_loss(s, t, neighbourhood=0.05) != plain


@pytest.mark.parametrize(
    "increasing_map",
    [lambda d: 3.7 * d, lambda d: d**3, torch.exp],
    ids=["scale", "power", "exp"],
)
def test_hard_teacher_loss_invariant_to_increasing_maps(increasing_map):
    s = pairwise_dissimilarity(torch.randn(30, 5, dtype=torch.float64))
    t = pairwise_dissimilarity(torch.randn(30, 9, dtype=torch.float64))
    base = pc_loss_from_dissimilarities(s, t, teacher_ranks="hard")
    mapped = pc_loss_from_dissimilarities(s, increasing_map(t), teacher_ranks="hard")
    assert mapped == base  # same ranks, bit for bit


def test_soft_teacher_loss_invariant_to_teacher_scale_only():
    s = pairwise_dissimilarity(torch.randn(30, 5, dtype=torch.float64))
    t = pairwise_dissimilarity(torch.randn(30, 9, dtype=torch.float64))
    base = pc_loss_from_dissimilarities(s, t)
    torch.testing.assert_close(pc_loss_from_dissimilarities(s, 42.0 * t), base)
    # Soft ranks read distances, not only their order: a power changes them (documented).
    assert not torch.isclose(pc_loss_from_dissimilarities(s, t**3), base)


@pytest.mark.parametrize("metric", DISSIMILARITIES)
def test_rotated_rescaled_copy_of_teacher(metric):
    teacher = torch.randn(48, 12, dtype=torch.float64)
    student = 5.0 * teacher @ random_rotation(12)
    soft = perception_coherence_loss(student, teacher, dissimilarity=metric)
    assert soft.item() == pytest.approx(0.0, abs=1e-12)
    hard = [
        perception_coherence_loss(
            student, teacher, dissimilarity=metric, tau=tau, teacher_ranks="hard"
        ).item()
        for tau in (0.3, 0.03, 1e-3, 1e-5)
    ]
    assert hard == sorted(hard, reverse=True)
    assert hard[-1] < 1e-6


@pytest.mark.parametrize("metric", DISSIMILARITIES)
@pytest.mark.parametrize("teacher_ranks", ["soft", "hard"])
def test_scale_invariant_without_radial_gradient(metric, teacher_ranks):
    student, teacher = (
        torch.randn(40, 8, dtype=torch.float64),
        torch.randn(40, 6, dtype=torch.float64),
    )
    options = {"dissimilarity": metric, "teacher_ranks": teacher_ranks}
    value, grad = _value_and_grad(perception_coherence_loss, student, teacher, **options)
    for c in (1e-3, 0.5, 250.0):
        scaled, _ = _value_and_grad(perception_coherence_loss, c * student, teacher, **options)
        torch.testing.assert_close(scaled, value, rtol=1e-5, atol=0)
    radial = (grad * student).sum()
    assert abs(radial) < 1e-6 * grad.norm() * student.norm()
    assert grad.norm() > 0


@pytest.mark.parametrize("metric", DISSIMILARITIES)
@pytest.mark.parametrize("teacher_ranks", ["soft", "hard"])
def test_finite_gradients_with_duplicates(metric, teacher_ranks):
    base = torch.randn(10, 4)
    student = torch.cat([base, base[:3], base[:1]])  # duplicates: zero-distance pairs
    teacher = torch.cat([torch.randn(10, 6), torch.randn(4, 6)])
    for fn in (perception_coherence_loss, perception_coherence_loss_reference):
        value, grad = _value_and_grad(
            fn, student, teacher, dissimilarity=metric, teacher_ranks=teacher_ranks
        )
        assert torch.isfinite(value)
        assert torch.isfinite(grad).all()


def test_identical_student_rows_give_finite_loss():
    value, grad = _value_and_grad(perception_coherence_loss, torch.ones(6, 3), torch.randn(6, 3))
    assert torch.isfinite(value)
    assert torch.isfinite(grad).all()


def test_training_with_the_loss_makes_student_coherent():
    torch.manual_seed(1)
    teacher = torch.randn(128, 32)
    student_net = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)
    )
    criterion = PerceptionCoherenceLoss()
    opt = torch.optim.Adam(student_net.parameters(), lr=3e-3)
    before = coherence_metrics(student_net(teacher).detach(), teacher).triplet_agreement
    for _ in range(100):
        opt.zero_grad()
        loss = criterion(student_net(teacher), teacher)
        loss.backward()
        opt.step()
    after = coherence_metrics(student_net(teacher).detach(), teacher).triplet_agreement
    print(f"triplet agreement {before:.3f} -> {after:.3f}")
    assert before < 0.75
    assert after > before + 0.1


def test_float16_and_autocast_inputs_give_float32_loss():
    student = torch.randn(16, 4).half().requires_grad_()
    loss = perception_coherence_loss(student, torch.randn(16, 6).half())
    loss.backward()
    assert loss.dtype == torch.float32
    assert student.grad.dtype == torch.float16
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dissimilarity": "l1"}, "unknown dissimilarity 'l1'"),
        ({"tau": 0.0}, "tau must be > 0"),
        ({"penalty": "huber"}, "unknown penalty 'huber'"),
        ({"teacher_ranks": "medium"}, "unknown teacher_ranks 'medium'"),
        ({"neighbourhood": 0.0}, "neighbourhood width must be > 0"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        perception_coherence_loss(torch.randn(5, 3), torch.randn(5, 3), **options)
    with pytest.raises(ValueError, match=message):
        PerceptionCoherenceLoss(**options)


@pytest.mark.parametrize(
    ("student", "teacher", "message"),
    [
        (torch.randn(5, 3), torch.randn(6, 3), "mismatched batch sizes"),
        (torch.randn(2, 3), torch.randn(2, 3), "batch size 2 < 3"),
        (torch.tensor([[float("nan")] * 3] * 4), torch.randn(4, 3), "NaN or Inf"),
    ],
)
def test_bad_features_raise(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        perception_coherence_loss(student, teacher)
    with pytest.raises(ValueError, match=message):
        PerceptionCoherenceLoss(memory_bounded=False)(student, teacher)


def test_bad_dissimilarity_matrices_raise():
    with pytest.raises(ValueError, match="B×N matrices of one shape"):
        pc_loss_from_dissimilarities(torch.rand(4, 4), torch.rand(5, 5))
    with pytest.raises(ValueError, match="N >= B"):
        pc_loss_reference_from_dissimilarities(torch.rand(4, 3), torch.rand(4, 3))


# ------------------------------------------------------------------ ranks against a queue


def _loss_by_the_definition(s_dis, t_dis, tau):
    """L_PC with a soft teacher, by the formula read off loop by loop (B×N matrices)."""
    b, n = s_dis.shape

    def normalised(d):
        return d / (sum(d[i, k] for i in range(b) for k in range(n) if k != i) / (b * (n - 1)))

    def rank(d, i, j):
        others = [k for k in range(n) if k not in (i, j)]
        return sum(torch.sigmoid((d[i, j] - d[i, k]) / tau) for k in others) / (n - 2)

    s, t = normalised(s_dis), normalised(t_dis)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    return sum((rank(s, i, j) - rank(t, i, j)) ** 2 for i, j in pairs) / len(pairs)


def test_a_queue_counts_every_rank_against_the_queued_inputs():
    student = torch.randn(4, 3, dtype=torch.float64)
    teacher = torch.randn(4, 5, dtype=torch.float64)
    queued = (torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    s_dis = pairwise_dissimilarity(student, torch.cat([student, queued[0]]))
    t_dis = pairwise_dissimilarity(teacher, torch.cat([teacher, queued[1]]))
    expected = _loss_by_the_definition(s_dis, t_dis, tau=0.3)
    for loss_fn in (perception_coherence_loss, perception_coherence_loss_reference):
        torch.testing.assert_close(loss_fn(student, teacher, queued=queued), expected)
    assert perception_coherence_loss(student, teacher) != expected  # the queue changes it


@pytest.mark.parametrize(("b", "m", "chunk_rows"), [(3, 1, None), (8, 20, 3), (17, 40, None)])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_memory_bounded_equals_reference_with_a_queue(b, m, chunk_rows, options):
    student = torch.randn(b, 7, dtype=torch.float64)
    teacher = torch.randn(b, 19, dtype=torch.float64)
    queued = (torch.randn(m, 7, dtype=torch.float64), torch.randn(m, 19, dtype=torch.float64))
    value, grad = _value_and_grad(perception_coherence_loss, student, teacher,
                                  queued=queued, chunk_rows=chunk_rows, **options)  # fmt: skip
    ref_value, ref_grad = _value_and_grad(
        perception_coherence_loss_reference, student, teacher, queued=queued, **options
    )
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-14)


def test_the_module_queue_holds_the_last_inputs_and_ranks_against_them():
    torch.manual_seed(0)
    loss = PerceptionCoherenceLoss(queue=5, student_dim=3, teacher_dim=4)
    batches = [(torch.randn(4, 3, requires_grad=True), torch.randn(4, 4)) for _ in range(3)]
    first = loss(*batches[0])
    torch.testing.assert_close(first, perception_coherence_loss(*batches[0]))  # nothing queued
    second = loss(*batches[1])
    queued = (batches[0][0].detach(), batches[0][1])
    torch.testing.assert_close(second, perception_coherence_loss(*batches[1], queued=queued))
    second.backward()
    assert batches[0][0].grad is None  # queued student embeddings carry no gradient
    loss(*batches[2])
    # 12 pushed into 5 slots: the last 5 inputs remain (slot = count mod 5).
    last = torch.cat([b[0].detach() for b in batches])[-5:]
    slots = torch.arange(7, 12) % 5
    torch.testing.assert_close(loss.queued_student[slots], last)
    torch.testing.assert_close(loss.queued_teacher[slots], torch.cat([b[1] for b in batches])[-5:])
    state = loss.state_dict()  # saved with a training checkpoint
    assert int(state["queued"]) == 12
    assert state["queued_student"].shape == (5, 3)
    with pytest.raises(ValueError, match="needs student_dim and teacher_dim"):
        PerceptionCoherenceLoss(queue=5)
    with pytest.raises(ValueError, match="queue must be >= 1"):
        PerceptionCoherenceLoss(queue=0, student_dim=3, teacher_dim=4)


def loss_step(batch: int, memory_bounded: bool):
    """Inputs and one forward + backward of the PC loss (importable, for the memory probe)."""
    student = torch.randn(batch, 128, requires_grad=True)
    teacher = torch.randn(batch, 512)
    criterion = PerceptionCoherenceLoss(memory_bounded=memory_bounded)
    return lambda: criterion(student, teacher).backward()


@pytest.mark.slow
def test_peak_memory_is_quadratic_not_cubic():
    b = 512
    bounded, _ = peak_memory_in_fresh_process(loss_step, (b, True))
    reference, _ = peak_memory_in_fresh_process(loss_step, (b, False))
    assert reference > 4 * b**3  # the plain version holds B×B×B float32 tensors
    assert bounded <= reference / 8
    assert bounded < 64 * 2**20  # 2^22-element blocks: 16 MiB each
