"""Teachers users bring: torchvision architectures from a weights file, exported programs."""

import pytest
import torch
from torch import nn
from torchvision import models

from edgepc.errors import ModelError
from edgepc.models.teachers import ProgramTeacher, reload_teacher, save_teacher, teacher_model
from edgepc.pipelines.config import load_config
from edgepc.pipelines.runner import run_pipeline, stage_keys
from edgepc.tracking import NoTracking
from tests.conftest import SMALL


def weights_file(tmp_path, architecture="resnet18", classes=10, seed=0):
    torch.manual_seed(seed)
    model = models.get_model(architecture, num_classes=classes).eval()
    path = tmp_path / f"{architecture}-{classes}.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_a_torchvision_teacher_from_a_weights_file_is_that_network(tmp_path):
    reference, path = weights_file(tmp_path)
    teacher, untrained = teacher_model("torchvision:resnet18", 10, 3, 32, path)
    assert not untrained  # its head fits the 10 classes: used as it is
    teacher.eval()
    x = torch.randn(4, 3, 32, 32)
    logits, embedding = teacher(x)
    torch.testing.assert_close(logits, reference(x))
    trunk = nn.Sequential(*list(reference.children())[:-1])  # all but fc: the head's input
    torch.testing.assert_close(embedding, trunk(x).flatten(1))
    assert embedding.shape == (4, 512)


def test_a_head_for_other_classes_is_replaced_and_the_rest_kept(tmp_path):
    reference, path = weights_file(tmp_path, classes=7)
    teacher, untrained = teacher_model("torchvision:resnet18", 10, 3, 32, path)
    assert untrained  # the new head has to be fine-tuned
    assert teacher.model.fc.out_features == 10
    kept = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    own = teacher.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in kept.items())
    assert teacher_model("torchvision:resnet18", 10, 3, 32)[1]  # no weights: trained here


def test_grayscale_data_meets_an_rgb_teacher_as_if_repeated_to_rgb(tmp_path):
    reference, path = weights_file(tmp_path)
    teacher, _ = teacher_model("torchvision:resnet18", 10, 1, 28, path)
    teacher.eval()
    gray = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(teacher(gray)[0], reference(gray.repeat(1, 3, 1, 1)),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


def test_a_wrong_weights_file_or_architecture_is_one_clear_line(tmp_path):
    _, path = weights_file(tmp_path)
    with pytest.raises(ModelError, match=r"do not fit torchvision:resnet34: \d+ missing keys"):
        teacher_model("torchvision:resnet34", 10, 3, 32, path)
    with pytest.raises(ModelError, match=r"mobilenet_v2: \d+ missing .* unexpected"):
        teacher_model("torchvision:mobilenet_v2", 10, 3, 32, path)
    with pytest.raises(ModelError, match=r"unknown torchvision architecture 'resnet51' \(did you"):
        teacher_model("torchvision:resnet51", 10, 3, 32)
    (tmp_path / "list.pt").write_bytes(b"")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"holds a list, not a state dict"):
        teacher_model("torchvision:resnet18", 10, 3, 32, tmp_path / "list.pt")
    with pytest.raises(ModelError, match=r"cannot load teacher checkpoint .*none\.pt"):
        teacher_model("torchvision:resnet18", 10, 3, 32, tmp_path / "none.pt")


class Pair(nn.Module):
    """A small network whose forward gives (logits, embedding), or ``outputs`` of them."""

    def __init__(self, classes=10, outputs=2):
        super().__init__()
        self.conv, self.fc, self.outputs = nn.Conv2d(1, 8, 3), nn.Linear(8, classes), outputs

    def forward(self, x):
        embedding = self.conv(x).relu().mean((2, 3))
        logits = self.fc(embedding)
        return (logits, embedding)[: self.outputs] if self.outputs > 1 else logits


