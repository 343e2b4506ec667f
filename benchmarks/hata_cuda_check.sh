#!/usr/bin/env bash
# One-shot HATA check on a CUDA machine: the Triton kernel tests compiled (not interpreted), HATA inside
# generate() on the GPU, `lmexec hata bench --device cuda` with the issue's settings (eager, then CUDA graph
# replays), and a profile of where a step's time goes. Logs, JSON and the plot go to $OUT (default /tmp/hata-cuda).
# Run from the repository root with the machine's python3 (torch + triton); a transformers wheel in .whl/
# is installed first when present (the image's may be older than the pinned one).
set -u
OUT=${OUT:-/tmp/hata-cuda}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton, transformers, numba; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'numba', numba.__version__)"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/hata/test_kernels_triton.py tests/hata/test_cuda.py \
    2>&1 | tee "$OUT/tests.log"
timeout 180 python3 -m lmexec hata bench --device cuda --contexts 8192,32768,131072 --batch 1,8 --heads 32 \
    --kv-heads 8 --head-dim 128 --bits 128 --budget 2048 --dtype float32,bfloat16 --methods dense,hata,quest,loki \
    --json "$OUT/bench_cuda.json" --png "$OUT/bench_cuda.png" 2>&1 | tee "$OUT/bench.log"
timeout 180 python3 -m lmexec hata bench --device cuda --cuda-graph --contexts 8192,32768,131072 --batch 1,8 \
    --heads 32 --kv-heads 8 --head-dim 128 --bits 128 --budget 2048 --dtype float32,bfloat16 \
    --methods dense,hata,quest,loki --json "$OUT/bench_cuda_graph.json" --png "$OUT/bench_cuda_graph.png" \
    2>&1 | tee "$OUT/bench_graph.log"
timeout 90 python3 benchmarks/hata_cuda_profile.py --contexts 131072 --batch 1,8 --dtype float32,bfloat16 \
    --json "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log"
