"""Self-cascade vs direct sampling on one model: UNet evaluations and wall time, side by side.

Both methods run interleaved in one process (rep by rep) so machine noise hits them alike.
Default: the tiny random SD pipeline from configs (CPU); pass --model for a real folder/hub id.

    .venv/bin/python bench/engine_overhead.py [--model PATH] [--steps 50] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from selfcascade.library_logs import quiet_libraries
from selfcascade.loading import load_pipeline
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.request import GenerationRequest
from selfcascade.tiny_models import build_tiny_sd_pipeline

RESULTS = Path(__file__).parent / "results" / "engine_overhead.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="diffusers folder or hub id (default: tiny config model)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1: steadier when busy)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()

    pipe = load_pipeline(args.model) if args.model else build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    engine = SelfCascadePipeline(pipe)
    native = engine.native_size
    rows = [measure(engine, native.width * s, native.height * s, s, args) for s in args.scales]

    report = {
        "model": args.model or "tiny-sd (random weights, config from selfcascade.tiny_models)",
        "device": str(pipe.device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "steps": args.steps,
        "reps": args.reps,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)
    print(f"\nwrote {args.out}")


def measure(
    engine: SelfCascadePipeline, width: int, height: int, scale: int, args: argparse.Namespace
) -> dict[str, Any]:
    times: dict[str, list[float]] = {"self_cascade": [], "direct": []}
    evals: dict[str, int] = {}
    stages: list[str] = []
    run_once(engine, width, height, "direct", args.steps)  # warm-up at this size
    for rep in range(args.reps):
        for method in ("self_cascade", "direct"):
            started = time.perf_counter()
            result = run_once(engine, width, height, method, args.steps, seed=rep)
            times[method].append(time.perf_counter() - started)
            evals[method] = result.unet_evaluations
            if method == "self_cascade":
                stages = [str(s) for s in result.stages]
    median = {m: statistics.median(t) for m, t in times.items()}
    return {
        "scale": scale,
        "size": f"{width}x{height}",
        "stages": stages,
        "unet_evaluations": evals,
        "median_seconds": median,
        "all_seconds": times,
        "time_ratio_cascade_over_direct": median["self_cascade"] / median["direct"],
    }


def run_once(
    engine: SelfCascadePipeline, w: int, h: int, method: str, steps: int, seed: int = 0
) -> Any:
    request = GenerationRequest(
        prompt="a red circle and a blue square", width=w, height=h, steps=steps, seed=seed,
        method=method,  # type: ignore[arg-type]
    )
    return engine.generate(request)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'scale':>5} {'size':>9} {'stages':<28} {'evals SC/direct':>15} "
    header += f"{'SC s':>7} {'direct s':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ev = r["unet_evaluations"]
        med = r["median_seconds"]
        print(
            f"{r['scale']:>4}x {r['size']:>9} {' -> '.join(r['stages']):<28} "
            f"{ev['self_cascade']:>7}/{ev['direct']:<7} {med['self_cascade']:>7.2f} "
            f"{med['direct']:>8.2f} {r['time_ratio_cascade_over_direct']:>6.2f}"
        )


if __name__ == "__main__":
    main()
