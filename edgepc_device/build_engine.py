"""Build the TensorRT engine of an edgepc jetson bundle, on the Jetson (or any TensorRT GPU).

    python3 -m edgepc_device build-engine BUNDLE [--max-batch 64] [--workspace-mib 1024] [--force]

Reads BUNDLE/manifest.json, checks the ONNX file's sha256, parses the explicitly quantized ONNX
(Q/DQ pairs, so TensorRT takes its int8 scales from the graph) with the tensorrt Python API and
writes BUNDLE/model.engine: int8 where the graph says so, fp16 elsewhere, a dynamic batch
1..max-batch. It is the Python equivalent of the ``engine.trtexec`` line in the manifest.
Needs numpy and TensorRT's Python package (JetPack ships it); no torch or edgepc.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgepc_device.bundle import BundleError, read_bundle
from edgepc_device.validate import fail


def build(onnx_path: Path, engine_path: Path, manifest: dict, max_batch: int, mib: int) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, mib << 20)
    if manifest["precision"] == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    name, shape = manifest["input"]["name"], manifest["input"]["shape"]
    chw = tuple(int(d) for d in shape[1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (1, *chw), (1, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT's builder returned no engine (see its log above)")
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="an edgepc jetson bundle folder")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch (default 64)")
    parser.add_argument("--workspace-mib", type=int, default=1024, help="builder workspace")
    parser.add_argument("--force", action="store_true", help="rebuild an existing engine")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        return fail(f"--max-batch must be at least 1, got {args.max_batch}")
    try:
        manifest = read_bundle(args.bundle, "jetson")
    except BundleError as error:
        return fail(str(error))
    engine_path = args.bundle / "model.engine"
    command = (manifest.get("engine") or {}).get("trtexec", "")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return fail(
            "tensorrt is not importable here: run this on the Jetson (JetPack ships TensorRT) "
            f"or on a machine with TensorRT; the same build with trtexec: {command}"
        )
    if engine_path.exists() and not args.force:
        print(f"{engine_path} exists (use --force to rebuild)")
        return 0
    try:
        build(args.bundle / manifest["model"], engine_path, manifest, args.max_batch,
              args.workspace_mib)  # fmt: skip
    except RuntimeError as error:
        return fail(str(error), 1)
    print(f"wrote {engine_path}\nequivalent: {command}")
    return 0
