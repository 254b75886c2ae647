"""The deployment stages: export (bundles + parity with PyTorch), validate (every bundle in its
real runtime: accuracy, coherence, latency, size; the accuracy gate), register (MLflow model
registry, one alias per target and precision)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edgepc.data.images import load
from edgepc.errors import EdgepcError
from edgepc.export.bundle import (
    TESTSET,
    BundleError,
    Engine,
    Normalise,
    file_entry,
    read_manifest,
    trtexec_command,
    write_bundle,
    write_manifest,
    write_testset,
)
from edgepc.export.parity import parity, parity_table, violations
from edgepc.export.runtimes import open_runtime
from edgepc.export.writers import ExportError
from edgepc.files import write_text
from edgepc.measure import interleaved_latency_by_threads
from edgepc.pipelines.config import (
    ExportSection,
    LatencySection,
    RegisterSection,
    ValidateSection,
)
from edgepc.pipelines.plots import plot_validation
from edgepc.pipelines.stages import (
    DataFacts,
    EmbeddingFacts,
    ExportFacts,
    Output,
    QATFacts,
    RegisterFacts,
    StageContext,
    StageResult,
    ValidateFacts,
    build_student,
    prepare_data,
    teacher_outputs,
)
from edgepc.quant import PrecisionPlan, convert, restore
from edgepc.targets import get_target
from edgepc_device.bundle import load_testset, normalise
from edgepc_device.validate import accuracy

SOURCES = {"fp32": "fp32", "int8": "qat", "int8-ptq": "ptq"}  # artifact -> PyTorch model


class ValidationGateError(EdgepcError):
    """An artifact loses more accuracy in its runtime than the pipeline allows."""


def _bundle_names(target: str, ptq: bool) -> list[str]:
    return [f"{target}-{a}" for a in SOURCES if a != "int8-ptq" or ptq]


def _engine(target: str, folder: Path, input_shape: list[int], int8: bool) -> Engine | None:
    """A TensorRT target's engine build: here when tensorrt and a GPU exist, else on the
    device."""
    if not get_target(target).tensorrt_engine:
        return None
    commands = {
        "trtexec": trtexec_command(folder.name, input_shape, int8),
        "python": f"python3 -m edgepc_device build-engine {folder.name}",
    }
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        return Engine(status="deferred to device", **commands)
    command = [sys.executable, "-m", "edgepc_device", "build-engine", str(folder)]
    built = subprocess.run(command, capture_output=True, text=True)
    if built.returncode != 0:
        raise ExportError(f"TensorRT build failed for {folder.name}: {built.stderr.strip()}")
    return Engine(status="built", path="model.engine", **commands)


def export_stage(
    section: ExportSection,
    target: str,
    data: Output[DataFacts],
    teacher: Output[EmbeddingFacts],
    distill: Output[EmbeddingFacts],
    qat: Output[QATFacts],
    ctx: StageContext,
) -> StageResult[ExportFacts]:
    prepared = prepare_data(data)
    test_images = load(prepared.dataset.test_images).numpy()  # the bundle ships them all
    teacher_test = teacher_outputs(teacher.file("outputs"))["test"]
    testset = write_testset(
        ctx.workdir / TESTSET,
        test_images,
        prepared.dataset.test_labels.numpy(),
        teacher_test["embeddings"][: section.pc_eval_limit].numpy(),
    )
    norm = Normalise(mean=data.facts.mean, std=data.facts.std)
    x = normalise(test_images[: section.parity_size], norm.mean, norm.std)
    example = torch.from_numpy(x[:2])
    fp32 = build_student(data, distill).eval()
    rows, failures, bundles = {}, {}, []
    for name in tqdm(_bundle_names(target, section.ptq), desc="export", disable=not ctx.progress):
        source = SOURCES[name.removeprefix(f"{target}-")]
        model: torch.nn.Module = fp32
        plan = None
        if source != "fp32":
            state = torch.load(qat.file(source), weights_only=True)
            quant = restore(fp32, target, example, state, source == "qat",
                            qat.facts.weight_bits, qat.facts.keep_float)  # fmt: skip
            model, plan = convert(quant), quant.plan.to_json()
        folder = ctx.workdir / name
        manifest = write_bundle(folder, model, example, target, source, testset, norm,
                                data.facts.classes, ctx.run_id, plan)  # fmt: skip
        with torch.no_grad():
            reference = tuple(t.numpy() for t in model(torch.from_numpy(x)))
        rows[name] = parity(reference, open_runtime(folder / manifest.model).predict(x))
        bounds = section.int8_parity if manifest.precision == "int8" else section.fp32_parity
        if broken := violations(rows[name], bounds):
            failures[name] = broken
        engine = _engine(target, folder, list(x.shape), manifest.precision == "int8")
        if engine is not None:
            files = manifest.files + ([file_entry(folder / engine.path)] if engine.path else [])
            write_manifest(manifest.model_copy(update={"engine": engine, "files": files}), folder)
        bundles.append(name)
    table = parity_table(rows, failures)
    write_text(
        ctx.workdir / "parity.md",
        f"# {target}: exported files vs their PyTorch models ({len(x)} test images)\n\n{table}",
    )
    if failures:
        raise ExportError(
            f"parity with PyTorch failed for {', '.join(failures)} (bounds: export.fp32_parity, "
            f"export.int8_parity; table in {ctx.workdir / 'parity.md'}):\n{table}"
        )
    metrics = {f"{_key(n, target)}_parity_{k}": v for n, r in rows.items() for k, v in r.items()}
    files = {name: name for name in bundles} | {"parity": "parity.md"}
    return StageResult(metrics, files, ExportFacts(target, bundles, rows))


def _key(bundle: str, target: str) -> str:
    """Metric prefix of a bundle: fp32, int8, int8_ptq (the same for every target)."""
    return bundle.removeprefix(f"{target}-").replace("-", "_")


def validate_bundle(folder: Path, threads: int = 1, progress: bool = False) -> dict[str, float]:
    """One bundle in its runtime: top-1 on its whole test set, pc_* of its embeddings vs the
    teacher's, size on disk."""
    manifest = read_manifest(folder)
    runtime = open_runtime(folder / manifest.model, threads)
    wrap = partial(tqdm, desc=manifest.name, disable=not progress, leave=False)
    scores = accuracy(load_testset(folder, manifest.model_dump()), runtime, wrap)
    row = {f"test_{k}": v for k, v in scores.items() if k not in ("images", "pc_images")}
    row["size_mb"] = manifest.entry(manifest.model).bytes / 2**20
    return row


