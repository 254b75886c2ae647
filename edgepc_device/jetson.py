"""Validate an edgepc ``jetson`` bundle with TensorRT on the device: verify the bundle, build
the engine from its QDQ ONNX when no current one exists (or take ``--engine`` built by trtexec),
run the whole test set, pc_* against the teacher embeddings it ships, time batch 1 with CUDA
events, record the power mode and clocks, and write a report.

    python3 -m edgepc_device jetson BUNDLE [--engine FILE] [--warmup 20] [--iterations 300]

Needs numpy, TensorRT's Python package and cuda-python (``pip install
cuda-python``). Without TensorRT it says so and exits 2: it never reports a number it did not
measure on a GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from edgepc_device.build_engine import build
from edgepc_device.bundle import BundleError, load_testset, read_bundle
from edgepc_device.metrics import evaluate
from edgepc_device.report import device_info, make_report, write_report
from edgepc_device.timing import summarise
from edgepc_device.validate import arguments, fail, report_path


def engine_is_current(meta: dict | None, onnx_sha256: str, tensorrt: str, gpu: str) -> bool:
    """A cached engine serves only the same ONNX, TensorRT version and GPU it was built for."""
    return bool(meta) and meta == {"onnx_sha256": onnx_sha256, "tensorrt": tensorrt, "gpu": gpu}


def power_state() -> dict:
    """nvpmodel's mode and jetson_clocks' state, where those tools exist (a Jetson)."""
    state = {}
    for key, command in (("nvpmodel", ["nvpmodel", "-q"]), ("jetson_clocks", ["jetson_clocks",
                         "--show"])):  # fmt: skip
        if shutil.which(command[0]):
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            state[key] = (done.stdout or done.stderr).strip()[:2000]
    return state


def check(result: tuple) -> object:
    """cuda-python calls return (error, value...): raise on an error."""
    from cuda import cudart

    error, *values = result
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


class Engine:
    """A TensorRT engine with device buffers for batch ``batch``: ``run(x) -> outputs``."""

    def __init__(self, path: Path, manifest: dict, batch: int) -> None:
        import tensorrt as trt
        from cuda import cudart

        self.cudart = cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = check(cudart.cudaStreamCreate())
        self.input = manifest["input"]["name"]
        self.outputs = [o["name"] for o in manifest["outputs"]]
        self.shape = (batch, *[int(d) for d in manifest["input"]["shape"][1:]])
        self.context.set_input_shape(self.input, self.shape)
        self.host, self.device = {}, {}
        for name in (self.input, *self.outputs):
            shape = tuple(self.context.get_tensor_shape(name))
            self.host[name] = np.empty(shape, np.float32)
            self.device[name] = check(cudart.cudaMalloc(self.host[name].nbytes))
            self.context.set_tensor_address(name, int(self.device[name]))

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        copy = self.cudart.cudaMemcpyKind
        source = self.host[self.input]
        np.copyto(source, x)
        check(self.cudart.cudaMemcpyAsync(self.device[self.input], source.ctypes.data,
              source.nbytes, copy.cudaMemcpyHostToDevice, self.stream))  # fmt: skip
        self.context.execute_async_v3(self.stream)
        for name in self.outputs:
            check(self.cudart.cudaMemcpyAsync(self.host[name].ctypes.data, self.device[name],
                  self.host[name].nbytes, copy.cudaMemcpyDeviceToHost, self.stream))  # fmt: skip
        check(self.cudart.cudaStreamSynchronize(self.stream))
        return [self.host[name].copy() for name in self.outputs]

    def time(self, x: np.ndarray, warmup: int, iterations: int) -> dict:
        """Per-inference milliseconds between CUDA events (enqueue to completion, no copies)."""
        cudart = self.cudart
        self.run(x)
        start, stop = check(cudart.cudaEventCreate()), check(cudart.cudaEventCreate())
        times = []
        for i in range(warmup + iterations):
            check(cudart.cudaEventRecord(start, self.stream))
            self.context.execute_async_v3(self.stream)
            check(cudart.cudaEventRecord(stop, self.stream))
            check(cudart.cudaEventSynchronize(stop))
            if i >= warmup:
                times.append(float(check(cudart.cudaEventElapsedTime(start, stop))))
        return summarise(times, warmup)


def main(argv: list[str] | None = None) -> int:
    parser = arguments("Validate an edgepc jetson bundle with TensorRT.", threads=False)
    parser.add_argument("--engine", type=Path, help="an engine built by trtexec for this bundle")
    parser.add_argument("--batch", type=int, default=64, help="batch of the accuracy pass (64)")
    args = parser.parse_args(argv)
    if args.iterations < 2 or args.warmup < 0 or args.batch < 1:
        return fail("need --iterations >= 2, --warmup >= 0 and --batch >= 1")
    if args.engine is not None and not args.engine.is_file():
        return fail(f"--engine {args.engine} does not exist")
    try:
        manifest = read_bundle(args.bundle, "jetson")
    except BundleError as error:
        return fail(str(error))
    command = (manifest.get("engine") or {}).get("trtexec", "")
    for module in ("tensorrt", "cuda"):
        try:
            __import__(module)
        except ImportError:
            return fail(
                f"{module} is not importable here: run this on the Jetson (JetPack ships "
                "TensorRT; pip install cuda-python); no numbers are reported without it. The "
                f"engine build with trtexec: {command or 'see the manifest of a jetson bundle'}"
            )
    import tensorrt as trt
    from cuda import cudart

    props = check(cudart.cudaGetDeviceProperties(0))
    gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    onnx_sha = next(f["sha256"] for f in manifest["files"] if f["path"] == manifest["model"])
    engine_path = args.engine or args.bundle / "model.engine"
    meta_path = engine_path.with_suffix(".engine.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if args.engine is None and not engine_is_current(meta, onnx_sha, trt.__version__, gpu):
        print(f"building {engine_path} (TensorRT {trt.__version__}, {gpu}) ...")
        build(args.bundle / manifest["model"], engine_path, manifest,
                           max(args.batch, 1), 1024)  # fmt: skip
        meta_path.write_text(json.dumps({"onnx_sha256": onnx_sha, "tensorrt": trt.__version__,
                                         "gpu": gpu}))  # fmt: skip
    x, labels, teacher = load_testset(args.bundle, manifest)
    engine = Engine(engine_path, manifest, args.batch)
    parts = []
    for i in range(0, len(x), args.batch):
        chunk = x[i : i + args.batch]
        padded = np.concatenate([chunk, np.zeros((args.batch - len(chunk), *chunk.shape[1:]),
                                                 np.float32)])  # fmt: skip
        parts.append([out[: len(chunk)] for out in engine.run(padded)])
    logits = np.concatenate([p[0] for p in parts])
    embeddings = np.concatenate([p[1] for p in parts])
    accuracy = evaluate(logits, embeddings, labels, teacher)
    timing = {"gpu": Engine(engine_path, manifest, 1).time(x[:1], args.warmup, args.iterations)}
    device = device_info(f"tensorrt {trt.__version__}", {"gpu": gpu, **power_state()})
    out = write_report(report_path(args.out, manifest, device),
                       make_report(args.bundle, manifest, device, accuracy, timing))  # fmt: skip
    p50 = timing["gpu"]["p50_ms"]
    print(f"{manifest['name']}: top-1 {accuracy['top1']:.4f}, p50 {p50:.3f} ms on {gpu} -> {out}")
    print(f"equivalent build: {command}")
    return 0
