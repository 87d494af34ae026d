#!/usr/bin/env bash
# One lent-GPU call (device time is 15 minutes a session, start-up included). Parts, chosen
# with GPU_SESSION_PARTS (default "tests kernels attention"):
#   tests      the CUDA tests (tests/selfcascade/test_cuda_graphs.py: graphs replay the eager
#              image, tuned graphs keyed by their pivot buffer), ~1 minute;
#   kernels    bench/gpu_kernels.py: SDPA's attention backends on the stages' shapes, one UNet
#              call eager / with each backend preferred / torch.compile'd, ~3-4 minutes;
#   attention  bench/gpu.py end to end on SD2.1 2048^2 with the backend `kernels` found fastest
#              at the 2048^2 attention preferred (when it beats FlashAttention-2 by 5%; else
#              the graphs experiment again), ~2-3 minutes;
#   compile    bench/gpu.py --experiment compile: SD2.1 2048^2 with the UNet torch.compile'd at
#              warm-up (~5.5 minutes of compiling, tuned included) against the default engine
#              and stock, ~7 minutes; GPU_COMPILE_EXPERIMENT=compile-1024: SD2.1 1024^2, ~3;
#   restart    after compile: bench/gpu.py --experiment compile-restart in a new process, so
#              compiling reads inductor's on-disk cache (a restarted worker), and its first job;
#              with the seconds left of GPU_SESSION_S (default 585) from the script's start;
#   bench      bench/gpu.py's standard cases (SD2.1 1024/2048, SDXL 2048/4096), ~6 minutes;
#   demo       the demo model (issue #5) retrained on the GPU with a time budget, ~3 minutes.
# Run from the repository root with the wheels the GPU image lacks in .whl/ (diffusers,
# importlib_metadata, zipp; the device tool's `carry`); everything it makes goes to $OUT:
# log.txt, pytest.xml, gpu_kernels.json, gpu.json, and with the demo demo.tgz.* (the model
# folder, split below the 16 MiB a returned file may have).
set -u
OUT=${OUT:-/tmp/out}
PARTS=" ${GPU_SESSION_PARTS:-tests kernels attention} "
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__,
'cudnn', torch.backends.cudnn.version())"
wants() { [[ "$PARTS" == *" $1 "* ]]; }
session_end=$(( ${GPU_SESSION_S:-585} ))
started=$SECONDS
elapsed() { echo "$1: exit $2 after $((SECONDS - started)) s"; started=$SECONDS; }

if wants tests; then
    echo "== tests: CUDA graphs"
    # --noconftest: the suite's conftest needs Redis and the service's packages, absent there.
    timeout 150 python3 -m pytest --noconftest -p no:cacheprovider -q -rs \
        --junitxml="$OUT/pytest.xml" tests/selfcascade/test_cuda_graphs.py tests/selfcascade/test_compiled_unet.py
    elapsed tests $?
fi

if wants kernels; then
    echo "== kernels: bench/gpu_kernels.py"
    timeout "${GPU_KERNELS_TIMEOUT_S:-270}" python3 bench/gpu_kernels.py \
        --out "$OUT/gpu_kernels.json" --budget-s "${GPU_KERNELS_BUDGET_S:-120}"
    elapsed kernels $?
fi

if wants attention; then
    backend=$(python3 - "$OUT/gpu_kernels.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["attention"]
except (OSError, ValueError, KeyError):
    rows = []
timed = {r["backend"]: r["ms"] for r in rows
         if r["shape"] == "sd21 2048 level 1 self" and "ms" in r}
best = min(timed, key=timed.get) if timed else "flash"
print(best if best != "flash" and timed[best] < 0.95 * timed["flash"] else "")
PY
)
    echo "== attention: bench/gpu.py, preferring '${backend:-none: graphs experiment}'"
    if [ -n "$backend" ]; then
        args=(--experiment attention-graphs --attention-backend "$backend")
    else
        args=(--experiment graphs --only sd21-base)
    fi
    timeout "${GPU_ATTENTION_TIMEOUT_S:-200}" python3 bench/gpu.py --out "$OUT/gpu.json" \
        --budget-s "${GPU_ATTENTION_BUDGET_S:-110}" --no-sync-check "${args[@]}"
    elapsed attention $?
fi

if wants compile; then
    experiment=${GPU_COMPILE_EXPERIMENT:-compile}  # or compile-1024 (SD2.1 1024^2, shorter)
    echo "== compile: bench/gpu.py --experiment $experiment"
    timeout "${GPU_COMPILE_TIMEOUT_S:-480}" python3 bench/gpu.py --out "$OUT/gpu_$experiment.json" \
        --budget-s "${GPU_COMPILE_BUDGET_S:-430}" --no-sync-check --experiment "$experiment"
    elapsed compile $?
fi

if wants restart; then
    left=$(( session_end - SECONDS ))
    echo "== restart: bench/gpu.py --experiment compile-restart, ${left} s left"
    if (( left > 60 )); then
        timeout "$left" python3 bench/gpu.py --out "$OUT/gpu_compile_restart.json" \
            --budget-s 0 --no-sync-check --experiment compile-restart
        elapsed restart $?
    else
        echo "restart: skipped, too little time left"
    fi
fi

if wants bench; then
    echo "== bench: bench/gpu.py"
    timeout "${GPU_BENCH_TIMEOUT_S:-420}" python3 bench/gpu.py --out "$OUT/gpu.json" \
        --budget-s "${GPU_BENCH_BUDGET_S:-250}"
    elapsed bench $?
fi

if wants demo; then
    echo "== demo: the demo model"
    rm -rf models/demo models/demo-checkpoint
    timeout "${DEMO_TIMEOUT_S:-220}" python3 -m selfcascade.demo.train --out models/demo \
        --seed 0 --device cuda --threads 8 --batch-size 256 --steps 12000 \
        --dataset-size 32768 --vae-steps 1500 --vae-batch-size 32 --checkpoint-every 1000 \
        --log-every 250 --time-budget-s "${DEMO_UNET_BUDGET_S:-140}"
    elapsed demo $?
    # The model folder only: the training state (optimiser moments, ~90 MB) would not come back.
    tar czf - -C models demo | split -b 15M - "$OUT/demo.tgz."
fi
ls -la "$OUT"
