"""The pipeline's stages: each a function of its config section (and the top-level keys it
reads), the typed outputs of its upstream stages and a context, to a typed result.

A stage reads nothing else of the config: what it is given is what its cache key covers (the
runner passes exactly the sections the key is built from). Stages write their files into
``context.workdir`` and report metrics through ``context.log``; they never touch MLflow or the
cache (the runner owns both).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch

from edgepc.data import channel_stats, fingerprint, load_dataset, make_splits
from edgepc.data.datasets import ImageDataset, stratified_subset
from edgepc.data.images import load
from edgepc.distill.evaluate import (
    better_than_chance,
    evaluate_embeddings,
    linear_probe,
    predict,
    predict_batches,
)
from edgepc.distill.images import Normalisation
from edgepc.distill.trainer import TeacherTargets, TrainConfig, atomic_save, train
from edgepc.errors import TrainingError
from edgepc.export import speed_plan
from edgepc.export.speed_plan import SpeedPlan
from edgepc.files import npy_rows, write_text
from edgepc.models import EmbeddingModel
from edgepc.models.specs import model_from_spec
from edgepc.models.teachers import ProgramTeacher, reload_teacher, save_teacher, teacher_model
from edgepc.pipelines.config import (
    DataSection,
    DistillSection,
    QATSection,
    TeacherSection,
    TrainSection,
)
from edgepc.pipelines.plots import plot_history, plot_qat
from edgepc.quant import finetune, quantized, recipes
from edgepc.targets import get_target
from edgepc.tracking import Tracking


@dataclass(frozen=True)
class StageContext:
    workdir: Path
    device: torch.device
    log: Callable[[dict[str, float], int | None], None]
    progress: bool = True
    run_id: str | None = None  # the stage's MLflow run
    registry: Tracking | None = None  # the register stage's model registry


# What each stage tells the stages after it (besides its metrics and files): typed, and kept in
# the stage's result.json.
@dataclass(frozen=True)
class DataFacts:
    dataset: str  # where the data comes from, to load it again downstream
    root: str | None
    test_limit: int | None
    seed: int
    stream: bool  # an image folder read from disk batch by batch
    fingerprint: str
    classes: list[str]
    channels: int
    image_size: list[int]
    mean: list[float]
    std: list[float]
    train_class_counts: list[int]

    @property
    def model_shape(self) -> tuple[int, int, int]:
        """What a model of this data is built for: classes, input channels, image side."""
        return len(self.classes), self.channels, min(self.image_size)


@dataclass(frozen=True)
class EmbeddingFacts:  # teacher, distill
    model: str  # the architecture, to build it again downstream
    embedding_dim: int


@dataclass(frozen=True)
class QATFacts:
    target: str
    weight_bits: int
    table: dict[str, dict[str, float]]  # model -> its test metrics
    keep_float: dict[str, str] = field(default_factory=dict)  # layer pattern -> why it is float


@dataclass(frozen=True)
class ExportFacts:
    target: str
    bundles: list[str]
    parity: dict[str, dict[str, float]]  # bundle -> its parity with PyTorch


@dataclass(frozen=True)
class ValidateFacts:
    rows: dict[str, dict[str, float]]  # bundle -> accuracy, coherence, latency, size
    table: str


@dataclass(frozen=True)
class RegisterFacts:
    model: str
    versions: dict[str, str]  # alias -> version


Facts = DataFacts | EmbeddingFacts | QATFacts | ExportFacts | ValidateFacts | RegisterFacts
F = TypeVar("F", DataFacts, EmbeddingFacts, QATFacts, ExportFacts, ValidateFacts, RegisterFacts)


@dataclass
class StageResult(Generic[F]):
    """What a stage hands downstream: key metrics, its files (relative to its workdir), facts."""

    metrics: dict[str, float]
    files: dict[str, str]
    facts: F


@dataclass
class Output(StageResult[F]):
    """A finished stage as the stages after it see it: its result and the folder it lies in."""

    workdir: Path

    def file(self, key: str) -> Path:
        return self.workdir / self.files[key]


@dataclass(frozen=True)
class PreparedData:
    dataset: ImageDataset
    train: torch.Tensor
    val: torch.Tensor
    calibration: torch.Tensor
    norm: Normalisation


def load_data(
    dataset: str,
    root: str | None,
    test_limit: int | None,
    seed: int,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    stream: bool = False,
) -> ImageDataset:
    """A dataset at ``image_size`` with ``channels`` (None: as stored; an image folder streamed
    from disk with ``stream``), its test part cut to ``test_limit`` images (a stratified subset
    of the pipeline's ``seed``, the same in every stage)."""
    path = Path(root) if root else None
    loaded = load_dataset(dataset, path, True, image_size, channels, stream)
    labels = loaded.test_labels
    if test_limit is None or test_limit >= len(labels):
        return loaded
    keep = stratified_subset(labels, test_limit / len(labels), seed + 3)
    return replace(loaded, test_images=loaded.test_images[keep], test_labels=labels[keep])


def prepare_data(data: Output[DataFacts]) -> PreparedData:
    """The dataset and the data stage's split, loaded again for a downstream stage."""
    facts = data.facts
    dataset = load_data(facts.dataset, facts.root, facts.test_limit, facts.seed,
                        tuple(facts.image_size), facts.channels, facts.stream)  # fmt: skip
    splits = torch.load(data.file("splits"), weights_only=True)
    norm = Normalisation(tuple(facts.mean), tuple(facts.std))
    return PreparedData(dataset, splits["train"], splits["val"], splits["calibration"], norm)


def data_stage(section: DataSection, seed: int, ctx: StageContext) -> StageResult[DataFacts]:
    stream = not section.in_memory
    dataset = load_data(section.dataset, section.root, section.test_limit, seed,
                        section.image_size, section.channels, stream)  # fmt: skip
    splits = make_splits(
        dataset.train_labels,
        section.val_fraction,
        section.calibration_size,
        seed,
        section.train_limit,
    )
    mean, std = channel_stats(dataset.train_images[splits.train])
    atomic_save(
        {"train": splits.train, "val": splits.val, "calibration": splits.calibration},
        ctx.workdir / "splits.pt",
    )
    counts = torch.bincount(dataset.train_labels[splits.train], minlength=len(dataset.classes))
    facts = DataFacts(section.dataset, section.root, section.test_limit, seed, stream,
                      fingerprint(dataset), list(dataset.classes), dataset.channels,
                      list(dataset.image_size), mean, std, counts.tolist())  # fmt: skip
    write_text(ctx.workdir / "data.json", json.dumps(asdict(facts), indent=2))
    metrics = {
        "train_size": len(splits.train),
        "val_size": len(splits.val),
        "test_size": len(dataset.test_labels),
        "calibration_size": len(splits.calibration),
    }
    return StageResult(metrics, {"splits": "splits.pt", "summary": "data.json"}, facts)


def _build(spec: str, data: Output[DataFacts], checkpoint: str | None = None) -> EmbeddingModel:
    """The student ``spec`` names (a zoo name or ``torchvision:<arch>``) for the data."""
    start = Path(checkpoint) if checkpoint else None
    return model_from_spec(spec, *data.facts.model_shape, start, "student")[0]


def subset(size: int, limit: int | None, seed: int) -> torch.Tensor:
    """Sorted positions of a fixed random subset of ``limit`` of ``size`` items (None: all)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=gen)[:limit].sort().values


def rows(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values[keep]``; all of them as they are (a memory map stays one) when ``keep`` is all."""
    return values if len(keep) == len(values) else values[keep]


def _fit(
    model: EmbeddingModel,
    prepared: PreparedData,
    section: TrainSection,
    seed: int,
    ctx: StageContext,
    title: str,
    keep: torch.Tensor | None = None,
    **teacher: object,
) -> list[dict[str, float]]:
    """Train on the train split (its positions ``keep``: all when None) with the stage's
    checkpoint, then plot the curves."""
    rows = prepared.train if keep is None else prepared.train[keep]
    history = train(
        model,
        prepared.dataset.train_images[rows],
        prepared.dataset.train_labels[rows],
        prepared.norm,
        TrainConfig(**section.model_dump(), seed=seed),
        ctx.device,
        checkpoint=ctx.workdir / "training.pt",
        on_epoch=lambda epoch, metrics: ctx.log(metrics, epoch),
        progress=ctx.progress,
        **teacher,
    )
    plot_history(history, ctx.workdir / "curves.png", title)
    return history


OUTPUTS = "teacher_outputs"  # {train,val,test}_{logits,embeddings}.npy


def teacher_outputs(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The teacher stage's logits and embeddings per part, memory-mapped from ``folder``
    (copy-on-write: nothing is read until used, and nothing is written back)."""

    def mapped(name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))

    kinds = ("logits", "embeddings")
    return {part: {k: mapped(f"{part}_{k}") for k in kinds} for part in ("train", "val", "test")}


def teacher_stage(
    section: TeacherSection, seed: int, data: Output[DataFacts], ctx: StageContext
) -> StageResult[EmbeddingFacts]:
    prepared = prepare_data(data)
    torch.manual_seed(seed)
    facts, checkpoint = data.facts, Path(section.checkpoint) if section.checkpoint else None
    teacher, untrained = teacher_model(section.model, *facts.model_shape, checkpoint)
    images, labels = prepared.dataset.train_images, prepared.dataset.train_labels
    if isinstance(teacher, ProgramTeacher):
        teacher.check(prepared.norm.apply(load(images[prepared.train[:3]])), len(facts.classes))
    if untrained:  # no weights, or a new head for these classes
        _fit(teacher, prepared, section.train, seed, ctx, f"teacher {section.model}")
    files = {"model": save_teacher(teacher, ctx.workdir), "outputs": OUTPUTS}
    folder = ctx.workdir / OUTPUTS
    folder.mkdir(exist_ok=True)
    for part, x in (
        ("train", images[prepared.train]),
        ("val", images[prepared.val]),
        ("test", prepared.dataset.test_images),
    ):
        with (
            npy_rows(folder / f"{part}_logits.npy", len(x)) as logits,
            npy_rows(folder / f"{part}_embeddings.npy", len(x)) as embeddings,
        ):
            for batch_logits, batch_embeddings in predict_batches(teacher, x, prepared.norm,
                                                                  ctx.device):  # fmt: skip
                logits(batch_logits.numpy())
                embeddings(batch_embeddings.numpy())
    outputs = teacher_outputs(folder)
    metrics = evaluate_embeddings(
        outputs["test"]["logits"],
        outputs["test"]["embeddings"],
        prepared.dataset.test_labels,
        outputs["train"]["embeddings"],
        labels[prepared.train],
    )
    metrics = {f"test_{k}": v for k, v in metrics.items()}
    if untrained:
        files["curves"] = "curves.png"
    dim = outputs["test"]["embeddings"].shape[1]
    return StageResult(metrics, files, EmbeddingFacts(section.model, dim))


def distill_stage(
    section: DistillSection,
    seed: int,
    data: Output[DataFacts],
    teacher: Output[EmbeddingFacts],
    ctx: StageContext,
) -> StageResult[EmbeddingFacts]:
    prepared = prepare_data(data)
    outputs = teacher_outputs(teacher.file("outputs"))
    keep = subset(len(prepared.train), section.train_limit, seed)  # the pipeline's seed
    seed = seed if section.seed is None else section.seed
    torch.manual_seed(seed)
    student = _build(section.student, data, section.student_checkpoint)
    images, labels = prepared.dataset.train_images, prepared.dataset.train_labels
    train = outputs["train"]
    cached = TeacherTargets(rows(train["logits"], keep), rows(train["embeddings"], keep))
    live_teacher = None
    if section.train.augment:  # augmented batches need the teacher itself, not its cache
        live_teacher = reload_teacher(teacher.facts.model, teacher.file("model"),
                                      *data.facts.model_shape)  # fmt: skip
        live_teacher.to(ctx.device)
        cached = None
    needs_teacher = section.train.beta > 0 or section.train.baselines
    history = _fit(
        student,
        prepared,
        section.train,
        seed,
        ctx,
        f"student {section.student}",
        keep,
        teacher=live_teacher if needs_teacher else None,
        cached=cached if needs_teacher else None,
    )
    atomic_save(student.model.state_dict(), ctx.workdir / "student.pt")
    bank = predict(student, images[prepared.train], prepared.norm, ctx.device)[1]
    probe = linear_probe(bank, labels[prepared.train])
    speed = [h["images_per_s"] for h in history] or [0.0]  # no epochs: no speed
    metrics = {"train_size": len(keep), "train_images_per_s": statistics.median(speed)}
    for part, x, y in (
        ("val", images[prepared.val], labels[prepared.val]),
        ("test", prepared.dataset.test_images, prepared.dataset.test_labels),
    ):
        logits, embeddings = predict(student, x, prepared.norm, ctx.device)
        scores = evaluate_embeddings(
            logits,
            embeddings,
            y,
            bank,
            labels[prepared.train],
            outputs[part]["embeddings"],
            section.pc_eval_limit,
            ctx.device,
            probe,
        )
        metrics |= {f"{part}_{k}": v for k, v in scores.items()}
    _check_learned(section, metrics, len(prepared.val), len(data.facts.classes))
    files = {"model": "student.pt", "curves": "curves.png"}
    return StageResult(metrics, files, EmbeddingFacts(section.student, bank.shape[1]))


def _check_learned(section: DistillSection, metrics: dict, n: int, classes: int) -> None:
    """Stop after distill when the student is no better than chance on the validation split
    (its classifier's top-1; kNN top-1 of its embeddings when it is trained without labels):
    quantizing, exporting and validating it would spend minutes on nothing."""
    key = "val_top1" if section.train.alpha > 0 else "val_knn_top1"
    if not better_than_chance(metrics[key], n, classes):
        train = section.train
        raise TrainingError(
            f"the distilled student {section.student} is no better than chance: {key} "
            f"{metrics[key]:.3f} on {n} validation images, chance {1 / classes:.3f}. It did not "
            f"learn in {train.epochs} epochs at lr {train.lr} on {metrics['train_size']} images: "
            "raise distill.train.epochs or distill.train.lr, or pick a smaller distill.student"
        )


def build_student(data: Output[DataFacts], distill: Output[EmbeddingFacts]) -> EmbeddingModel:
    """The distill stage's fp32 student, loaded."""
    student = _build(distill.facts.model, data)
    student.model.load_state_dict(torch.load(distill.file("model"), weights_only=True))
    return student


ROWS = {  # the before/after table, in order
    "fp32": "fp32 student",
    "ptq": "PTQ int8 (calibrated)",
    "plain_qat": "QAT int8, β = γ = 0",
    "qat": "QAT int8, coherence-keeping",
}


def qat_stage(
    section: QATSection,
    target: str,
    seed: int,
    data: Output[DataFacts],
    teacher: Output[EmbeddingFacts],
    distill: Output[EmbeddingFacts],
    ctx: StageContext,
) -> StageResult[QATFacts]:
    prepared = prepare_data(data)
    outputs = teacher_outputs(teacher.file("outputs"))
    norm = prepared.norm
    fp32 = build_student(data, distill).to(ctx.device)
    images, labels = prepared.dataset.train_images, prepared.dataset.train_labels
    keep = subset(len(prepared.train), section.train_limit, seed)

    def split(x: torch.Tensor, y: torch.Tensor, teacher_embeddings: torch.Tensor) -> finetune.Split:
        return finetune.Split(x, y, teacher_embeddings, predict(fp32, x, norm, ctx.device)[1])

    train_x, train_y = images[prepared.train][keep], labels[prepared.train][keep]
    fit = split(train_x, train_y, rows(outputs["train"]["embeddings"], keep))
    val = split(images[prepared.val], labels[prepared.val], outputs["val"]["embeddings"])
    test = split(prepared.dataset.test_images, prepared.dataset.test_labels,
                 outputs["test"]["embeddings"])  # fmt: skip
    calibration = load(images[prepared.calibration])

    def scores(model: torch.nn.Module, part: finetune.Split) -> dict[str, float]:
        return finetune.score(model, part, norm, ctx.device, section.pc_eval_limit)

    bits = recipes.weight_bits(target, section.weight_bits)
    in_float, speed = float_layers(section, target, fp32, norm.apply(calibration[:32]), bits, ctx)
    torch.manual_seed(seed)
    ptq = finetune.ptq(fp32, target, calibration, norm, bits, in_float)
    atomic_save(ptq.state_dict(), ctx.workdir / "ptq_student.pt")
    models: dict[str, torch.nn.Module] = {"fp32": fp32, "ptq": quantized(ptq).to(ctx.device)}
    curves: dict[str, list[dict[str, float]]] = {}
    plain = section.train.model_copy(update={"beta": 0, "gamma": 0})
    variants = ({"plain_qat": plain} if section.plain_qat else {}) | {"qat": section.train}
    for name, train_section in variants.items():
        torch.manual_seed(seed)
        model, history = finetune.qat(
            fp32,
            target,
            fit,
            rows(outputs["train"]["logits"], keep),
            calibration,
            norm,
            TrainConfig(**train_section.model_dump(), seed=seed),
            section.freeze_observers_epochs,
            ctx.device,
            checkpoint=ctx.workdir / f"{name}_training.pt",
            evaluate=lambda m: {f"val_{k}": v for k, v in scores(m, val).items()},
            on_epoch=lambda epoch, m, name=name: ctx.log(
                {f"{name}_{k}": v for k, v in m.items()}, epoch
            ),
            progress=ctx.progress,
            weight_bits=bits,
            keep_float=in_float,
        )
        atomic_save(model.state_dict(), ctx.workdir / f"{name}_student.pt")
        curves[name] = history
        models[name] = quantized(model).to(ctx.device)
    table = {name: scores(model, test) for name, model in models.items()}
    start = {"fp32": scores(fp32, val), "ptq": scores(models["ptq"], val)}
    plot_qat(curves, start, ctx.workdir / "triplet_agreement.png", f"{target} int8")
    plan = ptq.plan  # QAT quantizes the same places
    write_text(ctx.workdir / "precision_plan.json", json.dumps(plan.to_json(), indent=2))
    write_text(ctx.workdir / "before_after.md",
               before_after(table, target) + f"\nPrecision plan: {plan.summary()}\n")  # fmt: skip
    metrics = {f"{name}_test_{k}": v for name, row in table.items() for k, v in row.items()}
    metrics |= {"layers": len(plan.layers), "float_layers": len(plan.float_layers)}
    if speed is not None:
        metrics |= {"speed_plan_fp32_ms": speed.fp32_ms, "speed_plan_int8_ms": speed.int8_ms}
    for name, history in curves.items():  # the last epoch on the validation split (fake quant)
        metrics |= {f"{name}_{k}": v for k, v in history[-1].items() if k.startswith("val_")}
    files = {name: f"{name}_student.pt" for name in ("ptq", *variants)}
    files |= {"table": "before_after.md", "plot": "triplet_agreement.png",
              "plan": "precision_plan.json"}  # fmt: skip
    if speed is not None:
        files["speed_plan"] = SPEED_PLAN
    return StageResult(metrics, files, QATFacts(target, bits, table, in_float))


SPEED_PLAN = "speed_plan.json"


def float_layers(
    section: QATSection,
    target: str,
    fp32: EmbeddingModel,
    calibration: torch.Tensor,
    bits: int,
    ctx: StageContext,
) -> tuple[dict[str, str], SpeedPlan | None]:
    """The layers kept float beyond those without an int8 kernel ({pattern: why}): those
    ``qat.float_layers`` names, and on a target whose host is the device (cpu) those that run
    faster in float here (:mod:`edgepc.export.speed_plan`; measured once, then read back from
    the stage's folder, so a resumed stage trains the same graph)."""
    keep = dict.fromkeys(section.float_layers, "kept float by qat.float_layers")
    spec = get_target(target)
    if not (section.speed_plan and spec.host_is_device):
        return keep, None
    saved = ctx.workdir / SPEED_PLAN
    if saved.exists():
        speed = SpeedPlan.from_json(json.loads(saved.read_text()))
    else:
        speed = speed_plan.choose(fp32.cpu().eval(), spec, calibration, bits, keep)
        write_text(saved, json.dumps(speed.to_json(), indent=2))
    fp32.to(ctx.device)
    return keep | speed.keep_float, speed


def before_after(table: dict[str, dict[str, float]], target: str) -> str:
    """The markdown table of the qat stage: each model's test metrics and its change vs fp32."""
    base = table["fp32"]
    lines = [
        f"# {target}: int8 vs the fp32 student (test split)",
        "",
        "int8 rows run the converted int8 graph (quantize/dequantize around each op), as the "
        "runtimes will.",
        "",
        "| model | top-1 | Δ top-1 (points) | triplet agreement vs teacher | Δ | "
        "spearman vs teacher | triplet agreement vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in ROWS.items():
        if name not in table:
            continue
        row = table[name]
        d_top1 = 100 * (row["top1"] - base["top1"])
        d_triplet = row["pc_triplet_agreement"] - base["pc_triplet_agreement"]
        lines.append(
            f"| {label} | {row['top1']:.4f} | {d_top1:+.2f} | "
            f"{row['pc_triplet_agreement']:.4f} | {d_triplet:+.4f} | "
            f"{row['pc_spearman']:.4f} | {row['pc_triplet_agreement_fp32']:.4f} |"
        )
    return "\n".join(lines) + "\n"
