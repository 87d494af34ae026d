"""Tuned self-cascade overhead: wall time of tuned (LR features per step / per stage),
tuning-free and direct sampling for one 2x request, side by side in one process.

Variants run interleaved (rep by rep) so machine noise hits them alike; medians are reported.
The tuned variants use an upsampler set with random (non-zero) weights: the cost of the
injection does not depend on what the weights are, and zero weights would hide nothing either.
Default: the tiny random SD pipeline from configs, on the CPU with one thread (a tiny UNet gains
nothing from more threads and a shared machine makes them noisy); --model for a real one.

Also prints the upsamplers' parameter counts for the public SD2.1-base and SDXL-base UNet
configs (built on the meta device: shapes only, nothing allocated).

    .venv/bin/python bench/tuned_overhead.py [--model PATH] [--steps 50] [--reps 5]
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
from diffusers import UNet2DConditionModel

from selfcascade.library_logs import quiet_libraries
from selfcascade.loading import load_pipeline
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.public_architectures import SD21_BASE_UNET, SDXL_BASE_UNET
from selfcascade.request import GenerationRequest
from selfcascade.tiny_models import build_tiny_sd_pipeline
from selfcascade.tuned import TunedStageHook
from selfcascade.upsamplers import FeatureUpsamplerSet, UpsamplerSetConfig, count_parameters

RESULTS = Path(__file__).parent / "results" / "tuned_overhead.json"

VARIANTS = ("tuned_per_step", "tuned_per_stage", "tuning_free", "direct")


def parameter_counts() -> list[dict[str, Any]]:
    rows = []
    for name, config in (("SD2.1-base", SD21_BASE_UNET), ("SDXL-base", SDXL_BASE_UNET)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        ups = UpsamplerSetConfig.from_unet_config(unet.config)
        per_level = {
            lv.name: count_parameters(
                UpsamplerSetConfig.from_unet_config(unet.config, levels=(lv.name,))
            )
            for lv in ups.levels
        }
        rows.append(
            {
                "model": name,
                "unet_parameters": sum(p.numel() for p in unet.parameters()),
                "levels": [lv.name for lv in ups.levels],
                "upsampler_parameters": count_parameters(ups),
                "per_level": per_level,
            }
        )
    return rows


def measure(engine: SelfCascadePipeline, args: argparse.Namespace) -> list[dict[str, Any]]:
    native = engine.native_size
    base = GenerationRequest(
        prompt="a lighthouse on a cliff at dusk",
        width=native.width * 2,
        height=native.height * 2,
        steps=args.steps,
        seed=1,
    )
    ups = FeatureUpsamplerSet.random_for_unet(engine.pipe.unet.config)
    runs: dict[str, tuple[GenerationRequest, list[Any]]] = {
        "tuned_per_step": (base, [TunedStageHook(ups, "per_step")]),
        "tuned_per_stage": (base, [TunedStageHook(ups, "per_stage")]),
        "tuning_free": (base, []),
        "direct": (GenerationRequest(**{**base.__dict__, "method": "direct"}), []),
    }
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    last_stage: dict[str, list[float]] = {v: [] for v in VARIANTS}  # the stage hooks act on
    evaluations: dict[str, int] = {}
    for variant in VARIANTS:  # warm-up: first-call allocations stay out of the timings
        request, hooks = runs[variant]
        evaluations[variant] = engine.generate(request, stage_hooks=hooks).unet_evaluations
    for _ in range(args.reps):
        for variant in VARIANTS:
            request, hooks = runs[variant]
            started = time.perf_counter()
            result = engine.generate(request, stage_hooks=hooks)
            times[variant].append(time.perf_counter() - started)
            last_stage[variant].append(result.stage_seconds[-1])
    free = statistics.median(times["tuning_free"])
    direct = statistics.median(times["direct"])
    return [
        {
            "variant": v,
            "median_s": statistics.median(times[v]),
            "min_s": min(times[v]),
            "times_s": times[v],
            "last_stage_median_s": statistics.median(last_stage[v]),
            "last_stage_vs_tuning_free": statistics.median(last_stage[v])
            / statistics.median(last_stage["tuning_free"]),
            "vs_tuning_free": statistics.median(times[v]) / free,
            "vs_direct": statistics.median(times[v]) / direct,
            "unet_evaluations": evaluations[v],
        }
        for v in VARIANTS
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="diffusers folder or hub id (default: tiny config model)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model) if args.model else build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    engine = SelfCascadePipeline(pipe)
    rows = measure(engine, args)
    counts = parameter_counts()
    native = engine.native_size
    report = {
        "model": args.model or "tiny-sd (random weights, config from selfcascade.tiny_models)",
        "request": f"{native.width * 2}x{native.height * 2} (2x of native {native})",
        "device": str(pipe.device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "steps": args.steps,
        "reps": args.reps,
        "rows": rows,
        "upsampler_parameter_counts": counts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{report['request']}, {args.steps} steps, median of {args.reps}, {report['device']}")
    print(
        f"{'variant':<16} {'median s':>9} {'/ tuning-free':>14} {'/ direct':>9}"
        f" {'last stage s':>13} {'/ tuning-free':>14} {'UNet evals':>11}"
    )
    for r in rows:
        print(
            f"{r['variant']:<16} {r['median_s']:>9.3f} {r['vs_tuning_free']:>14.3f}"
            f" {r['vs_direct']:>9.3f} {r['last_stage_median_s']:>13.3f}"
            f" {r['last_stage_vs_tuning_free']:>14.3f} {r['unet_evaluations']:>11}"
        )
    print(f"\n{'model':<12} {'UNet params':>13} {'upsampler params':>17}  levels")
    for c in counts:
        print(
            f"{c['model']:<12} {c['unet_parameters'] / 1e6:>12.1f}M"
            f" {c['upsampler_parameters'] / 1e6:>16.2f}M  {', '.join(c['levels'])}"
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
