#!/usr/bin/env bash
# Everything that needs a GPU, in one run (for a lent GPU machine with torch and
# transformers installed; no blipserve install needed):
#   1. the CUDA path on a tiny checkpoint (every mode, every dtype, fp32 vs transformers);
#   2. full-size (blip2-opt-2.7b-shaped) parity, float32 and bfloat16, on the GPU;
#   3. blipserve vs transformers speed and memory, bfloat16, same weights.
# Results go to $OUT (default benchmarks/out).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/out}"
CKPT="${CKPT:-/tmp/blip2-opt-2.7b-random-bf16}"
mkdir -p "$OUT"
{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
python3 benchmarks/cuda_smoke.py 2>&1 | grep -v Warning | tee "$OUT/cuda_smoke.txt"
python3 benchmarks/full_size.py --out "$CKPT" --dtype bfloat16 --device cuda 2>&1 | tail -1
for dtype in float32 bfloat16; do
    python3 benchmarks/full_size_parity.py --checkpoint "$CKPT" --device cuda --dtype "$dtype" \
        --workdir /tmp/parity 2>&1 | grep -v -i warn | tee "$OUT/parity_cuda_$dtype.txt"
done
python3 benchmarks/bench_vs_transformers.py --checkpoint "$CKPT" --device cuda --dtype bfloat16 \
    --images 64 --batch-size 16 --repeats 5 --out "$OUT/bench_cuda_bf16.json" 2>&1 \
    | tee "$OUT/bench_cuda_bf16.txt"
