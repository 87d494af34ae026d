"""`selfcascade tune`: train the feature upsamplers of the tuned self-cascade.

Registered by `selfcascade.cli` through `add_tune_parser`. Writes into `--out`:
`upsamplers.safetensors` (what `generate --upsamplers` loads), `training_state.pt` (what
`--resume` continues from) and `loss.jsonl` (one {"step", "loss", "elapsed_s"} line per step).
An `--out` that already holds a run needs `--resume` (continue it) or `--overwrite` (start again).
Ctrl-C saves the training state at the last completed step, for `--resume` to continue from.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfcascade.request import PAPER_PIVOT_STRENGTH
from selfcascade.weight_variants import parse_variant

if TYPE_CHECKING:  # it imports torch, which only running the command pays for
    from selfcascade.tuning import TuneConfig, TuneResult


def add_tune_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "tune",
        help="train the tuned self-cascade's feature upsamplers (base model frozen)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="diffusers folder or hub id of the base model")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="folder of images (image models) or of clips: frame folders or video files (video "
        "models); optional same-name .txt captions",
    )
    p.add_argument(
        "--clip-frames",
        type=int,
        default=None,
        help="video models: frames per training window (default 8)",
    )
    p.add_argument("--scale", type=int, default=2, help="side ratio HR / LR (default 2)")
    p.add_argument("--steps", type=int, default=4000, help="total steps (paper: 4k-10k)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from --out's training state")
    p.add_argument(
        "--overwrite", action="store_true", help="start again at step 0, replacing --out's run"
    )
    p.add_argument("--save-every", type=int, default=500, help="checkpoint interval in steps")
    p.add_argument("--crop-size", type=int, default=None, help="default: native size x scale")
    p.add_argument(
        "--pivot-strength",
        type=float,
        default=PAPER_PIVOT_STRENGTH,
        help=f"K / T: timesteps are drawn from 1..K (default: the paper's {PAPER_PIVOT_STRENGTH})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mixed-precision", action="store_true", help="float32 on CUDA too")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="less memory, ~30%% slower steps"
    )
    p.add_argument("--device", default="auto")
    # float32 weights + autocast, as diffusers' own training scripts do: the SDXL VAE overflows
    # in float16, and float16 base weights would gain little over autocast.
    p.add_argument("--dtype", default="float32", help="base model weight dtype (float32)")
    p.add_argument(
        "--variant", type=parse_variant,
        help="load weight files saved under this variant name, e.g. fp16 for SDXL's "
        "*.fp16.safetensors (half the download)",
    )
    p.set_defaults(handler=run_tune, loads_models=True, extra="worker")
    return p


def run_tune(args: argparse.Namespace) -> int:
    from selfcascade.loading import load_pipeline
    from selfcascade.tuning import TuneConfig, check_paths

    config = TuneConfig(
        data_dir=args.data,
        out_dir=args.out,
        scale=args.scale,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        pivot_strength=args.pivot_strength,
        crop_size=args.crop_size,
        save_every=args.save_every,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        mixed_precision=not args.no_mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        clip_frames=args.clip_frames,
    )
    # SelfCascadeError (bad data, bad checkpoint, bad model) is reported by the cli's main.
    # Bad arguments and paths fail before the model loads.
    config.validate()
    check_paths(config)
    pipe = load_pipeline(
        args.model, dtype=args.dtype, device=args.device, variant=args.variant
    )
    # Ctrl-C raises TuneInterrupted, whose line cli.main prints.
    result = _tune_with_progress_bar(pipe, config)
    print(f"wrote {result.checkpoint} after step {result.steps} (started at {result.start_step})")
    return 0


def _tune_with_progress_bar(pipe: Any, config: TuneConfig) -> TuneResult:
    from tqdm import tqdm

    from selfcascade.tuning import StepReport, tune

    # Drawn at the first step, not before: what tune refuses in its set-up (the data, a
    # training state) then prints one error line, with no stray empty bar above it.
    bar: tqdm | None = None

    def on_step(report: StepReport) -> None:
        nonlocal bar
        if bar is None:  # a resumed run's bar starts at the saved step
            bar = tqdm(total=report.steps, initial=report.step - 1, unit="step", dynamic_ncols=True)
        bar.set_postfix(loss=f"{report.loss:.4f}")
        bar.update(1)

    try:
        return tune(pipe, config, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()
