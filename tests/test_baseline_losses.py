"""Each baseline against a small case computed by hand (values in the comments)."""

import math

import pytest
import torch

from edgepc.distill.losses import build_loss, loss_class, loss_names, register_loss
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


def test_registry_holds_every_method_with_its_inputs():
    assert loss_names() == sorted(
        ["kd", "fitnet", "rkd_distance", "rkd_angle", "pkt", "sp", "dist", "pc"]
    )
    inputs = {name: loss_class(name).inputs for name in loss_names()}
    assert inputs["kd"] == inputs["dist"] == "logits"
    assert {inputs[n] for n in ("fitnet", "rkd_distance", "rkd_angle", "pkt", "sp", "pc")} == {
        "features"
    }


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
    with pytest.raises(ValueError, match="unknown loss 'zzz': registered are dist, fitnet"):
        build_loss("zzz")


def test_registering_twice_or_without_inputs_fails():
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("kd")(type("Again", (torch.nn.Module,), {"inputs": "logits"}))
    with pytest.raises(ValueError, match="must set inputs"):
        register_loss("new_one")(type("NoInputs", (torch.nn.Module,), {}))
