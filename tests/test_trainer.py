"""The trainer on a small real subset of Fashion-MNIST (Debian's dataset-fashion-mnist)."""

import pytest
import torch

from edgepc.distill.evaluate import evaluate_embeddings, knn_top1, linear_probe, predict, top1
from edgepc.distill.images import Normalisation, augment
from edgepc.distill.trainer import (
    TrainConfig,
    atomic_save,
    load_checkpoint,
    recalibrate_batch_norm,
    train,
)
from edgepc.errors import TrainingError
from edgepc.models import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def subset(tiny):
    return tiny.x, tiny.y, tiny.val_x, tiny.val_y, tiny.norm


@pytest.fixture(scope="module")
def teacher(tiny):
    return tiny.teacher


def scores(model, subset, teacher_model=None):
    x, y, vx, vy, norm = subset
    logits, emb = predict(model, vx, norm, CPU)
    bank = predict(model, x, norm, CPU)[1]
    t_emb = predict(teacher_model, vx, norm, CPU)[1] if teacher_model else None
    return evaluate_embeddings(logits, emb, vy, bank, y, t_emb)


def test_training_on_labels_beats_chance_by_far(subset, teacher):
    torch.manual_seed(0)
    untrained = scores(build_model("tiny_cnn"), subset)["top1"]
    trained = scores(teacher, subset)["top1"]
    assert untrained < 0.2  # 10 classes: chance is 0.1
    assert trained > 0.65


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(epochs=2, alpha=0.0, beta=1.0, lr=3e-3),
        TrainConfig(epochs=2, alpha=0.0, baselines={"fitnet": {"weight": 1.0}}, lr=3e-3),
        TrainConfig(epochs=1, alpha=1.0, beta=1.0, baselines={"kd": {"weight": 0.5}}),
        TrainConfig(epochs=4, alpha=0.0, baselines={"crd": {"weight": 0.8, "k": 256}}, lr=3e-3),
    ],
    ids=["pc-label-free", "fitnet-projector", "ce+pc+kd", "crd-memory-bank"],
)
def test_distillation_makes_the_student_more_coherent(subset, teacher, config):
    x, y, _, _, norm = subset
    torch.manual_seed(1)
    student = build_model("tiny_cnn")
    before = scores(student, subset, teacher)
    history = train(student, x, y, norm, config, CPU, teacher=teacher, progress=False)
    after = scores(student, subset, teacher)
    assert after["pc_triplet_agreement"] > before["pc_triplet_agreement"] + 0.1
    assert after["knn_top1"] > before["knn_top1"]
    assert len(history) == config.epochs
    assert history[-1]["loss"] < history[0]["loss"] or config.epochs == 1


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(epochs=3, batch_size=64),
        # The PC queue lives in the checkpoint: a resumed run ranks against the same inputs.
        TrainConfig(epochs=3, batch_size=64, alpha=0.0, beta=1.0, pc={"queue": 100}),
    ],
    ids=["labels", "pc-queue"],
)
def test_resume_after_a_crash_equals_an_uninterrupted_run(subset, teacher, tmp_path, config):
    x, y, _, _, norm = subset
    x, y = x[:300], y[:300]
    distill = {"teacher": teacher} if config.beta else {}

    def fresh():
        torch.manual_seed(5)
        return build_model("tiny_cnn")

    straight = fresh()
    train(straight, x, y, norm, config, CPU, progress=False, **distill)

    class CrashError(Exception):
        pass

    def crash_after_two(epoch, _metrics):
        if epoch == 2:
            raise CrashError

    crashed = fresh()
    with pytest.raises(CrashError):
        train(crashed, x, y, norm, config, CPU, checkpoint=tmp_path / "ck.pt",
              on_epoch=crash_after_two, progress=False, **distill)  # fmt: skip
    assert load_checkpoint(tmp_path / "ck.pt")["epoch"] == 2
    resumed = fresh()  # a new process would start from fresh weights too
    history = train(resumed, x, y, norm, config, CPU, checkpoint=tmp_path / "ck.pt",
                    progress=False, **distill)  # fmt: skip
    assert len(history) == 3
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_non_finite_loss_stops_with_a_clear_error(subset):
    x, y, _, _, _ = subset
    broken = Normalisation(mean=(0.5,), std=(0.0,))  # division by zero: inf inputs
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step 1 .*lower the"):
        train(build_model("tiny_cnn"), x[:64], y[:64], broken, TrainConfig(), CPU, progress=False)


