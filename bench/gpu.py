"""GPU speed of self-cascade on the real SD2.1-base and SDXL-base architectures (issue #8).

One prepared script for one device call. Both architectures are built from their public
configs with random weights (no hub on the GPU machine; speed does not depend on the values).
For each case it times, side by side in one process, at the same step count and scheduler
(DDIM), end to end (prompt encoding to decoded image):

- `stock_direct`: the stock diffusers pipeline called at the target size, what a user would
  otherwise run;
- `tuning_free`: this project's self-cascade (native -> 2x -> ... , pivot strength 0.7);
- `tuned`: the same with the time-aware feature upsamplers (random weights, LR features
  recomputed every step as in the official code);

and, with the suffix `_cuda_graphs`, the same through an engine whose launch-bound stages (up
to 1024^2) replay CUDA graphs of the UNet (selfcascade/cuda_graphs.py, the worker's default);
its images are compared with the eager variant's of the same seed. Also: `tuned_per_stage`
(LR features cached once per stage), `_channels_last`, and `--experiment attention`, which
compares SDPA's attention kernels on SD2.1 2048^2. It records median seconds, per-stage
seconds, peak GPU memory (allocated and reserved), UNet evaluations, whether the decoded
pixels were finite, the warm-up cost at load and first-vs-warm job times, and host syncs per
denoising step. It writes JSON after every run (a killed run keeps what it measured) and prints
a table last.

    python bench/gpu.py --out $OUT/gpu.json            # on the lent GPU, ~5 minutes
    .venv/bin/python bench/gpu.py --tiny               # the same code path on tiny CPU models
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# A sibling script (bench/ is the script's folder): its SDPA backends and preference.
from gpu_kernels import BACKENDS, preferring

from selfcascade.library_logs import quiet_libraries
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.public_architectures import build_public_pipeline
from selfcascade.request import GenerationRequest
from selfcascade.stage_runtime import count_calls
from selfcascade.stage_runtime import synchronize_device as synchronize
from selfcascade.tiny_models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from selfcascade.tuned import TunedStageHook
from selfcascade.upsamplers import FeatureUpsamplerSet
from selfcascade.warmup import warm_up

RESULTS = Path(__file__).parent / "results" / "gpu.json"
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
BASE_VARIANTS = ("stock_direct", "tuning_free", "tuning_free_cuda_graphs", "tuned_cuda_graphs")
GRAPHS = "_cuda_graphs"  # through the worker's default engine: stages up to 1024^2 graphed
# Every stage graphed, 2048^2 and 4096^2 too (an experiment, not the default).
GRAPHS_ALL = "_cuda_graphs_all"
# The default engine with its UNet torch.compile'd for every stage of the case's size, compiled
# at warm-up (selfcascade/compiled_unet.py); its images are compared with GRAPHS' (same seed).
GRAPHS_COMPILED = "_cuda_graphs_compiled"
MODES = (GRAPHS_COMPILED, GRAPHS_ALL, GRAPHS)  # longest first: each contains GRAPHS
# `--experiment attention`: the attention-bound 2048^2 step with cuDNN's fused attention (the
# Hopper kernel) preferred over the FlashAttention-2 kernel SDPA picks by default, stock too.
ATTENTION_VARIANTS = (
    "stock_direct", "tuning_free", "stock_direct_cudnn_attention",
    "tuning_free_cudnn_attention", "tuned_per_stage_cudnn_attention",
)
GIB = 2**30


@dataclass(frozen=True)
class Case:
    architecture: str
    size: int
    steps: int
    reps: int = 2
    variants: tuple[str, ...] = BASE_VARIANTS
    # Run in the last rep only (device time is 15 minutes a session).
    extras: tuple[str, ...] = ("tuned",)


FULL_CASES = (
    Case("sd21-base", 1024, 50),
    Case("sd21-base", 2048, 50, extras=("tuned", "tuned_per_stage_cuda_graphs")),
    Case("sdxl-base", 2048, 50),
    # 20 steps, one rep, no stock run (33 s on an H200, measured before: 44.9 GiB): the memory
    # target is what this case checks.
    Case("sdxl-base", 4096, 20, reps=1, variants=("tuning_free_cuda_graphs", "tuned_cuda_graphs"),
         extras=()),
)
GRAPH_VARIANTS = ("stock_direct", "tuning_free_cuda_graphs", "tuned_cuda_graphs")
EXPERIMENTS = {
    # Tuned stages replaying graphs (per-step LR features inside the graph), against the eager
    # tuned run of the same seed in the last rep.
    "graphs": (
        Case("sd21-base", 1024, 50, variants=GRAPH_VARIANTS),
        Case("sd21-base", 2048, 50, variants=GRAPH_VARIANTS),
        Case("sdxl-base", 2048, 50, variants=GRAPH_VARIANTS[1:]),
    ),
    # Every stage graphed: does graphing the tuned 2048^2 stage (its LR branch runs at 1024^2,
    # launch-bound) bring the tuned overhead down?
    "graphs-all": (
        Case("sd21-base", 2048, 50, extras=(), variants=(
            "tuning_free_cuda_graphs", "tuned_cuda_graphs",
            "tuning_free_cuda_graphs_all", "tuned_cuda_graphs_all")),
    ),
    "attention": (Case("sd21-base", 2048, 50, reps=1, variants=ATTENTION_VARIANTS, extras=()),),
    # torch.compile on top of the default engine, tuned stages compiled too. The compiled
    # variants come first, so the first job is the first after a compiling warm-up; they and
    # stock run in both reps (stock was once left out of a single last rep by the budget), the
    # uncompiled ones (the compiled images' pixel twins) in the last, warm one.
    "compile": (Case("sd21-base", 2048, 50, variants=(
        "tuning_free" + GRAPHS_COMPILED, "tuned" + GRAPHS_COMPILED, "stock_direct",
    ), extras=("tuning_free_cuda_graphs", "tuned_cuda_graphs")),),
    # The same at SD2.1 1024^2: its tuned stage replays a graph of the compiled forward (fewer
    # minutes of compiling than 2048^2: three signatures).
    "compile-1024": (Case("sd21-base", 1024, 50, variants=(
        "tuning_free" + GRAPHS_COMPILED, "tuned" + GRAPHS_COMPILED,
    ), extras=("stock_direct", "tuning_free_cuda_graphs", "tuned_cuda_graphs")),),
    # Run after "compile" on the same machine, in a new process: what a restarted worker pays
    # with inductor's on-disk cache warm (the GPU overlay keeps it on the pod's volume), and
    # its first job after that warm-up.
    "compile-restart": (Case("sd21-base", 2048, 50, reps=1, extras=(), variants=(
        "tuned" + GRAPHS_COMPILED, "tuning_free" + GRAPHS_COMPILED)),),
    "compile-tiny": (Case("tiny-sd", 128, 4, variants=(
        "tuning_free" + GRAPHS_COMPILED, "tuned" + GRAPHS_COMPILED), extras=(
        "tuning_free_cuda_graphs", "tuned_cuda_graphs")),),
    "attention-tiny": (Case("tiny-sd", 128, 4, reps=1, variants=ATTENTION_VARIANTS, extras=()),),
}


def attention_graphs_cases(backend: str, architecture: str = "sd21-base",
                           size: int = 2048, steps: int = 50) -> tuple[Case, ...]:
    """`--experiment attention-graphs`: the worker's default engine (graphs up to 1024^2) with
    `backend` preferred in SDPA, against stock diffusers with SDPA's own choice and with the
    same preference. The graphs captured at warm-up keep SDPA's own choice: the preference
    reaches the eager 2048^2 stage, where the attention is."""
    suffix = f"_{backend}_attention"
    return (Case(architecture, size, steps, variants=(
        "stock_direct", "tuning_free_cuda_graphs", "stock_direct" + suffix,
        "tuning_free_cuda_graphs" + suffix, "tuned_cuda_graphs" + suffix,
    ), extras=("tuned_cuda_graphs",)),)
TINY_CASES = (
    Case("tiny-sd", 128, 4),
    Case("tiny-sd", 256, 4, extras=("tuned", "tuned_per_stage_cuda_graphs",
                                    "tuning_free_channels_last")),
    Case("tiny-sdxl", 256, 4, reps=1),
)


@dataclass
class Run:
    architecture: str
    size: int
    steps: int
    variant: str
    rep: int
    seconds: float
    stage_seconds: list[float]
    stages: list[str]
    unet_evaluations: int
    peak_allocated_gib: float
    peak_reserved_gib: float
    finite: bool
    # `_cuda_graphs` variants: the largest difference of any pixel value (0-255) from the image
    # of the same seed of their `twin`; None when that one did not run.
    max_pixel_diff_vs_eager: int | None = None


@dataclass
class Report:
    device: str
    torch: str
    diffusers: str
    dtype: str
    cases: list[dict[str, Any]]
    runs: list[Run] = field(default_factory=list)
    startup: list[dict[str, Any]] = field(default_factory=list)
    host_syncs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["summary"] = summarise(self.runs)
        path.write_text(json.dumps(data, indent=2) + "\n")


def build(architecture: str, device: torch.device, dtype: torch.dtype) -> Any:
    if architecture == "tiny-sd":
        pipe: Any = build_tiny_sd_pipeline()
    elif architecture == "tiny-sdxl":
        pipe = build_tiny_sdxl_pipeline()
    else:
        return build_public_pipeline(architecture, device=device, dtype=dtype)  # type: ignore[arg-type]
    return pipe.to(device=device, dtype=dtype)


@contextmanager
def finite_output_check(pipe: Any) -> Iterator[list[torch.Tensor]]:
    """Collect, per VAE decoder call (one per tile when tiled), whether its pixels are finite."""
    flags: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        flags.append(torch.isfinite(output).all())

    handle = pipe.vae.decoder.register_forward_hook(hook)
    try:
        yield flags
    finally:
        handle.remove()


def attention_suffix(variant: str) -> str:
    """`_<backend>_attention` when `variant` prefers one of SDPA's backends, else ""."""
    return next((f"_{name}_attention" for name in BACKENDS
                 if variant.endswith(f"_{name}_attention")), "")


