"""Each baseline against a small case computed by hand (values in the comments)."""

import math

import pytest
import torch

from edgepc.distill.losses import build_loss, loss_class, loss_names, register_loss
from edgepc.distill.losses.crd import crd_nce, other_indices
from edgepc.distill.losses.dist import dist_loss
from edgepc.distill.losses.kd import kd_loss
from edgepc.distill.losses.pkt import pkt_loss
from edgepc.distill.losses.rkd_angle import rkd_angle_loss
from edgepc.distill.losses.rkd_distance import rkd_distance_loss
from edgepc.distill.losses.sp import sp_loss


def test_kd_hand_case():
    # p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = ¾ ln(3/2) + ¼ ln(1/2); ×T² at T = 2.
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    t = torch.tensor([[math.log(3.0), 0.0]])
    s = torch.zeros(1, 2)
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(kl, rel=1e-6)
    assert kd_loss(s, 2 * t, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_fitnet_hand_case_and_projector_learns():
    loss = build_loss("fitnet", student_dim=2, teacher_dim=3)
    with torch.no_grad():
        loss.projector.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        loss.projector.bias.zero_()
    # projection of (1, 2) is (1, 2, 3); teacher (1, 0, 3): squared errors 0, 4, 0 -> 4/3.
    value = loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0, 3.0]]))
    assert value.item() == pytest.approx(4 / 3)
    value.backward()
    assert loss.projector.weight.grad.abs().sum() > 0
    maps = loss(torch.randn(2, 2, 5, 5), torch.randn(2, 3, 5, 5))  # 1×1 conv on feature maps
    assert maps.ndim == 0


def test_rkd_distance_hand_case():
    # 1-D points: student 0, 1, 3 (mean distance 2); teacher 0, 1, 2 (mean 4/3). Normalised
    # distances differ by ±¼ on pairs (0,1) and (1,2): four entries of Huber ½·(¼)², over 9.
    s = torch.tensor([[0.0], [1.0], [3.0]])
    t = torch.tensor([[0.0], [1.0], [2.0]])
    assert rkd_distance_loss(s, t).item() == pytest.approx(4 * 0.5 * 0.0625 / 9, rel=1e-5)
    assert rkd_distance_loss(7 * t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_rkd_angle_hand_case():
    # Right isosceles triangle (cosines 0, √½, √½) vs equilateral (½, ½, ½); each vertex has
    # two (j, k) orderings, 27 entries in all.
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    huber = 2 * 0.5 * 0.5**2 + 4 * 0.5 * (math.sqrt(0.5) - 0.5) ** 2
    assert rkd_angle_loss(s, t).item() == pytest.approx(huber / 27, rel=1e-5)
    assert rkd_angle_loss(3 * s + 1, s).item() == pytest.approx(0.0, abs=1e-7)


def test_pkt_hand_case():
    # Student orthogonal: rows (2/3, 1/3); teacher identical points: rows (½, ½).
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    per_row = 0.5 * math.log(0.5 / (2 / 3)) + 0.5 * math.log(0.5 / (1 / 3))
    assert pkt_loss(s, t).item() == pytest.approx(2 * per_row / 4, rel=1e-5)
    assert pkt_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_sp_hand_case():
    # G_S = I; G_T rows (1/√2, 1/√2): ‖diff‖² = 2(1 - 1/√2)² + 2·½, over B² = 4.
    s = torch.eye(2)
    t = torch.ones(2, 1)
    expected = (2 * (1 - 1 / math.sqrt(2)) ** 2 + 1.0) / 4
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert sp_loss(3 * s, s).item() == pytest.approx(0.0, abs=1e-7)


def test_dist_hand_case():
    # Two classes: every row/column correlation is ±1 or undefined (0). Sample 1 reversed
    # (1 - (-1) = 2), sample 2 agrees (0): inter = 1. Student columns are constant: intra = 1.
    t = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    s = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    assert dist_loss(s, t).item() == pytest.approx(2.0, abs=1e-6)
    assert dist_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert dist_loss(s, t, temperature=2.0, inter_weight=0.0).item() == pytest.approx(4.0, abs=1e-6)


def test_crd_nce_hand_case():
    # One anchor, K = 1 negative, noise K/N = ½: -[ln(1.5 / 2) + ln(0.5 / 1)] = ln(8/3).
    scores = torch.tensor([[1.5, 0.5]])
    assert crd_nce(scores, n_data=2).item() == pytest.approx(math.log(8 / 3), rel=1e-6)


def test_crd_hand_case_and_memory_update():
    crd = build_loss("crd", student_dim=2, teacher_dim=2, n_data=2, feat_dim=2, k=2, tau=1.0)
    with torch.no_grad():
        for head in (crd.embed_s, crd.embed_t):
            head.weight.copy_(torch.eye(2))
            head.bias.zero_()
        crd.memory_s.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        crd.memory_t.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    s, t = torch.tensor([[2.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 3.0]])
    value = crd(s, t, torch.tensor([0]))  # N = 2: both negatives are image 1
    # student (1, 0) against the teacher memory: similarities (0, 1, 1) -> exp: 1, e, e, and
    # Z = mean · N. Teacher (0, 1) against the student memory: 1, 1, 1 -> e, e, e; Z = 2e.
    e = math.e
    z_s = (1 + 2 * e) / 3 * 2
    expected = crd_nce(torch.tensor([[1 / z_s, e / z_s, e / z_s]]), 2)
    expected += crd_nce(torch.tensor([[0.5, 0.5, 0.5]]), 2)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    assert crd.z.tolist() == pytest.approx([z_s, 2 * e])
    value.backward()
    assert s.grad.abs().sum() > 0
    assert crd.embed_s.weight.grad.abs().sum() > 0
    # momentum ½ then unit length: image 0's rows move halfway to its new embeddings
    half = math.sqrt(0.5)
    assert crd.memory_s.flatten().tolist() == pytest.approx([half, half, 0.0, 1.0])
    assert crd.memory_t.flatten().tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0])
    crd(s, t, torch.tensor([1]))
    assert crd.z.tolist() == pytest.approx([z_s, 2 * e])  # Z is fixed after the first batch


