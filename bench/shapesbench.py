"""ShapesBench: the paper's claims in miniature, on the demo model and its procedural shapes.

For scales 2x and 4x per side and the methods `direct` (sample at the target size), `bicubic`
(upscale the native sample in pixel space), `self_cascade` tuning-free and `self_cascade_tuned`
(with --upsamplers), on a fixed seeded list of prompt/seed pairs, it measures composition
accuracy (the detected (colour, shape) multiset equals the caption's), crispness (mean 10-90%
edge rise width in px, and its ratio to ground-truth renders of the same captions at that size),
UNet evaluations and seconds per image. It prints a table and writes JSON, a PNG grid of
samples and a PNG plot under bench/results/.

    .venv/bin/python bench/shapesbench.py [--model models/demo] [--pairs 200] \
        [--upsamplers PATH] [--scales 2 4] [--steps 50] [--guidance 5] [--pivot-strength K ...]

The prompt/seed pairs come from a data-set stream the training never draws from (BENCH_SEED),
and the noise seeds are the pair index: nothing here is chosen by looking at results.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import torch

from selfcascade.demo import card as demo_card
from selfcascade.demo.metrics import composition_correct, mean_edge_width
from selfcascade.demo.shapes import parse_caption, render, sample_example
from selfcascade.library_logs import quiet_libraries
from selfcascade.loading import load_pipeline
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.request import PAPER_PIVOT_STRENGTH, GenerationRequest
from selfcascade.stage_hooks import StageHook

RESULTS = Path(__file__).parent / "results"
BENCH_SEED = 20_261_126
# A second unseen stream for choosing sampling settings (guidance, K) without looking at the
# benchmark pairs the results are reported on.
VALIDATION_SEED = BENCH_SEED + 1
METHODS = ("bicubic", "self_cascade", "self_cascade_tuned", "direct")
CASCADES = ("self_cascade", "self_cascade_tuned")


@dataclass(frozen=True)
class Pair:
    caption: str
    seed: int
    index: int
    stream: int = BENCH_SEED


@dataclass(frozen=True)
class Sample:
    method: str
    scale: int
    pair: int
    correct: bool
    edge_width: float
    truth_edge_width: float
    unet_evaluations: int
    seconds: float
    pivot_strength: float | None = None


def method_rank(label: str) -> tuple[int, str]:
    """Table order: native, bicubic, the cascades (by pivot strength), direct."""
    return ("native", *METHODS).index(label.split("@")[0]), label


def benchmark_pairs(count: int, stream: int = BENCH_SEED) -> list[Pair]:
    return [Pair(sample_example(stream, i)[0].text, i, i, stream) for i in range(count)]


def truth_edge_width(pair: Pair, size: int) -> float:
    """Edge width of the exact render of this pair's caption (its own seeded scene)."""
    _, scene = sample_example(pair.stream, pair.index)
    return mean_edge_width(render(scene, size))


