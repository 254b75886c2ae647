"""Training a teacher (labels only), distilling a student (α·CE + β·L_PC + Σ w·baseline) or
fine-tuning a quantized one (+ γ·L_PC against its own fp32 embeddings).

The teacher runs in eval mode without gradient; its logits and embeddings are computed once and
reused every epoch when the data is not augmented. Each epoch ends in a checkpoint written
atomically; a rerun with the same checkpoint path resumes after the last finished epoch.

Under ``torchrun`` (a process group of N ranks) ``batch_size`` is per rank: each step takes a
global batch of N·batch_size images in the same order as one process would, each rank runs
its contiguous part through the DistributedDataParallel student with global batch norm, and
every loss term sees the whole global batch (outputs gathered with gradient), so N ranks train
like one process with batch N·batch_size. Scale the learning rate with the global batch.
Rank 0 alone writes the checkpoint; on resume its state is broadcast to the others.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from edgepc.coherence import PerceptionCoherenceLoss
from edgepc.data.images import Images, batches, chunks, load
from edgepc.distill.distributed import (
    broadcast,
    gather,
    gather_with_grad,
    rank,
    shard,
    sync_batchnorm,
    world_size,
)
from edgepc.distill.evaluate import predict
from edgepc.distill.images import Normalisation, augment
from edgepc.distill.losses import build_loss, loss_class
from edgepc.errors import TrainingError
from edgepc.files import atomic_path
from edgepc.hardware import cpu_has_bf16
from edgepc.models import EmbeddingModel


@dataclass(frozen=True)
class TrainConfig:
    """How to train; α = 1, β = 0 and no baselines trains on labels alone (a teacher)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["cosine", "constant"] = "cosine"
    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0  # weight of L_PC(student, fp32 reference), quantization fine-tuning
    pc: dict[str, object] = field(default_factory=dict)
    baselines: dict[str, dict[str, object]] = field(default_factory=dict)
    augment: bool = False
    recalibrate_bn: bool = False  # batch-norm statistics recomputed with the final weights
    channels_last: bool | Literal["auto"] = False  # auto: see formats
    bf16: bool | Literal["auto"] = False  # autocast; auto: see formats (CUDA: always bf16)
    seed: int = 0


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's logits and embeddings for each training image (same order)."""

    logits: Tensor
    embeddings: Tensor


def teacher_targets(
    teacher: EmbeddingModel, images: Images, norm: Normalisation, device: torch.device
) -> TeacherTargets:
    """Run the teacher once over ``images`` (no gradient, eval mode)."""
    logits, embeddings = predict(teacher, images, norm, device)
    return TeacherTargets(logits, embeddings)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save through a temporary file, fsync and rename: never a half-written file."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)  # a file object: a full disk shows as OSError (see edgepc.files)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`train` (tensors and plain data only: weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise TrainingError(
            f"checkpoint {path} is unreadable ({type(error).__name__}): delete it to start over"
        ) from None