@contextmanager
def attention_backend(variant: str) -> Iterator[None]:
    """SDPA with the backend a `*_<backend>_attention` variant names first, else SDPA's choice.
    Graphs captured before (the warm-up's) keep the kernels they were captured with."""
    suffix = attention_suffix(variant)
    if not suffix:
        yield
        return
    with preferring(BACKENDS[suffix.split("_")[1]]):
        yield


def timed_run(
    engines: dict[str, SelfCascadePipeline],
    case: Case,
    variant: str,
    rep: int,
    hooks: dict[str, Any],
) -> tuple[Run, Any]:
    """One end-to-end run of `variant`; returns it and its (first) image."""
    mode = graph_mode(variant)
    engine = engines[mode]
    pipe, device = engine.pipe, engine.pipe.device
    request = GenerationRequest(PROMPT, case.size, case.size, steps=case.steps, seed=rep)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    channels_last = variant.endswith("_channels_last")
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    base = (variant.removesuffix("_channels_last").removesuffix(attention_suffix(variant))
            .removesuffix(mode))
    try:
        with attention_backend(variant), finite_output_check(pipe) as flags:
            synchronize(device)
            started = time.perf_counter()
            if base == "stock_direct":
                with count_calls(pipe.unet) as calls:
                    images = pipe(
                        PROMPT,
                        height=case.size,
                        width=case.size,
                        num_inference_steps=case.steps,
                        generator=torch.Generator().manual_seed(rep),
                    ).images
                synchronize(device)
                seconds = time.perf_counter() - started
                stage_seconds, stages, evaluations = [seconds], [f"{case.size}"], calls[0]
            else:
                result = engine.generate(request, stage_hooks=hooks.get(base, []))
                images = result.images
                synchronize(device)
                seconds = time.perf_counter() - started
                stage_seconds = result.stage_seconds
                stages = [f"{s.width}" for s in result.stages]
                evaluations = result.unet_evaluations
            finite = bool(torch.stack(flags).all()) if flags else False
    finally:
        if channels_last:
            pipe.unet.to(memory_format=torch.contiguous_format)
    allocated = reserved = 0.0
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) / GIB
        reserved = torch.cuda.max_memory_reserved(device) / GIB
    run = Run(
        case.architecture, case.size, case.steps, variant, rep, seconds, stage_seconds, stages,
        evaluations, allocated, reserved, finite,
    )
    return run, images[0]