class Runner:
    """Generates and scores every (method, scale) for one pair; keeps images for the grid."""

    def __init__(self, engine: SelfCascadePipeline, args: argparse.Namespace,
                 tuned: StageHook | None) -> None:
        self.engine = engine
        self.args = args
        self.tuned = tuned
        self.native = engine.native_size.width
        self.images: dict[tuple[str, int, int], PIL.Image.Image] = {}

    def request(
        self, pair: Pair, size: int, method: str, pivot_strength: float
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=pair.caption, width=size, height=size, steps=self.args.steps,
            guidance_scale=self.args.guidance, seed=pair.seed, pivot_strength=pivot_strength,
            method="direct" if method == "direct" else "self_cascade",
        )

    def run_pair(self, pair: Pair) -> list[Sample]:
        native = self.generate(pair, self.native, "direct", ())
        samples = [self.score(pair, "native", 1, *native)]
        for scale in self.args.scales:
            size = self.native * scale
            started = time.perf_counter()
            upscaled = native[0].resize((size, size), PIL.Image.Resampling.BICUBIC)
            resize_seconds = time.perf_counter() - started
            samples.append(
                self.score(pair, "bicubic", scale, upscaled, native[1], native[2] + resize_seconds)
            )
            for method in CASCADES:
                if method == "self_cascade_tuned" and self.tuned is None:
                    continue
                hooks: tuple[StageHook, ...] = (
                    (self.tuned,) if method == "self_cascade_tuned" and self.tuned else ()
                )
                for strength in self.args.pivot_strength:
                    label = method if len(self.args.pivot_strength) == 1 else (
                        f"{method}@K{strength:g}"
                    )
                    generated = self.generate(pair, size, method, hooks, strength)
                    samples.append(self.score(pair, label, scale, *generated, strength))
            direct = self.generate(pair, size, "direct", (), 1.0)
            samples.append(self.score(pair, "direct", scale, *direct))
        return samples

    def generate(
        self, pair: Pair, size: int, method: str, hooks: tuple[StageHook, ...],
        pivot_strength: float = 1.0,
    ) -> tuple[PIL.Image.Image, int, float]:
        started = time.perf_counter()
        request = self.request(pair, size, method, pivot_strength)
        result = self.engine.generate(request, stage_hooks=hooks)
        return result.images[0], result.unet_evaluations, time.perf_counter() - started

    def score(
        self, pair: Pair, method: str, scale: int, image: PIL.Image.Image, evaluations: int,
        seconds: float, pivot_strength: float | None = None,
    ) -> Sample:
        if pair.index < self.args.grid_columns:
            self.images[(method, scale, pair.index)] = image
        return Sample(
            method=method,
            scale=scale,
            pair=pair.index,
            correct=composition_correct(image, parse_caption(pair.caption)),
            edge_width=mean_edge_width(image),
            truth_edge_width=truth_edge_width(pair, image.width),
            unet_evaluations=evaluations,
            seconds=seconds,
            pivot_strength=pivot_strength,
        )


def summarise(samples: list[Sample]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(s.scale, s.method) for s in samples},
                  key=lambda k: (k[0], method_rank(k[1])))
    for scale, method in keys:
        group = [s for s in samples if (s.scale, s.method) == (scale, method)]
        widths = [s.edge_width for s in group if not math.isnan(s.edge_width)]
        ratios = [s.edge_width / s.truth_edge_width for s in group
                  if not math.isnan(s.edge_width) and s.truth_edge_width > 0]
        rows.append({
            "scale": scale,
            "method": method,
            "samples": len(group),
            "accuracy": sum(s.correct for s in group) / len(group),
            "edge_width_px": statistics.fmean(widths) if widths else math.nan,
            "edge_width_vs_truth": statistics.fmean(ratios) if ratios else math.nan,
            "unet_evaluations": statistics.fmean(s.unet_evaluations for s in group),
            "seconds_per_image": statistics.fmean(s.seconds for s in group),
        })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (f"{'scale':>5}  {'method':<24} {'n':>4} {'accuracy':>9} {'edge px':>8} "
              f"{'vs truth':>9} {'UNet evals':>10} {'s/image':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['scale']:>4}x  {r['method']:<24} {r['samples']:>4} {r['accuracy']:>9.1%} "
              f"{r['edge_width_px']:>8.2f} {r['edge_width_vs_truth']:>9.2f} "
              f"{r['unet_evaluations']:>10.0f} {r['seconds_per_image']:>8.2f}")


# -- pictures --------------------------------------------------------------------------------


