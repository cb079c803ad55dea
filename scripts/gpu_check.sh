#!/usr/bin/env bash
# CUDA-provider checks, run from the repository root on a machine with a GPU where
# onnxruntime-gpu (and onnxmerge's dependencies) import: which providers really run, the GPU
# tests, the digits merge with --provider auto, bench_merge on cuda and cpu (same machine), and
# bench_statistics (moments accumulated on the GPU against on the host).
# Usage: scripts/gpu_check.sh [OUTPUT_FOLDER]   (default: a temporary folder)
set -u
out=${1:-$(mktemp -d)}
python=${PYTHON:-python3}
$python - <<'EOF'
import onnxruntime
print("onnxruntime", onnxruntime.__version__, "available:", onnxruntime.get_available_providers())
EOF
status=0
$python -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py || status=1
$python -m onnxmerge merge samples/digits/resnet_a.onnx samples/digits/resnet_b.onnx \
    --calib samples/digits/calib.npz -o "$out/merged.onnx" --report "$out/report.json" || status=1
$python -m onnxmerge eval "$out/merged.onnx" --data samples/digits/test.npz --tasks 0-4,5-9 --provider cuda || status=1
$python benchmarks/bench_merge.py --provider cuda || status=1
$python benchmarks/bench_merge.py --provider cpu || status=1
$python benchmarks/bench_statistics.py --provider cuda || status=1
exit $status
