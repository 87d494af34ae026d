"""Temporal consistency of direct vs self-cascade video sampling above the native size.

For every seed, three clips of the same prompt: the pivot (the native-size run, which is exactly
the cascade's first stage), the direct run at the target size, and the self-cascade run at the
target size. Measured on 8-bit frames scaled to [0, 1]:

- `frame_diff`: mean |frame[i+1] - frame[i]| of a clip (flicker plus motion);
- `frame_diff_vs_pivot`: that, divided by the pivot's own frame_diff (1 = as steady as the
  native-size clip; above 1 = more change between frames than the model makes at its own size);
- `motion_error`: mean |(v[i+1] - v[i]) - (p[i+1] - p[i])| against the pivot's frames upsampled
  (bicubic) to the target: how far the clip's frame-to-frame changes are from the pivot's;
- `distance_to_pivot`: mean |v[i] - p[i]| against the upsampled pivot (content kept).

The `pivot` rows are the pivot's frames upsampled to the target: the reference the other rows
are measured against (so their motion_error and distance are 0 by construction).

Default: the tiny random-weight text-to-video and AnimateDiff pipelines from
`selfcascade.tiny_models` (CPU). On random weights the numbers show the mechanics (the cascade
keeps the pivot's frames and their changes; direct sampling starts from other noise), NOT video
quality: pass --model for a real text-to-video or AnimateDiff folder.

    .venv/bin/python bench/video_consistency.py [--model PATH] [--frames 4] [--steps 10] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from selfcascade.library_logs import quiet_libraries
from selfcascade.loading import load_pipeline
from selfcascade.request import GenerationRequest
from selfcascade.tiny_models import (
    build_tiny_animatediff_pipeline,
    build_tiny_text_to_video_pipeline,
)
from selfcascade.video_pipeline import VideoSelfCascadePipeline

RESULTS = Path(__file__).parent / "results" / "video_consistency.json"
PROMPT = "a red ball rolling across a green field"
METRICS = ("frame_diff", "frame_diff_vs_pivot", "motion_error", "distance_to_pivot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="video diffusers folder (default: both tiny models)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=int, default=2, help="target side / native side")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1: steadier when busy)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()

    if args.model:
        models = {args.model: load_pipeline(args.model)}
    else:
        models = {
            "tiny-text-to-video (random weights)": build_tiny_text_to_video_pipeline(),
            "tiny-animatediff (random weights)": build_tiny_animatediff_pipeline(),
        }
    rows = []
    for name, pipe in models.items():
        pipe.set_progress_bar_config(disable=True)
        rows += measure(name, VideoSelfCascadePipeline(pipe), args)

    report = {
        "note": "random-weight tiny models show the mechanics, not quality"
        if not args.model
        else "",
        "device": str(next(iter(models.values())).device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "prompt": PROMPT,
        "frames": args.frames,
        "steps": args.steps,
        "seeds": args.seeds,
        "scale": args.scale,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows)
    print(f"\nwrote {args.out}")


def measure(model: str, engine: VideoSelfCascadePipeline, args: argparse.Namespace) -> list[dict]:
    native = engine.native_size
    target = (native.width * args.scale, native.height * args.scale)
    per_method: dict[str, dict[str, list[float]]] = {}
    evals: dict[str, int] = {}
    for seed in range(args.seeds):
        pivot = run(engine, native.width, native.height, "direct", seed, args)
        pivot_up = upsampled(pivot["frames"], target)
        for method in ("pivot", "direct", "self_cascade"):
            clip = pivot if method == "pivot" else run(engine, *target, method, seed, args)
            frames = pivot_up if method == "pivot" else as_array(clip["frames"])
            values = consistency(frames, pivot_up)
            values["seconds"] = clip["seconds"]
            evals[method] = clip["unet_evaluations"]
            for key, value in values.items():
                per_method.setdefault(method, {}).setdefault(key, []).append(value)
    rows = []
    for method, values in per_method.items():
        size = native if method == "pivot" else f"{target[0]}x{target[1]}"
        rows.append(
            {
                "model": model,
                "method": method,
                "size": str(size),
                "unet_evaluations": evals[method],
                **{key: statistics.mean(v) for key, v in values.items()},
                "per_seed": values,
            }
        )
    return rows


def run(
    engine: VideoSelfCascadePipeline, w: int, h: int, method: str, seed: int, args: Any
) -> dict[str, Any]:
    request = GenerationRequest(
        prompt=PROMPT,
        width=w,
        height=h,
        steps=args.steps,
        seed=seed,
        num_frames=args.frames,
        method=method,  # type: ignore[arg-type]
    )
    started = time.perf_counter()
    result = engine.generate(request)
    return {
        "frames": result.frames,
        "seconds": time.perf_counter() - started,
        "unet_evaluations": result.unet_evaluations,
    }


def as_array(frames: list[PIL.Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(f.convert("RGB"), dtype=np.float64) / 255 for f in frames])


def upsampled(frames: list[PIL.Image.Image], size: tuple[int, int]) -> np.ndarray:
    """The pivot's frames at the target size, each on its own (bicubic), (F, H, W, 3)."""
    return as_array([f.resize(size, PIL.Image.Resampling.BICUBIC) for f in frames])


def consistency(frames: np.ndarray, pivot: np.ndarray) -> dict[str, float]:
    """The module docstring's measures for one clip (F, H, W, 3) against the upsampled pivot."""
    steps = np.diff(frames, axis=0)  # (F-1, H, W, 3)
    pivot_steps = np.diff(pivot, axis=0)
    frame_diff = float(np.abs(steps).mean())
    pivot_diff = float(np.abs(pivot_steps).mean())
    return {
        "frame_diff": frame_diff,
        "frame_diff_vs_pivot": frame_diff / pivot_diff if pivot_diff else float("nan"),
        "motion_error": float(np.abs(steps - pivot_steps).mean()),
        "distance_to_pivot": float(np.abs(frames - pivot).mean()),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'model':<36} {'method':<13} {'size':>7} {'evals':>5} "
    header += " ".join(f"{m:>19}" for m in METRICS) + f" {'s':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(f"{r[m]:>19.4f}" for m in METRICS)
        print(
            f"{r['model']:<36} {r['method']:<13} {r['size']:>7} {r['unet_evaluations']:>5} "
            f"{cells} {r['seconds']:>6.2f}"
        )


if __name__ == "__main__":
    main()