def program(tmp_path, module, name="teacher.pt2", dynamic=True):
    torch.manual_seed(0)
    module = module.eval()
    example = (torch.randn(2, 1, 28, 28),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    path = tmp_path / name
    torch.export.save(torch.export.export(module, example, dynamic_shapes=shapes), path)
    return module, path


def test_an_exported_program_teacher_gives_its_logits_and_embedding(tmp_path):
    module, path = program(tmp_path, Pair())
    teacher, untrained = teacher_model(str(path), 10, 1, 28)
    assert isinstance(teacher, ProgramTeacher)
    assert not untrained
    x = torch.randn(5, 1, 28, 28)
    teacher.check(x[:3], 10)
    teacher.train()  # a mode switch does not reach the program (torch.export refuses it)
    for got, expected in zip(teacher(x), module(x), strict=True):
        torch.testing.assert_close(got, expected)
    saved = save_teacher(teacher, tmp_path)
    assert saved == "teacher.pt2"
    again = reload_teacher(str(path), tmp_path / saved, 10, 1, 28)
    torch.testing.assert_close(again(x)[0], module(x)[0])


def test_a_program_with_the_wrong_outputs_is_one_clear_line(tmp_path):
    x = torch.randn(3, 1, 28, 28)
    cases = [
        (Pair(outputs=1), True, r"gives one tensor; a teacher program returns \(logits, emb"),
        (Pair(classes=7), True, r"logits of shape \[2, 7\] .* the data has 10 classes"),
        (Pair(), False, r"does not run on a batch of 3 images .* dynamic batch"),
    ]
    for i, (module, dynamic, message) in enumerate(cases):
        _, path = program(tmp_path, module, f"p{i}.pt2", dynamic)
        teacher, _ = teacher_model(str(path), 10, 1, 28)
        with pytest.raises(ModelError, match=message):
            teacher.check(x, 10)
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(ModelError, match=r"cannot load the exported program .*junk\.pt2"):
        teacher_model(str(tmp_path / "junk.pt2"), 10, 1, 28)


def test_brought_teachers_run_through_the_teacher_and_distill_stages(tmp_path):
    """A torchvision teacher whose 1,000-class head is replaced and fine-tuned; then that
    teacher exported as a program and brought back: it scores exactly the same. Each feeds the
    distill stage, which reloads it for augmented batches."""
    _, weights = weights_file(tmp_path, classes=1000)
    augment = "distill.train={epochs: 3, batch_size: 32, lr: 0.003, augment: true, beta: 1.0}"
    common = [*SMALL, augment, "teacher.train.epochs=3"]
    cache = tmp_path / "cache"

    def run(*teacher: str) -> dict[str, dict[str, float]]:
        config = load_config("cpu", overrides=[*common, *teacher])
        report = run_pipeline(config, cache, NoTracking(), progress=False, echo=lambda _: None,
                              until="distill")  # fmt: skip
        assert [s.status for s in report.stages][1:] == ["ran", "ran"]
        return {s.stage: s.metrics for s in report.stages}

    tv = run("teacher.model=torchvision:resnet18", f"teacher.checkpoint={weights}")
    assert tv["teacher"]["test_top1"] > 0.2  # chance 0.1 on 1,000 test images
    assert tv["distill"]["test_top1"] > 0.2
    trained, _ = teacher_model("torchvision:resnet18", 10, 1, 28)
    trained.model.load_state_dict(torch.load(next(cache.glob("teacher-*/teacher.pt"))))
    _, exported = program(tmp_path, trained)
    brought = run(f"teacher.model={exported}")
    for key in ("test_top1", "test_knn_top1"):
        assert brought["teacher"][key] == pytest.approx(tv["teacher"][key], abs=1e-3), key
    assert brought["distill"]["test_top1"] > 0.2
    config = load_config("cpu", overrides=[f"teacher.model={exported}"])
    first = stage_keys(config)["teacher"]
    elsewhere = tmp_path / "moved.pt2"
    elsewhere.write_bytes(exported.read_bytes())
    moved = load_config("cpu", overrides=[f"teacher.model={elsewhere}"])
    assert stage_keys(moved)["teacher"] == first  # the bytes decide, not the path
    program(tmp_path, Pair(), name="moved.pt2")
    assert stage_keys(moved)["teacher"] != first  # another program at that path