class _Objective(nn.Module):
    """The weighted sum of the configured losses (holds the trainable ones, e.g. FitNet's)."""

    def __init__(
        self, config: TrainConfig, student_dim: int, teacher_dim: int | None, n_data: int
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = config.alpha, config.beta, config.gamma
        if not (self.alpha or self.beta or self.gamma or config.baselines):
            raise TrainingError("nothing to train: alpha and beta are 0 and no baseline is set")
        if (self.beta or config.baselines) and teacher_dim is None:
            raise TrainingError("a distillation loss is configured but no teacher is given")
        dims = {"student_dim": student_dim, "teacher_dim": teacher_dim}
        self.pc = PerceptionCoherenceLoss(**config.pc, **dims) if config.beta else None
        # Against the fp32 student: its own module, so that a queue holds teacher embeddings only
        self.pc_fp32 = None
        if config.gamma:
            self.pc_fp32 = PerceptionCoherenceLoss(**config.pc, student_dim=student_dim,
                                                   teacher_dim=student_dim)  # fmt: skip
        self.weights: dict[str, float] = {}
        self.baselines = nn.ModuleDict()
        self.indexed: set[str] = set()
        for name, options in config.baselines.items():
            options = dict(options)
            self.weights[name] = float(options.pop("weight", 1.0))
            sizes = {"student_dim": student_dim, "teacher_dim": teacher_dim, "n_data": n_data}
            loss = build_loss(name, **self._filled(name, options, sizes))
            self.baselines[name] = loss
            if "index" in inspect.signature(loss.forward).parameters:
                self.indexed.add(name)  # e.g. CRD's memory bank: the batch's positions

    @staticmethod
    def _filled(name: str, options: dict, sizes: dict) -> dict:
        """``options`` with the sizes the loss's constructor asks for (its heads' dimensions, the
        number of training images for a memory bank)."""
        accepted = inspect.signature(loss_class(name)).parameters
        return {k: v for k, v in sizes.items() if k in accepted} | options

    def forward(
        self,
        logits: Tensor,
        embeddings: Tensor,
        labels: Tensor,
        teacher: TeacherTargets | None,
        reference: Tensor | None = None,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The weighted terms; ``index``: the batch's positions in the training set (for losses
        whose ``forward`` takes it, e.g. CRD's memory bank)."""
        parts: dict[str, Tensor] = {}
        if self.alpha:
            parts["ce"] = self.alpha * F.cross_entropy(logits.float(), labels)
        if self.beta:
            parts["pc"] = self.beta * self.pc(embeddings, teacher.embeddings)
        if self.gamma:
            parts["pc_fp32"] = self.gamma * self.pc_fp32(embeddings, reference)
        for name, loss in self.baselines.items():
            if loss.inputs == "logits":
                value = loss(logits.float(), teacher.logits)
            elif name in self.indexed:
                value = loss(embeddings.float(), teacher.embeddings, index)
            else:
                value = loss(embeddings.float(), teacher.embeddings)
            parts[name] = self.weights[name] * value
        return parts


Formats = tuple[bool, bool]  # (channels_last, bf16 autocast)
TRIAL_STEPS = 40  # a shorter training keeps fp32 in the default layout: a trial would not pay
FASTER = 1.1  # a format is chosen over fp32 when its trial is this much faster


def formats(
    model: nn.Module, x: Tensor, config: TrainConfig, device: torch.device, steps: int
) -> Formats:
    """The memory format and autocast of a training of ``steps`` steps on batches like ``x``:
    on CUDA bf16 in the default layout; on the CPU as configured, where ``auto`` times one
    forward and backward pass of a copy of ``model`` per candidate (fp32, channels_last,
    channels_last with bf16 where the CPU has it natively) and takes the fastest when it is 10 %
    faster than fp32. Which one wins depends on the network: depthwise convolutions gain from
    channels_last and lose in bf16, dense ones gain from bf16 (``benchmarks/train_speed.py``).
    A measured choice depends on the moment's timings, so ``auto`` is opt-in."""
    if device.type != "cpu":
        return config.channels_last is True, device.type == "cuda" or config.bf16 is True
    native = cpu_has_bf16()
    candidates = [
        (layout, bf16)
        for layout, bf16 in ((False, False), (True, False), (True, True))
        if config.channels_last in ("auto", layout) and config.bf16 in ("auto", bf16)
        and (native or not bf16 or config.bf16 is True)
    ]  # fmt: skip
    if len(candidates) == 1 or steps < TRIAL_STEPS:
        return candidates[0]
    seconds = _trial(model, x, candidates)
    best = min(candidates, key=seconds.get)
    return best if seconds[candidates[0]] >= FASTER * seconds[best] else candidates[0]


def _trial(model: nn.Module, x: Tensor, candidates: list[Formats], rounds: int = 3) -> dict:
    """Seconds of a forward and backward pass of a copy of ``model`` on ``x`` per format (the
    best of ``rounds`` interleaved passes after one warm-up); ``model`` is left as it was."""
    copies = {}
    for layout, bf16 in candidates:
        fmt = torch.channels_last if layout else torch.contiguous_format
        copies[layout, bf16] = (copy.deepcopy(model).to(memory_format=fmt).train(),
                                x.contiguous(memory_format=fmt))  # fmt: skip
    seconds: dict[Formats, float] = {}
    for turn in range(rounds + 1):
        for (layout, bf16), (trial, batch) in copies.items():
            start = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                logits, embedding = trial(batch)
            (logits.float().sum() + embedding.float().sum()).backward()
            if turn:
                elapsed = time.perf_counter() - start
                seconds[layout, bf16] = min(seconds.get((layout, bf16), elapsed), elapsed)
    return seconds


def train(
    model: EmbeddingModel,
    images: Images,
    labels: Tensor,
    norm: Normalisation,
    config: TrainConfig,
    device: torch.device,
    teacher: EmbeddingModel | None = None,
    cached: TeacherTargets | None = None,
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    reference: Tensor | None = None,
    before_epoch: Callable[[int], None] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` on uint8 ``images`` and ``labels``; returns the per-epoch history.

    A teacher comes either as ``cached`` outputs (no augmentation) or as a model run on each
    (augmented) batch; ``reference`` holds fp32 embeddings of each image for the γ term.
    ``before_epoch(epoch)`` runs before each epoch (0-based, also after a resume);
    ``evaluate()`` after each, its metrics joining the epoch's history (and checkpoint);
    ``on_epoch(epoch, metrics)`` is called after each finished epoch.
    """
    if config.augment and (cached is not None or reference is not None):
        raise TrainingError("cached teacher or reference outputs cannot be used with augmentation")
    if config.gamma and reference is None:
        raise TrainingError("gamma > 0 weighs L_PC against fp32 reference embeddings: give them")
    if teacher is not None and cached is None and not config.augment:
        cached = teacher_targets(teacher, images, norm, device)
    model.to(device).eval()
    first = load(images[:2])
    with torch.no_grad():
        probe = model(norm.apply(first.to(device)))[1]
    model.train()
    world = world_size()
    net: nn.Module = model
    if world > 1:
        sync_batchnorm(model, device)
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    teacher_dim = None
    if cached is not None:
        teacher_dim = cached.embeddings.shape[1]
    elif teacher is not None:
        teacher_dim = predict(teacher, first, norm, device)[1].shape[1]
    objective = _Objective(config, probe.shape[1], teacher_dim, len(images)).to(device)
    params = [*model.parameters(), *objective.parameters()]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True
        )
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # A last batch of fewer than 3 images is dropped: ranking needs 3, batch norm 2.
    batch_size = config.batch_size * world
    steps_per_epoch = len(images) // batch_size + (len(images) % batch_size >= max(3, world))
    total = max(1, config.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        (lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
        if config.schedule == "cosine"
        else (lambda step: 1.0),
    )
    history: list[dict[str, float]] = []
    start_epoch = 0
    state = None
    if checkpoint is not None and checkpoint.exists() and rank() == 0:
        state = load_checkpoint(checkpoint)
    state = broadcast(state)
    chosen = state.get("formats") if state is not None else None  # a resume keeps its formats
    if chosen is None:
        sample = norm.apply(load(images[: config.batch_size]).to(device))
        chosen = broadcast(formats(model, sample, config, device, total))
    channels_last, use_amp = chosen
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            history, start_epoch = state["history"], state["epoch"]
        except (KeyError, RuntimeError, ValueError) as error:
            raise TrainingError(
                f"checkpoint {checkpoint} does not fit this model and config "
                f"({type(error).__name__}): delete it to start over"
            ) from None
    for epoch in range(start_epoch, config.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(images), generator=gen)
        parts = [order[step * batch_size : (step + 1) * batch_size]
                 for step in range(steps_per_epoch)]  # fmt: skip
        sums: dict[str, float] = {}
        seen, started = 0, time.perf_counter()
        bar = tqdm(
            zip(parts, batches(images, parts), strict=True),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress or rank() > 0,
            leave=False,
        )
        for step, (idx, batch) in enumerate(bar):
            batch = batch.to(device, non_blocking=True)
            if config.augment:
                batch = augment(batch, gen)
            x = norm.apply(shard(batch)).contiguous(memory_format=layout)
            y = labels[idx].to(device, non_blocking=True)
            targets = None
            if cached is not None:
                targets = TeacherTargets(
                    cached.logits[idx].to(device), cached.embeddings[idx].to(device)
                )
            elif teacher is not None:
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                    t_logits, t_emb = teacher.eval()(x)
                targets = TeacherTargets(gather(t_logits.float()), gather(t_emb.float()))
            with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                logits, embeddings = net(x)
            logits, embeddings = gather_with_grad(logits), gather_with_grad(embeddings)
            ref = reference[idx].to(device) if reference is not None else None
            parts = objective(logits, embeddings, y, targets, ref, idx)
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"({', '.join(f'{k}={v.item():.4g}' for k, v in parts.items())}): "
                    "lower the learning rate or the loss weights"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(idx)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(idx)
            rate = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{sum(sums.values()) / seen:.4f}", img_s=f"{rate:.0f}")
        metrics = {f"loss_{k}": v / seen for k, v in sums.items()}
        metrics["loss"] = sum(sums.values()) / seen
        metrics["images_per_s"] = seen / (time.perf_counter() - started)
        metrics |= {"channels_last": float(channels_last), "bf16": float(use_amp)}
        if evaluate is not None:
            metrics |= evaluate()
        history.append(metrics)
        if checkpoint is not None and rank() == 0:
            atomic_save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": history,
                    "formats": (channels_last, use_amp),
                },
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)
    model.to(memory_format=torch.contiguous_format)  # as given: exporters trace its layout
    if config.recalibrate_bn:
        recalibrate_batch_norm(model, images, norm, device, config.batch_size)
    return history


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module, images: Images, norm: Normalisation, device: torch.device, batch_size: int
) -> None:
    """Recompute every batch norm's running statistics with the final weights: a cumulative
    average over ``images`` (unaugmented). After a short training the running averages lag
    weights that moved under them, and the eval-mode model can score at chance while the
    train-mode one has learned (MobileNetV2-0.5 after 48 steps: 0.09 vs 0.66 top-1)."""
    from torch.optim.swa_utils import update_bn

    parts = chunks(len(images), batch_size)
    update_bn((norm.apply(batch.to(device)) for batch in batches(images, parts)), model)