def time_bundles(folders: list[Path], section: LatencySection) -> dict[str, dict[str, float]]:
    """Batch-1 latency of every bundle at every thread count (``p50_ms_1t``, ``p99_ms_1t``,
    ``throughput_1t`` ...), keyed by bundle name: the bundles interleaved, one thread count
    after the other."""
    runs = {}
    for folder in folders:
        manifest = read_manifest(folder)
        with np.load(folder / manifest.testset) as test:
            image = test["images"][:1]
        x = normalise(image, manifest.normalisation.mean, manifest.normalisation.std)
        for count in section.threads:
            runtime = open_runtime(folder / manifest.model, count)
            runs[manifest.name, count] = partial(runtime.run, x)
    timed = interleaved_latency_by_threads(runs, section.warmup, section.iterations, section.block)
    rows: dict[str, dict[str, float]] = {}
    for (name, count), result in timed.items():
        row = rows.setdefault(name, {})
        row |= {f"{k}_{count}t": v for k, v in result.as_dict().items()
                if k.endswith("ms") or k == "iterations"}  # fmt: skip
        row[f"throughput_{count}t"] = result.throughput
    return rows


def speed_ratios(rows: dict[str, dict[str, float]], target: str, threads: list[int]) -> None:
    """Add ``speed_vs_fp32_Nt`` (fp32 p50 / p50: above 1 is faster) to each row, in place."""
    fp32 = rows.get(f"{target}-fp32")
    if fp32 is None:
        return
    for row in rows.values():
        for count in threads:
            row[f"speed_vs_fp32_{count}t"] = fp32[f"p50_ms_{count}t"] / row[f"p50_ms_{count}t"]


def validate_stage(
    section: ValidateSection,
    distill: Output[EmbeddingFacts],
    export: Output[ExportFacts],
    ctx: StageContext,
) -> StageResult[ValidateFacts]:
    fp32_top1 = distill.metrics["test_top1"]
    target, threads = export.facts.target, section.latency.threads
    rows = {}
    for name in tqdm(export.facts.bundles, desc="validate", disable=not ctx.progress):
        rows[name] = validate_bundle(export.file(name), max(threads), ctx.progress)
        rows[name]["drop_points"] = 100 * (fp32_top1 - rows[name]["test_top1"])
    folders = [export.file(name) for name in rows]
    for name, timing in time_bundles(folders, section.latency).items():
        rows[name] |= timing
    speed_ratios(rows, target, threads)
    spec = get_target(target)
    table = validation_table(rows, fp32_top1, threads, section.max_drop, spec.host_is_device)
    table += f"\nLatency: {spec.latency}; on the device: `{spec.device_command} BUNDLE`.\n"
    table += precision_plans([export.file(name) for name in rows])
    write_text(
        ctx.workdir / "validation.md",
        f"# {target}: every artifact in its runtime (full test split)\n\n{table}",
    )
    write_text(ctx.workdir / "validation.json", json.dumps(rows, indent=2))
    plot_validation(rows, threads, ctx.workdir / "validation.png", f"{target}: batch 1")
    failing = {n: r for n, r in rows.items() if r["drop_points"] > section.max_drop}
    if failing:
        worst = max(failing, key=lambda n: failing[n]["drop_points"])
        raise ValidationGateError(
            f"{worst} loses {failing[worst]['drop_points']:.2f} top-1 points in its runtime vs "
            f"the fp32 student ({fp32_top1:.4f}), more than validation.max_drop = "
            f"{section.max_drop} ({len(failing)} failing; table: {ctx.workdir / 'validation.md'})"
        )
    metrics = {f"{_key(n, target)}_{k}": v for n, row in rows.items() for k, v in row.items()}
    files = {"table": "validation.md", "report": "validation.json", "plot": "validation.png"}
    return StageResult(metrics, files, ValidateFacts(rows, table))