def test_crd_negatives_are_uniform_over_the_other_images():
    torch.manual_seed(0)
    index = torch.tensor([0, 3, 4])
    drawn = other_indices(index, 20_000, 5)
    assert (drawn != index[:, None]).all()
    counts = torch.stack([torch.bincount(row, minlength=5) for row in drawn]).double()
    others = counts[counts > 0].view(3, 4) / 20_000
    assert torch.allclose(others, torch.full((3, 4), 0.25, dtype=torch.float64), atol=0.02)


def test_registry_holds_every_method_with_its_inputs():
    assert loss_names() == sorted(
        ["kd", "fitnet", "rkd_distance", "rkd_angle", "pkt", "sp", "dist", "pc", "crd"]
    )
    inputs = {name: loss_class(name).inputs for name in loss_names()}
    assert inputs["kd"] == inputs["dist"] == "logits"
    feature_only = ("fitnet", "rkd_distance", "rkd_angle", "pkt", "sp", "crd", "pc")
    assert {inputs[n] for n in feature_only} == {"features"}


def test_pc_from_registry_is_the_coherence_loss():
    s, t = torch.randn(12, 4), torch.randn(12, 9)
    from edgepc.coherence import perception_coherence_loss

    pc = build_loss("pc", tau=0.1, teacher_ranks="hard")
    assert pc(s, t) == perception_coherence_loss(s, t, tau=0.1, teacher_ranks="hard")


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "pkt", "sp", "pc"])
def test_feature_losses_give_finite_gradients_with_duplicates(name):
    s = torch.cat([torch.randn(5, 4)] * 2).requires_grad_()
    loss = build_loss(name)(s, torch.randn(10, 6))
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_unknown_loss_names_the_closest():
    with pytest.raises(
        ValueError, match=r"unknown loss 'rkd_angel' \(did you mean 'rkd_angle'\?\)"
    ):
        build_loss("rkd_angel")
    with pytest.raises(ValueError, match="unknown loss 'zzz': registered are crd, dist, fitnet"):
        build_loss("zzz")


def test_registering_twice_or_without_inputs_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("kd")(type("Again", (torch.nn.Module,), {"inputs": "logits"}))
    with pytest.raises(ValueError, match="must set inputs"):
        register_loss("new_one")(type("NoInputs", (torch.nn.Module,), {}))
