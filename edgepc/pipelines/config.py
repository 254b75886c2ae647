"""The pipeline's typed configuration: YAML + profile + ``key=value`` overrides, validated.

Unknown keys are errors that name the key and the closest valid one; every stage reads only
its own section, whose content hash decides whether the stage re-runs.
"""

from __future__ import annotations

import copy
import difflib
import inspect
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgepc.distill.losses import loss_class
from edgepc.errors import EdgepcError, ModelError
from edgepc.models.specs import check_spec
from edgepc.targets import TARGETS, TargetName

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # shipped with the package


class ConfigError(EdgepcError):
    """A pipeline configuration is malformed: unknown key, wrong type, bad value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PCSection(Section):
    """Options of the perception-coherence loss (see edgepc.coherence.loss)."""

    dissimilarity: Literal["euclidean", "sqeuclidean", "cosine"] = "euclidean"
    tau: float = Field(0.3, gt=0)
    penalty: Literal["square", "abs"] = "square"
    teacher_ranks: Literal["soft", "hard"] = "soft"
    # Width h of the neighbourhood weighting exp(-R_T / h) of each pair (None: every pair alike)
    neighbourhood: float | None = Field(None, gt=0)
    # Ranks also counted against the last M inputs seen (a queue; None: the batch alone)
    queue: int | None = Field(None, ge=1)


class TrainSection(Section):
    epochs: int = Field(5, ge=0)
    batch_size: int = Field(128, ge=3)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["cosine", "constant"] = "cosine"
    alpha: float = Field(1.0, ge=0)
    beta: float = Field(0.0, ge=0)
    gamma: float = Field(0.0, ge=0)  # L_PC against the fp32 student: the qat stage only
    pc: PCSection = PCSection()
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    augment: bool = False
    recalibrate_bn: bool = False  # recompute batch-norm statistics after training (short runs)
    # CPU training format; auto: the fastest in a short trial (CUDA trains in bf16)
    channels_last: bool | Literal["auto"] = False
    bf16: bool | Literal["auto"] = False

    @field_validator("baselines")
    @classmethod
    def _registered(cls, baselines: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, options in baselines.items():
            accepted = inspect.signature(loss_class(name)).parameters  # unknown: a ValueError
            valid = {"weight", *accepted} - {"student_dim", "teacher_dim"}
            for option in options:
                if option not in valid:
                    takes = ", ".join(sorted(valid))
                    raise ValueError(f"loss {name!r} has no option {option!r}; it takes {takes}")
        return baselines


class DataSection(Section):
    dataset: Literal["fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder"] = (
        "fashion-mnist"
    )
    root: str | None = None
    val_fraction: float = Field(0.1, ge=0, lt=1)
    calibration_size: int = Field(512, ge=0)
    train_limit: int | None = Field(None, ge=10)
    # A seeded stratified subset of the test split that every stage evaluates on (None: all).
    test_limit: int | None = Field(None, ge=10)
    # Every image resized to image_size × image_size, with this many channels (None: as stored).
    image_size: int | None = Field(None, ge=8, le=1024)
    channels: Literal[1, 3] | None = None
    # An image folder is streamed from disk (decoded batch by batch in worker processes);
    # true reads it whole into memory (faster for a small folder). Other datasets: in memory.
    in_memory: bool = False


class TeacherSection(Section):
    model: str = "resnet18"
    checkpoint: str | None = None  # a state dict to load instead of training
    train: TrainSection = TrainSection(epochs=10, augment=True, weight_decay=5e-4)


class DistillSection(Section):
    """The student: trained on ``train_limit`` images of the train split (a fixed subset chosen
    by the pipeline seed; None: all), initialised and shuffled by ``seed`` (None: the pipeline
    seed), so that seeds of one study share the data split and the teacher."""

    student: str = "mobilenetv2_0.5"  # a zoo name or torchvision:<architecture>
    student_checkpoint: str | None = None  # a state dict to start the student from
    train: TrainSection = TrainSection(alpha=0.0, beta=1.0)
    train_limit: int | None = Field(None, ge=10)
    seed: int | None = None
    pc_eval_limit: int | None = Field(5000, ge=3)

    @field_validator("student")
    @classmethod
    def _known(cls, student: str) -> str:
        try:
            check_spec(student, "student")
        except ModelError as error:
            raise ValueError(str(error)) from None
        return student


class QATSection(Section):
    """Quantization-aware fine-tuning of the distilled student for the pipeline's target:
    α·CE + β·L_PC(int8 student, teacher) + γ·L_PC(int8 student, fp32 student), on a fixed
    subset of ``train_limit`` training images; the last ``freeze_observers_epochs`` epochs keep
    the activation scales fixed. ``plain_qat`` also runs β = γ = 0 (the ablation row).
    ``weight_bits``: 7 (range ±63) or 8; null: the target's recipe, 7 for cpu (onnxruntime's
    fast int8 kernels stay exact on x86 CPUs without VNNI), 8 for mobile and jetson.
    ``float_layers``: layer paths (glob patterns, e.g. ``features.0.*``) kept float, such as the
    layers a device's own profile or an accuracy probe found better in float. ``speed_plan``: on
    a target whose host is the device (cpu), also keep float the kinds of layers that make the
    int8 file slower here (:mod:`edgepc.export.speed_plan`)."""

    train: TrainSection = TrainSection(epochs=2, lr=1e-4, alpha=1.0, beta=3.0, gamma=3.0)
    train_limit: int | None = Field(10000, ge=10)
    freeze_observers_epochs: int = Field(1, ge=0)
    plain_qat: bool = True
    pc_eval_limit: int | None = Field(5000, ge=3)
    weight_bits: Literal[7, 8] | None = None
    float_layers: list[str] = []
    speed_plan: bool = True


class ParityBounds(Section):
    """How closely an exported file must reproduce its PyTorch model (see edgepc.export.parity)."""

    top1_agreement: float = Field(ge=0, le=1)
    max_logit_delta: float = Field(ge=0)  # relative to the largest |logit| of the reference
    pc_triplet_agreement: float = Field(ge=0, le=1)


class ExportSection(Section):
    """The target's files: fp32 and int8 (the coherence-keeping QAT model; with ``ptq`` the
    PTQ model too, for comparison), each checked against PyTorch on ``parity_size`` test images."""

    ptq: bool = True
    parity_size: int = Field(1000, ge=10)
    fp32_parity: ParityBounds = ParityBounds(
        top1_agreement=0.999, max_logit_delta=1e-3, pc_triplet_agreement=0.99
    )
    int8_parity: ParityBounds | None = None  # null: the target's (edgepc.targets)
    pc_eval_limit: int = Field(5000, ge=3)  # teacher embeddings in the bundle: pc_* on these


class LatencySection(Section):
    """Batch-1 latency in the runtime: ``warmup`` untimed calls, then ``iterations`` timed ones
    per thread count, in turns of ``block`` calls that interleave every bundle (so that int8
    and its fp32 sibling are timed under the same load: :func:`edgepc.measure.
    interleaved_latency`)."""

    warmup: int = Field(20, ge=0)
    iterations: int = Field(2000, ge=2)
    threads: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    block: int = Field(10, ge=1)


class ValidateSection(Section):
    """Every artifact on the full test set in its runtime; ``max_drop``: the most top-1 (in
    points) an artifact may lose against the fp32 PyTorch student before the pipeline fails."""

    max_drop: float = Field(1.0, ge=0)
    latency: LatencySection = LatencySection()


class RegisterSection(Section):
    """Passing artifacts go to the MLflow model registry as versions of ``model`` (default
    ``edgepc-<pipeline name>``), each under the alias ``<target>-<precision>``."""

    model: str | None = None


class TrackingSection(Section):
    """What a failing MLflow store does to a pipeline: ``spool`` keeps training and keeps its
    runs in a local spool (``python -m edgepc.tracking.sync`` replays them); ``stop`` ends the
    pipeline with one line (what it could not record is spooled too; a rerun resumes)."""

    on_error: Literal["spool", "stop"] = "spool"


class PipelineConfig(Section):
    name: str
    target: TargetName
    seed: int = 0
    device: str = "auto"
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    distill: DistillSection = DistillSection()
    qat: QATSection = QATSection()
    export: ExportSection = ExportSection()
    validation: ValidateSection = ValidateSection()
    registry: RegisterSection = RegisterSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="before")
    @classmethod
    def _target_defaults(cls, data: Any) -> Any:
        """Null weight bits and int8 parity bounds become the target's (edgepc.targets), so
        that stage keys hold them."""
        target = data.get("target") if isinstance(data, dict) else None
        if not isinstance(target, str) or target not in TARGETS:
            return data  # the field validators say what is wrong
        spec = TARGETS[target]
        defaults = (("qat", "weight_bits", spec.recipe.weight_bits),
                    ("export", "int8_parity", asdict(spec.int8_parity)))  # fmt: skip
        for section, key, value in defaults:
            part = data.get(section, {})
            if isinstance(part, dict) and part.get(key) is None:
                data = {**data, section: {**part, key: value}}
        return data


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` with the value read as YAML (numbers, booleans, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (e.g. distill.train.epochs=3)")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {text!r}: value is not valid YAML ({_one_line(error)})"
        ) from None


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at ``loc`` (the parent of the offending key) in the schema."""
    for key in loc:
        annotation = model.model_fields[key].annotation if key in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _explain(error: ValidationError, model: type[BaseModel]) -> str:
    first = error.errors()[0]
    loc = tuple(str(part) for part in first["loc"])
    where = ".".join(loc)
    if first["type"] == "extra_forbidden":
        valid = _field_names(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = f"did you mean {'.'.join((*loc[:-1], close[0]))!r}?" if close else ""
        return f"unknown key {where!r}; {hint or 'valid keys: ' + ', '.join(valid)}"
    return f"{where}: {first['msg']} (got {first.get('input')!r})"


def load_config(
    target: str | None = None,
    path: Path | None = None,
    profile: str | None = None,
    overrides: list[str] = (),
) -> PipelineConfig:
    """``edgepc/configs/<target>.yaml`` (or ``path``), then the profile, then the overrides."""
    return load_yaml(PipelineConfig, path or CONFIGS / f"{target}.yaml", profile, overrides)


Model = TypeVar("Model", bound=BaseModel)


def load_yaml(
    model: type[Model], path: Path, profile: str | None = None, overrides: list[str] = ()
) -> Model:
    """The one config loader: a YAML file, then its named profile (``profiles: {name: {dotted
    key: value}}``), then ``key=value`` overrides, validated by ``model``; every error is one
    :class:`ConfigError` line."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
        raise ConfigError(f"no config {path}; edgepc ships {known}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {_one_line(error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    tree = copy.deepcopy(raw)
    profiles = tree.pop("profiles", {}) or {}
    if profile is not None:
        if profile not in profiles:
            have = ", ".join(profiles) or "none"
            raise ConfigError(f"profile {profile!r} is not in {path.name}; it has: {have}")
        for key, value in profiles[profile].items():
            _set_dotted(tree, key, value)
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    try:
        return model.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{path.name}: {_explain(error, model)}") from None
