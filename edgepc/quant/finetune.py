"""Quantization with the student's perception kept: PTQ, and QAT fine-tuning on
α·CE + β·L_PC(int8, teacher) + γ·L_PC(int8, fp32 student) with the shared trainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from edgepc.coherence import coherence_metrics
from edgepc.data.images import Images
from edgepc.distill.evaluate import predict, top1
from edgepc.distill.images import Normalisation
from edgepc.distill.trainer import TeacherTargets, TrainConfig, train
from edgepc.models import EmbeddingModel
from edgepc.quant.model import QuantModel, prepare


@dataclasses.dataclass(frozen=True)
class Split:
    """uint8 images (in memory or files) with their labels and the teacher's / fp32 student's
    embeddings."""

    images: Images
    labels: Tensor
    teacher: Tensor
    fp32: Tensor


def score(
    model: torch.nn.Module,
    split: Split,
    norm: Normalisation,
    device: torch.device,
    pc_limit: int | None = None,
) -> dict[str, float]:
    """top1, pc_* vs the teacher, and pc_*_fp32 vs the fp32 student (first ``pc_limit``)."""
    logits, embeddings = predict(model, split.images, norm, device)
    n = len(embeddings) if pc_limit is None else min(pc_limit, len(embeddings))
    result = {"top1": top1(logits, split.labels)}
    result |= coherence_metrics(embeddings[:n], split.teacher[:n]).as_dict()
    fp32 = coherence_metrics(embeddings[:n], split.fp32[:n]).as_dict()
    return result | {f"{k}_fp32": v for k, v in fp32.items()}


def _batches(images: Tensor, norm: Normalisation, size: int = 256):
    for start in range(0, len(images), size):
        yield norm.apply(images[start : start + size])


def ptq(
    fp32: EmbeddingModel,
    target: str,
    calibration: Tensor,
    norm: Normalisation,
    weight_bits: int | None = None,
    keep_float: Mapping[str, str] | None = None,
) -> QuantModel:
    """Post-training quantization: batch norm folded, observers calibrated on ``calibration``
    (the prepared model only observes: :func:`edgepc.quant.quantized` gives its int8 graph)."""
    example = norm.apply(calibration[:8])
    model = prepare(fp32, target, example, False, weight_bits, keep_float)
    model.calibrate(_batches(calibration, norm))
    return model


def qat(
    fp32: EmbeddingModel,
    target: str,
    fit: Split,
    teacher_logits: Tensor,
    calibration: Tensor,
    norm: Normalisation,
    config: TrainConfig,
    freeze_observers_epochs: int,
    device: torch.device,
    checkpoint: Path | None = None,
    evaluate: Callable[[QuantModel], dict[str, float]] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    weight_bits: int | None = None,
    keep_float: Mapping[str, str] | None = None,
) -> tuple[QuantModel, list[dict[str, float]]]:
    """Fake-quant ``fp32`` for ``target`` with ``weight_bits``-bit weights, start its scales on
    ``calibration``, fine-tune on ``fit``; observers freeze for the last
    ``freeze_observers_epochs`` epochs."""
    model = prepare(fp32, target, norm.apply(calibration[:8]), True, weight_bits, keep_float)
    model.calibrate(_batches(calibration, norm))

    def before_epoch(epoch: int) -> None:
        if epoch >= config.epochs - freeze_observers_epochs:
            model.freeze_observers()

    history = train(
        model,
        fit.images,
        fit.labels,
        norm,
        config,
        device,
        cached=TeacherTargets(teacher_logits, fit.teacher),
        reference=fit.fp32,
        checkpoint=checkpoint,
        on_epoch=on_epoch,
        progress=progress,
        before_epoch=before_epoch,
        evaluate=(lambda: evaluate(model)) if evaluate is not None else None,
    )
    model.freeze_observers()
    return model, history