def test_corrupt_checkpoint_is_reported(tmp_path, subset):
    x, y, _, _, norm = subset
    (tmp_path / "ck.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match=r"unreadable.*delete it"):
        train(build_model("tiny_cnn"), x[:64], y[:64], norm, TrainConfig(), CPU,
              checkpoint=tmp_path / "ck.pt", progress=False)  # fmt: skip


def test_distillation_without_teacher_is_an_error(subset):
    x, y, _, _, norm = subset
    with pytest.raises(TrainingError, match="no teacher"):
        train(build_model("tiny_cnn"), x[:64], y[:64], norm, TrainConfig(beta=1.0), CPU,
              progress=False)  # fmt: skip


def test_checkpoint_of_another_model_is_reported(subset, tmp_path):
    x, y, _, _, norm = subset
    config = TrainConfig(epochs=1, batch_size=64)
    train(build_model("tiny_cnn"), x[:64], y[:64], norm, config, CPU,
          checkpoint=tmp_path / "ck.pt", progress=False)  # fmt: skip
    with pytest.raises(TrainingError, match=r"does not fit this model.*delete it"):
        train(build_model("shufflenetv2_0.5"), x[:64], y[:64], norm, config, CPU,
              checkpoint=tmp_path / "ck.pt", progress=False)  # fmt: skip


def test_nothing_to_train_is_an_error(subset):
    x, y, _, _, norm = subset
    with pytest.raises(TrainingError, match="nothing to train"):
        train(build_model("tiny_cnn"), x[:64], y[:64], norm, TrainConfig(alpha=0.0), CPU,
              progress=False)  # fmt: skip


def test_atomic_save_leaves_no_temporary(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_top1_and_knn_hand_cases():
    assert (
        top1(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])) == 2 / 3
    )
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    bank_labels = torch.tensor([0, 0, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_top1(bank, bank_labels, queries, torch.tensor([0, 1]), k=1) == 1.0
    # k = 3: the second query has two class-0 neighbours (cosine 0.05 and 0.16) against one
    # class-1 neighbour (1.0): a plain majority would say 0, the similarity-weighted vote 1.
    assert knn_top1(bank, bank_labels, queries, torch.tensor([0, 1]), k=3) == 1.0


def test_knn_in_small_query_chunks_votes_as_with_a_normalised_bank():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=gen), torch.randn(70, 16, generator=gen)
    bank_labels, labels = torch.randint(0, 4, (300,), generator=gen), torch.arange(70) % 4
    unit = torch.nn.functional.normalize
    sims, idx = (unit(queries, dim=1) @ unit(bank, dim=1).T).topk(5, dim=1)  # the definition
    votes = torch.zeros(70, 4).scatter_add_(1, bank_labels[idx], sims)
    expected = (votes.argmax(1) == labels).double().mean().item()
    assert 0.1 < expected < 0.5  # random data: neither all right nor all wrong
    for budget in (1, 300 * 7, 1 << 24):  # 1, 7 and 1024 queries at a time
        assert knn_top1(bank, bank_labels, queries, labels, budget=budget) == expected


def test_linear_probe_read_in_chunks_fits_the_whole_bank_probe():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(200) % 3
    bank = torch.randn(200, 8, generator=gen) + 1.5 * labels[:, None]  # mostly separable
    whole, chunked = linear_probe(bank, labels, chunk=200), linear_probe(bank, labels, chunk=17)
    assert torch.allclose(whole.weight, chunked.weight, atol=1e-6)
    assert torch.allclose(whole.bias, chunked.bias, atol=1e-6)
    assert top1(chunked(bank), labels) > 0.8  # it learned: chance is 1/3


def test_augment_is_a_seeded_flip_and_shift_per_image_done_batched():
    images = torch.randint(0, 256, (64, 3, 9, 7), dtype=torch.uint8)
    a = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, augment(images, torch.Generator().manual_seed(0)))
    # The per-image loop it replaces, on the same draws: the same images.
    gen = torch.Generator().manual_seed(0)
    flip = torch.rand(64, generator=gen) < 0.5
    dy, dx = torch.randint(0, 5, (2, 64), generator=gen).tolist()
    padded = torch.nn.functional.pad(torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images),
                                     (2, 2, 2, 2))  # fmt: skip
    loop = torch.stack([padded[i, :, dy[i] : dy[i] + 9, dx[i] : dx[i] + 7] for i in range(64)])
    assert torch.equal(a, loop)
    assert 0 < flip.sum() < 64
    assert len(set(zip(dy, dx, strict=True))) > 10  # shifts differ per image