def save_grid(images: dict[tuple[str, int, int], PIL.Image.Image], pairs: list[Pair],
              path: Path, tile: int = 160, label_width: int = 150) -> None:
    """Rows (method, scale), columns pairs; every tile resized nearest so pixels stay visible."""
    rows = sorted({(m, s) for m, s, _ in images}, key=lambda k: (k[1], method_rank(k[0])))
    columns = sorted({i for _, _, i in images})
    grid = PIL.Image.new("RGB", (label_width + tile * len(columns), tile * len(rows) + 20), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for c, index in enumerate(columns):
        draw.text((label_width + c * tile + 4, 4), pairs[index].caption[:28], fill="black")
    for r, (method, scale) in enumerate(rows):
        draw.text((4, 20 + r * tile + tile // 2), f"{scale}x {method}", fill="black")
        for c, index in enumerate(columns):
            image = images[(method, scale, index)]
            grid.paste(
                image.resize((tile, tile), PIL.Image.Resampling.NEAREST),
                (label_width + c * tile, 20 + r * tile),
            )
    grid.save(path)


def save_plot(rows: list[dict[str, Any]], path: Path, width: int = 360, height: int = 260) -> None:
    """Accuracy and edge width (vs truth) against scale, one line per method (PIL only)."""
    colours = {"native": "black", "bicubic": "gray", "self_cascade": "blue",
               "self_cascade_tuned": "green", "direct": "red"}
    ratios = [r["edge_width_vs_truth"] for r in rows if not math.isnan(r["edge_width_vs_truth"])]
    panels = [("accuracy", "composition accuracy", 1.0),
              ("edge_width_vs_truth", "edge width / truth", max([2.0, *ratios]))]
    scales = sorted({r["scale"] for r in rows})
    plot = PIL.Image.new("RGB", (width * len(panels), height + 70), "white")
    draw = PIL.ImageDraw.Draw(plot)
    for p, (key, title, top) in enumerate(panels):
        x0, y0, x1, y1 = p * width + 40, 20, (p + 1) * width - 20, height - 20
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, 4), f"{title} (0..{top:.1f}) vs scale", fill="black")

        def at(scale: int, value: float, x0: int = x0, y0: int = y0, x1: int = x1,
               y1: int = y1, top: float = top) -> tuple[float, float]:
            slot = scales.index(scale) / max(len(scales) - 1, 1)
            return x0 + slot * (x1 - x0), y1 - min(value / top, 1.0) * (y1 - y0)

        for scale in scales:
            draw.text((at(scale, 0)[0] - 6, y1 + 4), f"{scale}x", fill="black")
        for method in sorted({r["method"] for r in rows}, key=method_rank):
            colour = colours[method.split("@")[0]]
            points = [at(r["scale"], r[key]) for r in rows
                      if r["method"] in (method, "native") and not math.isnan(r[key])]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
                for x, y in points:
                    draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    for i, (method, colour) in enumerate(colours.items()):
        draw.text((40 + i * 140, height + 20), method, fill=colour)
    plot.save(path)


# -- entry point -----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(demo_card.MODEL_DIR))
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--upsamplers", nargs="+",
                        help="tuned upsampler checkpoint (selfcascade tune), or one per stage "
                        "size")
    parser.add_argument("--scales", type=int, nargs="*", default=[2, 4],
                        help="scales above native (none: the native row only)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--pivot-strength", type=float, nargs="+",
                        default=[demo_card.PIVOT_STRENGTH, PAPER_PIVOT_STRENGTH],
                        help="one or more K/T for the cascades (default: the demo model's own "
                        "and the paper's)")
    parser.add_argument("--grid-columns", type=int, default=8)
    parser.add_argument("--validation", action="store_true",
                        help="pairs from the validation stream (for choosing settings)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (more only help on an idle machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "shapesbench",
                        help="prefix of the .json, _grid.png and _plot.png written")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device=args.device)
    engine = SelfCascadePipeline(pipe)
    tuned = None
    if args.upsamplers:
        from selfcascade.tuned import load_tuned_hook

        tuned = load_tuned_hook(args.upsamplers, pipe)
    runner = Runner(engine, args, tuned)
    stream = VALIDATION_SEED if args.validation else BENCH_SEED
    pairs = benchmark_pairs(args.pairs, stream)
    samples: list[Sample] = []
    started = time.perf_counter()
    for done, pair in enumerate(pairs, start=1):
        samples.extend(runner.run_pair(pair))
        print(f"\r{done}/{len(pairs)} pairs, {time.perf_counter() - started:.0f}s", end="",
              flush=True)
    print()
    rows = summarise(samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": args.model,
        "upsamplers": args.upsamplers,
        "device": str(pipe.device),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "settings": {"pairs": args.pairs, "scales": args.scales, "steps": args.steps,
                     "guidance": args.guidance, "pivot_strength": args.pivot_strength,
                     "bench_seed": stream, "validation": args.validation,
                     "native_size": runner.native},
        "rows": rows,
        "samples": [asdict(s) | {"caption": pairs[s.pair].caption} for s in samples],
    }
    json_path = args.out.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    save_grid(runner.images, pairs, args.out.with_name(args.out.name + "_grid.png"))
    save_plot(rows, args.out.with_name(args.out.name + "_plot.png"))
    print_table(rows)
    print(f"\nwrote {json_path} and its _grid.png / _plot.png")


if __name__ == "__main__":
    main()
