#!/usr/bin/env bash
# One lent-GPU call (device time is 15 minutes a session, start-up included):
#   0. the CUDA tests (tests/selfcascade/test_cuda_graphs.py: graphs replay the eager image);
#   1. bench/gpu.py: SD2.1-base / SDXL-base speed and memory (issue #8), ~6 minutes;
#   2. only with GPU_SESSION_DEMO=1: the demo model (issue #5) retrained on the GPU with a time
#      budget, ~3 minutes.
# Run from the repository root with the wheels the GPU image lacks in .whl/ (diffusers,
# importlib_metadata, zipp; the device tool's `carry`); everything it makes goes to $OUT:
#   log.txt, gpu.json, pytest.xml, and with the demo demo.tgz.* (the model folder, split below
#   the 16 MiB a returned file may have).
# Budgets keep the whole call well inside 10 minutes: GPU_BENCH_BUDGET_S (optional reps stop
# after it), GPU_BENCH_TIMEOUT_S, DEMO_UNET_BUDGET_S (UNet phase).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

echo "== part 0: CUDA tests"
# --noconftest: the suite's conftest needs Redis and the service's packages, absent there.
timeout 120 python3 -m pytest --noconftest -p no:cacheprovider -q -rs \
    --junitxml="$OUT/pytest.xml" tests/selfcascade/test_cuda_graphs.py
echo "part 0: exit $?"

echo "== part 1: bench/gpu.py"
started=$SECONDS
timeout "${GPU_BENCH_TIMEOUT_S:-420}" python3 bench/gpu.py --out "$OUT/gpu.json" \
    --budget-s "${GPU_BENCH_BUDGET_S:-250}" "$@"
echo "part 1: exit $? after $((SECONDS - started)) s"

if [ "${GPU_SESSION_DEMO:-0}" = 1 ]; then
    echo "== part 2: demo model"
    started=$SECONDS
    rm -rf models/demo models/demo-checkpoint
    timeout "${DEMO_TIMEOUT_S:-220}" python3 -m selfcascade.demo.train --out models/demo \
        --seed 0 --device cuda --threads 8 --batch-size 256 --steps 12000 \
        --dataset-size 32768 --vae-steps 1500 --vae-batch-size 32 --checkpoint-every 1000 \
        --log-every 250 --time-budget-s "${DEMO_UNET_BUDGET_S:-140}"
    echo "part 2: exit $? after $((SECONDS - started)) s"
    # The model folder only: the training state (optimiser moments, ~90 MB) would not come back.
    tar czf - -C models demo | split -b 15M - "$OUT/demo.tgz."
fi
ls -la "$OUT"