def test_recalibrated_batch_norm_holds_the_statistics_of_the_final_weights():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(conv, bn).eval()
    bn.running_mean.fill_(5.0)  # stale statistics
    bn.running_var.fill_(9.0)
    images = torch.randint(0, 256, (96, 1, 8, 8), dtype=torch.uint8)
    norm = Normalisation((0.5,), (0.25,))
    recalibrate_batch_norm(model, images, norm, torch.device("cpu"), batch_size=32)
    with torch.no_grad():
        features = conv(norm.apply(images))
    # three equal batches: the average of their means is the mean of all
    assert torch.allclose(bn.running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, features.var((0, 2, 3)), rtol=0.05)
    assert bn.momentum == 0.1  # restored, and the model back in eval mode
    assert not model.training


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from edgepc.hardware import cpu_has_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert not cpu_has_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert cpu_has_bf16(info)
    info.write_text("flags\t\t: fpu amx_tile amx_bf16\n")
    assert cpu_has_bf16(info)
    assert not cpu_has_bf16(tmp_path / "missing")


def test_training_formats_are_configured_or_the_fastest_in_a_trial(monkeypatch, subset):
    """fp32 in the default layout unless asked; ``auto`` takes a format over fp32 only when its
    trial is 10 % faster, bf16 only where the CPU has it natively, and never for a training
    too short to pay a trial."""
    from edgepc.distill import trainer

    model, x = build_model("tiny_cnn"), subset[4].apply(subset[0][:8])
    seconds = {(False, False): 1.0, (True, False): 0.95, (True, True): 0.5}
    monkeypatch.setattr(trainer, "_trial", lambda m, b, candidates: {c: seconds[c] for c in
                                                                       candidates})  # fmt: skip
    auto = TrainConfig(channels_last="auto", bf16="auto")
    for native, expected in ((True, (True, True)), (False, (False, False))):  # 0.95: not 10 %
        monkeypatch.setattr(trainer, "cpu_has_bf16", lambda native=native: native)
        assert trainer.formats(model, x, auto, CPU, steps=100) == expected
    assert trainer.formats(model, x, TrainConfig(), CPU, 100) == (False, False)
    assert trainer.formats(model, x, auto, CPU, steps=10) == (False, False)
    assert trainer.formats(model, x, TrainConfig(channels_last="auto", bf16=True), CPU,
                           100) == (True, True)  # fmt: skip
    fixed = TrainConfig(channels_last=True, bf16=False)
    assert trainer.formats(model, x, fixed, CPU, 100) == (True, False)
    assert trainer.formats(model, x, TrainConfig(), torch.device("cuda"), 100) == (False, True)


def test_a_format_trial_leaves_the_model_as_it_was(subset):
    from edgepc.distill.trainer import _trial

    torch.manual_seed(0)
    model = build_model("tiny_cnn").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = _trial(model, subset[4].apply(subset[0][:32]), [(False, False), (True, True)])
    assert set(seconds) == {(False, False), (True, True)}
    assert all(v > 0 for v in seconds.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics too
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_trains_the_same_model_as_the_default_layout(subset):
    """The memory format changes how oneDNN walks the tensors, not what it computes: fp32
    training in both layouts follows the same losses up to float rounding and ends at models
    that classify alike; the layout is recorded in the history."""
    x, y, vx, _, norm = subset
    models, histories = [], []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny_cnn")
        config = TrainConfig(epochs=2, lr=3e-3, channels_last=channels_last, bf16=False)
        histories.append(train(model, x[:512], y[:512], norm, config, CPU, progress=False))
        models.append(model)
        # handed back in the default layout: exporters trace the layout they find
        assert all(p.is_contiguous() for p in model.parameters())
    assert [h[-1]["channels_last"] for h in histories] == [0.0, 1.0]
    assert histories[0][-1]["bf16"] == histories[1][-1]["bf16"] == 0.0
    for epoch in range(2):
        assert histories[1][epoch]["loss"] == pytest.approx(histories[0][epoch]["loss"], rel=1e-4)
    first, second = (predict(m, vx, norm, CPU)[0].argmax(1) for m in models)
    assert (first == second).float().mean() >= 0.99
