"""A strip of one prompt's samples from the demo model, side by side: what the README shows.

    python -m selfcascade.demo.samples --prompt "a red circle and a blue square" --scale 2 \
        --seeds 1 2 3 4 5 6 --out docs/red-circle-blue-square-2x.png

Tuned self-cascade with the shipped upsamplers and the demo's own pivot strength, sampled as
ShapesBench samples (DDIM 30 steps, guidance 5), so the strip is what a user of the defaults
gets, not a picked example: the seeds are given on the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import PIL.Image

from selfcascade.demo import card
from selfcascade.library_logs import quiet_libraries
from selfcascade.loading import load_pipeline
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.request import GenerationRequest
from selfcascade.tuned import load_tuned_hook

GAP_PX = 4


def sample_strip(
    model: str, upsamplers: list[Path], prompt: str, scale: int, seeds: list[int],
    steps: int, guidance: float,
) -> PIL.Image.Image:
    pipe = load_pipeline(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    engine = SelfCascadePipeline(pipe)
    hooks = [load_tuned_hook(upsamplers, pipe)] if upsamplers else []
    size = engine.native_size.width * scale
    images = [
        engine.generate(
            GenerationRequest(
                prompt=prompt, width=size, height=size, steps=steps, guidance_scale=guidance,
                seed=seed, pivot_strength=card.PIVOT_STRENGTH,
            ),
            stage_hooks=hooks,
        ).images[0]
        for seed in seeds
    ]
    strip = PIL.Image.new("RGB", (len(images) * (size + GAP_PX) - GAP_PX, size), "white")
    for i, image in enumerate(images):
        strip.paste(image, (i * (size + GAP_PX), 0))
    return strip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(card.MODEL_DIR))
    parser.add_argument("--upsamplers", type=Path, nargs="*", default=list(card.UPSAMPLERS),
                        help="tuned upsampler checkpoints, one per stage size (none given: "
                        "tuning-free; default: the demo model's)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.upsamplers if not path.is_file()]
    if missing:  # were dropped silently, and the strip came out tuning-free
        parser.error(
            f"--upsamplers: no such file: {', '.join(missing)} (paths are relative to where you "
            "run this: the repository root for the defaults; `--upsamplers` alone: tuning-free)"
        )
    quiet_libraries()
    strip = sample_strip(
        args.model, args.upsamplers, args.prompt, args.scale, args.seeds, args.steps,
        args.guidance,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out)
    print(f"wrote {args.out}: {len(args.seeds)} samples of {args.prompt!r} at {args.scale}x")


if __name__ == "__main__":
    main()