def graph_mode(variant: str) -> str:
    """Which engine runs `variant`: "" (eager) or one of MODES (its suffix)."""
    return next((mode for mode in MODES if mode in variant), "")


def twin(variant: str) -> str:
    """The variant whose image `variant`'s is compared with: the same without graphs, or, for
    compiled ones, the same with graphs but not compiled."""
    mode = graph_mode(variant)
    return variant.replace(mode, GRAPHS if mode == GRAPHS_COMPILED else "")


def max_pixel_diff(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def count_host_syncs(engine: SelfCascadePipeline, size: int, steps: int) -> dict[str, Any]:
    """Synchronising CUDA calls per denoising step of a tuning-free run (sync debug mode)."""
    request = GenerationRequest(PROMPT, size, size, steps=steps)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = engine.generate(request)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    denoising_steps = sum(result.stage_steps)
    return {
        "size": size,
        "denoising_steps": denoising_steps,
        "synchronizing_calls": len(syncs),
        "per_step": len(syncs) / denoising_steps,
        "examples": sorted(set(syncs))[:5],
    }


def bench_architecture(
    architecture: str,
    cases: list[Case],
    report: Report,
    args: argparse.Namespace,
    deadline: float,
) -> None:
    device, dtype = torch.device(args.device), args.torch_dtype
    started = time.perf_counter()
    pipe = build(architecture, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    synchronize(device)
    built_s = time.perf_counter() - started
    engines = {  # by graph_mode
        "": SelfCascadePipeline(pipe, cuda_graph_max_pixels=None),
        GRAPHS: SelfCascadePipeline(pipe),  # the worker's default: graphs up to 1024^2
        GRAPHS_ALL: SelfCascadePipeline(pipe, cuda_graph_max_pixels=4096 * 4096),
        GRAPHS_COMPILED: SelfCascadePipeline(pipe, compile_backend="inductor"),
    }
    # Small random (non-zero) weights: the cost does not depend on the values.
    ups = FeatureUpsamplerSet.random_for_unet(pipe.unet.config).to(pipe.device, pipe.dtype)
    hooks = {
        "tuned": [TunedStageHook(ups, "per_step")],
        "tuned_per_stage": [TunedStageHook(ups, "per_stage")],
    }
    # What a worker does at load (with its default engine): the first warm-up pays the
    # one-time costs and captures the graphs of the native and 2x stages, a second shows what
    # a warm one costs. Then the eager engine's, unreported.
    graphs = engines[GRAPHS].unet_graphs
    startup = {"architecture": architecture, "build_s": built_s,
               "warm_up_cold_s": warm_up(engines[GRAPHS]),
               "warm_up_warm_s": warm_up(engines[GRAPHS]),
               "graphs_captured_at_warm_up": graphs.captures}
    warm_up(engines[""])
    compiled_sizes = sorted({c.size for c in cases
                             if any(GRAPHS_COMPILED in v for v in (*c.variants, *c.extras))})
    if compiled_sizes:
        # What a worker compiling its UNet does at load: every stage of the largest square size.
        native = engines[GRAPHS_COMPILED].native_size.width
        scale = compiled_sizes[-1] // native
        startup["compile_warm_up_s"] = warm_up(engines[GRAPHS_COMPILED], scale=scale)
        # A worker with upsamplers warms up tuned too, compiling its tuned stages.
        startup["compile_warm_up_tuned_s"] = warm_up(engines[GRAPHS_COMPILED], scale=scale,
                                                     stage_hooks=hooks["tuned"])
        compiled = engines[GRAPHS_COMPILED].unet_graphs.compiled
        startup["compiled_signatures"] = compiled.compiled_signatures if compiled else 0
        startup["compile_warm_up_warm_s"] = warm_up(engines[GRAPHS_COMPILED], scale=scale)
    report.startup.append(startup)
    if device.type == "cuda" and args.sync_check:
        report.host_syncs.append(
            {"architecture": architecture, **count_host_syncs(engines[GRAPHS], cases[0].size, 5)}
        )
    report.save(args.out)

    for case in cases:
        for rep in range(case.reps):
            variants = list(case.variants)
            if rep == case.reps - 1:
                variants += case.extras
            runs: dict[str, tuple[Run, Any]] = {}
            for variant in variants:
                label = f"{architecture} {case.size} {variant} rep {rep}"
                if rep > 0 and time.perf_counter() > deadline:
                    report.skipped.append(f"{label}: over the time budget")
                    continue
                run, image = runs[variant] = timed_run(engines, case, variant, rep, hooks)
                report.runs.append(run)
                report.save(args.out)
                print(f"{label}: {run.seconds:.2f}s peak {run.peak_allocated_gib:.1f} GiB"
                      f" finite={run.finite}", flush=True)
            for variant, (run, image) in runs.items():
                eager = runs.get(twin(variant)) if graph_mode(variant) else None
                if eager is not None:
                    run.max_pixel_diff_vs_eager = max_pixel_diff(image, eager[1])
            report.save(args.out)
        first = [r for r in report.runs if (r.architecture, r.size) == (architecture, case.size)]
        if first and not startup.get("first_job_s"):
            # The first job after the warm-up: the worker's first real job.
            startup["first_job_s"] = first[0].seconds
            startup["first_job"] = f"{case.size} {first[0].variant}"

    startup["graphs_held"] = graphs.held
    compiled = engines[GRAPHS_COMPILED].unet_graphs.compiled
    if compiled_sizes and compiled is not None:
        # Calls of compiled signatures that failed dynamo's guards and ran uncompiled: 0 when
        # the compiled variants' times are what compiling gives.
        startup["compiled_fallbacks"] = compiled.fallbacks
        startup["compiled_engine_graphs_held"] = engines[GRAPHS_COMPILED].unet_graphs.held
    del engines, graphs, pipe, ups, hooks
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summarise(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (case, variant): median over reps, ratios against the same case's runs."""
    keyed: dict[tuple[str, int, str], list[Run]] = {}
    for run in runs:
        keyed.setdefault((run.architecture, run.size, run.variant), []).append(run)

    def warm(group: list[Run]) -> list[Run]:
        # The first rep of a case includes the allocator's growth to that size: a warm worker
        # has paid that already, so with two or more reps the first is left out.
        return group[1:] if len(group) > 1 else group

    def median(arch: str, size: int, variant: str) -> float | None:
        group = keyed.get((arch, size, variant))
        return statistics.median(r.seconds for r in warm(group)) if group else None

    rows = []
    for (arch, size, variant), group in keyed.items():
        seconds = median(arch, size, variant)
        direct = median(arch, size, "stock_direct")
        # Against the tuning-free run of the same engine and attention backend: the tuned
        # overhead in one mode. Against stock with SDPA's own choice: what a user would run.
        free = median(arch, size,
                      "tuning_free" + graph_mode(variant) + attention_suffix(variant))
        rows.append({
            "architecture": arch,
            "size": size,
            "steps": group[0].steps,
            "variant": variant,
            "median_s": seconds,
            "first_s": group[0].seconds,
            "reps": len(group),
            "stage_seconds": [
                statistics.median(s)
                for s in zip(*(r.stage_seconds for r in warm(group)), strict=True)
            ],
            "stages": group[0].stages,
            "vs_stock_direct": seconds / direct if seconds and direct else None,
            "vs_tuning_free": seconds / free if seconds and free else None,
            "peak_allocated_gib": max(r.peak_allocated_gib for r in group),
            "peak_reserved_gib": max(r.peak_reserved_gib for r in group),
            "unet_evaluations": group[0].unet_evaluations,
            "finite": all(r.finite for r in group),
            "max_pixel_diff_vs_eager": max(
                (r.max_pixel_diff_vs_eager for r in group
                 if r.max_pixel_diff_vs_eager is not None), default=None),
        })
    return rows


def print_table(report: Report) -> None:
    print(f"\n{report.device}, {report.dtype}, torch {report.torch}, diffusers {report.diffusers}")
    header = (f"{'model':<10} {'size':>5} {'steps':>5} {'variant':<44} {'median s':>9}"
              f" {'first s':>8} {'/stock':>7} {'/free':>6} {'stages (s)':<24} {'peak GiB':>8}"
              f" {'evals':>5} fin px-diff")
    print(header)
    for r in summarise(report.runs):
        ratio = f"{r['vs_stock_direct']:.3f}" if r["vs_stock_direct"] else "-"
        free = f"{r['vs_tuning_free']:.3f}" if r["vs_tuning_free"] else "-"
        stages = " ".join(f"{s:.2f}" for s in r["stage_seconds"])
        diff = r["max_pixel_diff_vs_eager"]
        print(f"{r['architecture']:<10} {r['size']:>5} {r['steps']:>5} {r['variant']:<44}"
              f" {r['median_s']:>9.3f} {r['first_s']:>8.3f} {ratio:>7} {free:>6} {stages:<24}"
              f" {r['peak_allocated_gib']:>8.2f} {r['unet_evaluations']:>5} {r['finite']}"
              f" {'-' if diff is None else diff}")
    for s in report.startup:
        first = s.get("first_job_s")
        print(f"startup {s['architecture']}: build {s['build_s']:.1f}s, warm-up cold"
              f" {s['warm_up_cold_s']:.2f}s / warm {s['warm_up_warm_s']:.2f}s, first job"
              f" {first if first is None else round(first, 2)}s ({s.get('first_job')}),"
              f" graphs captured at warm-up {s['graphs_captured_at_warm_up']},"
              f" held at the end {s.get('graphs_held')}")
        if "compile_warm_up_s" in s:
            print(f"  compiling warm-up {s['compile_warm_up_s']:.1f}s, tuned"
                  f" {s['compile_warm_up_tuned_s']:.1f}s ({s['compiled_signatures']}"
                  f" signatures), then {s['compile_warm_up_warm_s']:.2f}s;"
                  f" {s.get('compiled_fallbacks')} uncompiled fallbacks,"
                  f" {s.get('compiled_engine_graphs_held')} graphs held")
    for h in report.host_syncs:
        print(f"host syncs {h['architecture']} {h['size']}: {h['synchronizing_calls']} in"
              f" {h['denoising_steps']} steps ({h['per_step']:.1f}/step)")
    for skipped in report.skipped:
        print(f"skipped: {skipped}")


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny CPU models (tests the script)")
    parser.add_argument("--only", nargs="+", help="architectures to run (default: all)")
    parser.add_argument("--experiment", choices=sorted([*EXPERIMENTS, "attention-graphs"]),
                        help="run one optimisation experiment instead of the standard cases")
    parser.add_argument("--attention-backend", default="cudnn", choices=sorted(BACKENDS),
                        help="the backend `--experiment attention-graphs` prefers")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="after this, only the first rep of each variant still runs")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-sync-check", dest="sync_check", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.torch_dtype = getattr(torch, args.dtype)
    if args.tiny or args.device == "cpu":
        args.torch_dtype = torch.float32  # half precision on a CPU is slow and not what runs
    quiet_libraries()
    import diffusers

    standard = TINY_CASES if args.tiny else FULL_CASES
    if args.experiment == "attention-graphs":
        chosen = (attention_graphs_cases(args.attention_backend, "tiny-sd", 128, 4) if args.tiny
                  else attention_graphs_cases(args.attention_backend))
    else:
        chosen = EXPERIMENTS[args.experiment] if args.experiment else standard
    cases = [c for c in chosen
             if not args.only or c.architecture in args.only]
    device_name = (torch.cuda.get_device_name(0) if args.device.startswith("cuda")
                   else platform.processor() or platform.machine())
    report = Report(device=device_name, torch=torch.__version__, diffusers=diffusers.__version__,
                    dtype=str(args.torch_dtype).removeprefix("torch."),
                    cases=[asdict(c) for c in cases])
    deadline = time.perf_counter() + args.budget_s
    architectures = list(dict.fromkeys(c.architecture for c in cases))
    for index, architecture in enumerate(architectures):
        # Each architecture gets its share of what is left, so SD2.1's optional reps cannot
        # starve SDXL's mandatory ones.
        left = deadline - time.perf_counter()
        share = time.perf_counter() + left / (len(architectures) - index)
        bench_architecture(architecture, [c for c in cases if c.architecture == architecture],
                           report, args, share)
    report.save(args.out)
    print_table(report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
