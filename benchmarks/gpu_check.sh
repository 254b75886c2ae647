#!/usr/bin/env bash
# The GPU checks, as one short run on a lent GPU machine (no internet there, PyTorch installed):
# the CUDA tests, the loss cost on CUDA, the quick cpu pipeline with its training stages on CUDA
# (bf16 autocast) and the smoke comparison study on CUDA. Logs and results go to $OUT.
#
# Prepare here (ignored folder .gpu/: wheels of what the machine's image lacks, for its
# Python 3.12, and the dataset), then run `bash benchmarks/gpu_check.sh` there with .gpu carried:
#   pip download mlflow==3.17.2 pydantic torchao==0.18.0 --python-version 3.12 \
#     --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/whl
#   then delete from .gpu/whl mlflow-3.17.2 (mlflow-skinny is enough: no UI) and every wheel the
#   image already holds (`pip list` on the GPU machine shows them): about 25 MB stay.
#   mkdir -p .gpu/data && cp -r /usr/share/datasets/fashion-mnist .gpu/data/
set -u
G=/tmp/gpu-check; mkdir -p "$G"
export PYTHONPATH=$PWD EDGEPC_DATA=$PWD/.gpu/data MPLBACKEND=Agg
export MLFLOW_TRACKING_URI=sqlite:///$G/mlflow.db EDGEPC_CACHE=$G/cache
step() {  # step NAME SECONDS COMMAND...: one line of rc and time per step
  local name=$1 limit=$2 t0; shift 2; t0=$(date +%s)
  timeout "$limit" "$@" > "$G/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$G/steps.txt"
}
finish() {
  tar czf "$OUT/gpu-check.tgz" -C "$G" --exclude=cache --exclude=mlflow.db --exclude=artifacts .
  cp "$G/steps.txt" "$OUT/"
}
trap finish EXIT
step pip 60 python3 -m pip install --no-deps --no-index -q .gpu/whl/*.whl
step env 30 python3 -c "import torch, mlflow; print(torch.__version__, torch.cuda.get_device_name())"
step test_cuda 80 python3 -m pytest -q -p no:cacheprovider -o addopts= -rA tests/test_cuda.py
step loss_cost 150 python3 benchmarks/loss_cost.py --device cuda --out "$G/loss_cost"
step pipeline 150 python3 -m edgepc.pipelines.run cpu --profile quick --no-progress
step study 160 python3 benchmarks/compare_losses.py --profile smoke --out "$G/study/RESULTS.md" \
  --cache "$G/cache" --tracking-uri "$MLFLOW_TRACKING_URI"