def precision_plans(folders: list[Path]) -> str:
    """One line per int8 bundle: how many of its layers run in int8, which stay float and why."""
    lines = [
        f"- {manifest.name}: {PrecisionPlan.from_json(manifest.precision_plan).summary()}"
        for manifest in map(read_manifest, folders)
        if manifest.precision_plan is not None
    ]
    return "\nPrecision plans:\n\n" + "\n".join(lines) + "\n" if lines else ""


def validation_table(
    rows: dict[str, dict[str, float]],
    fp32_top1: float,
    threads: list[int],
    max_drop: float,
    host_is_device: bool = True,
) -> str:
    """Markdown: per artifact top-1, its drop vs the fp32 student, coherence, latency and its
    speed against the fp32 artifact (same run, interleaved), size; then, plainly, every int8
    artifact that is slower than fp32, where this host runs the file as the device does."""
    timing = " | ".join(f"p50 / p99 ms ({t} thr) | speed vs fp32 ({t} thr)" for t in threads)
    lines = [
        f"fp32 PyTorch student: top-1 {fp32_top1:.4f}; gate: drop ≤ {max_drop} points",
        "",
        f"| artifact | top-1 | drop (points) | triplet agreement vs teacher | {timing} | MB |",
        "|---|---|---|---|" + "---|---|" * len(threads) + "---|",
    ]
    slower = []
    for name, row in rows.items():
        cells = []
        for t in threads:
            speed = row.get(f"speed_vs_fp32_{t}t")
            cells += [f"{row[f'p50_ms_{t}t']:.3f} / {row[f'p99_ms_{t}t']:.3f}",
                      "—" if speed is None else f"{speed:.2f}×"]  # fmt: skip
            if speed is not None and speed < 1.0 and "int8" in name:
                slower.append(f"{name} at {t} thread{'s' * (t > 1)} ({speed:.2f}×)")
        lines.append(
            f"| {name} | {row['test_top1']:.4f} | {row['drop_points']:+.2f} | "
            f"{row['test_pc_triplet_agreement']:.4f} | {' | '.join(cells)} | "
            f"{row['size_mb']:.3f} |"
        )
    if not host_is_device:
        lines += ["", "Speeds here are this host's, not the device's: they give no verdict on "
                  "int8 there."]  # fmt: skip
    elif slower:
        lines += ["", f"**int8 is slower than fp32 here**: {', '.join(slower)}."]
    elif any("int8" in name for name in rows) and any("fp32" in name for name in rows):
        lines += ["", "Every int8 artifact is faster than its fp32 sibling at every thread count."]
    return "\n".join(lines) + "\n"


def register_stage(
    section: RegisterSection,
    name: str,
    export: Output[ExportFacts],
    validate: Output[ValidateFacts],
    ctx: StageContext,
) -> StageResult[RegisterFacts]:
    """Every validated bundle as a version of the pipeline's registered model, alias = name."""
    rows = validate.facts.rows
    if ctx.registry is None:
        raise EdgepcError("the register stage needs an MLflow tracker (run it through the runner)")
    model = section.model or f"edgepc-{name}"
    versions = {}
    for bundle in export.facts.bundles:
        folder = export.file(bundle)
        manifest = read_manifest(folder)
        if bundle not in rows:
            raise BundleError(f"{bundle} has no validation row: run the validate stage again")
        entry = manifest.entry(manifest.model)
        tags = {"edgepc.target": manifest.target, "edgepc.precision": manifest.precision,
                "edgepc.source": manifest.source, "edgepc.sha256": entry.sha256}  # fmt: skip
        tags |= {f"edgepc.{k}": f"{v:.6g}" for k, v in rows[bundle].items()}
        description = (
            f"{manifest.target} {manifest.precision} ({manifest.source}) for {manifest.runtime}: "
            f"top-1 {rows[bundle]['test_top1']:.4f}, {entry.bytes / 2**20:.2f} MB"
        )
        versions[bundle] = ctx.registry.register(
            model, bundle, folder, entry.sha256, tags, description
        )
    target = export.facts.target
    metrics = {f"{_key(n, target)}_version": float(v) for n, v in versions.items()
               if v.isdigit()}  # not while the store is down  # fmt: skip
    return StageResult(metrics, {}, RegisterFacts(model, versions))
