"""`selfcascade` command line: generate images, write a tiny test model, tune upsamplers.

Errors a user can cause (missing model, bad sizes, bad values, an install without the
command's extra) print one line and exit 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from selfcascade.demo import card as demo_card
from selfcascade.errors import InvalidRequest, SelfCascadeError
from selfcascade.exit_codes import EXIT_INTERRUPTED, EXIT_USAGE
from selfcascade.folders import replacing, why_unwritable
from selfcascade.library_logs import quiet_libraries
from selfcascade.output_formats import DEFAULT_FPS, GIF_MAX_FPS, MAX_FPS, size_problem
from selfcascade.request import (
    LR_FEATURE_MODES,
    METHODS,
    PAPER_PIVOT_STRENGTH,
    SCHEDULERS,
    UPSAMPLE_MODES,
    GenerationRequest,
    pixel_budget_problem,
)
from selfcascade.weight_variants import parse_variant

if TYPE_CHECKING:  # it imports torch, which only the commands that load models pay for
    from selfcascade.tuned import TunedStageHook

log = logging.getLogger("selfcascade")

# The largest size this project targets (SDXL at 4096^2): more is hours of compute, and a typo
# (100000 for 10000) would otherwise plan a dozen stages and run on without a word.
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MODEL = str(demo_card.MODEL_DIR)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfcascade",
        description="Self-cascade diffusion: images above a model's training resolution.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_tiny_model(commands)
    _add_optional_commands(commands)
    return parser


def _add_generate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("generate", help="generate one image (or one clip, on a video model)")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"diffusers folder or hub id (default: the shipped demo model, {DEFAULT_MODEL})",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--seed", type=int, help="random when omitted; always printed")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument(
        "--pivot-strength",
        type=float,
        help=f"K/T (default: {demo_card.PIVOT_STRENGTH} for the shipped demo model, chosen on "
        f"ShapesBench's validation stream; the paper's {PAPER_PIVOT_STRENGTH} for any other)",
    )
    p.add_argument("--method", choices=METHODS, default="self_cascade")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    p.add_argument("--upsample-mode", choices=UPSAMPLE_MODES, default="bilinear")
    p.add_argument(
        "--upsamplers",
        type=Path,
        nargs="+",
        help="tuned feature-upsampler checkpoint (or the folder `selfcascade tune --out` wrote), "
        "or several tuned at different stage sizes (each stage uses the one tuned nearest its "
        "size; two of one size are refused)",
    )
    p.add_argument(
        "--lr-features",
        choices=LR_FEATURE_MODES,
        help="tuned runs: recompute the pivot's features every step or once a stage "
        f"(default: {GenerationRequest.lr_features})",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse sizes of more pixels than this (default: {DEFAULT_MAX_PIXELS}, 4096x4096; "
        "0: no cap)",
    )
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--variant", type=parse_variant,
        help="load weight files saved under this variant name, e.g. fp16 for SDXL's "
        "*.fp16.safetensors (half the download)",
    )
    p.add_argument(
        "--num-frames",
        "--frames",  # this command's first spelling; the API and the client say num_frames
        dest="num_frames",
        type=int,
        help="video models: frames of the clip (default: the model's 16)",
    )
    p.add_argument(
        "--fps",
        type=int,  # None unless typed: an image model refuses it then, as it does --num-frames
        help=f"video models: frames per second of the clip (default: {DEFAULT_FPS})",
    )
    p.add_argument(
        "--out",
        default="out.png",  # a string: Path("x.png/") would drop the slash that says "folder"
        help="image file; for a video model .mp4, .webm, or an animated .gif, .png or .webp",
    )
    p.set_defaults(handler=_generate, loads_models=True, extra="worker", flags=_flags(p))


def _flags(p: argparse.ArgumentParser) -> dict[str, list[str]]:
    """Each option's spellings by the field it sets: the library names fields (pivot_strength),
    a command's errors name the flags instead (_as_typed)."""
    return {a.dest: list(a.option_strings) for a in p._actions if a.option_strings}


def _add_tiny_model(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "tiny-model", help="write a tiny random SD pipeline folder (for tests and smoke runs)"
    )
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_tiny_model, loads_models=True, extra="worker")


def _add_optional_commands(commands: argparse._SubParsersAction) -> None:
    """Commands that live in their own modules register themselves here (neither imports torch
    at the top, so building the parser stays fast)."""
    from selfcascade.client_cli import add_client_parser
    from selfcascade.tune_cli import add_tune_parser

    tune = add_tune_parser(commands)
    tune.set_defaults(flags=_flags(tune))
    add_client_parser(commands)


def _pivot_strength(args: argparse.Namespace) -> float:
    if args.pivot_strength is not None:
        return float(args.pivot_strength)
    # The demo model however it is named (relative or absolute); a hub id never resolves to it.
    if Path(args.model).resolve() == demo_card.MODEL_DIR.resolve():
        return demo_card.PIVOT_STRENGTH
    return PAPER_PIVOT_STRENGTH


def _generate(args: argparse.Namespace) -> int:
    import secrets

    from tqdm import tqdm

    from selfcascade.cascade_engine import PIPELINE_SIZE_MULTIPLE
    from selfcascade.engines import engine_for
    from selfcascade.loading import load_pipeline
    from selfcascade.pipeline import GenerationResult
    from selfcascade.progress import Progress
    from selfcascade.video_pipeline import VideoResult

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=seed,
        pivot_strength=_pivot_strength(args),
        upsample_mode=args.upsample_mode,
        scheduler=args.scheduler,
        method=args.method,
        lr_features=args.lr_features or GenerationRequest.lr_features,
        num_frames=args.num_frames,
    )
    out = _out_path(args.out)
    # Model-independent checks first: a bad value should not wait for a model to load.
    request.validate(PIPELINE_SIZE_MULTIPLE)
    _check_pixels(request, args.max_pixels)
    _check_fps(args.fps, out)
    _check_tuning_flags(args, request)
    _check_dtype(args.dtype)
    _check_out(out, video=None)
    problem = size_problem(_out_format(out), request.width, request.height)
    if problem:  # the encoder would refuse it, after the whole cascade
        raise InvalidRequest(*problem)
    _check_writable(out.parent)
    pipe = load_pipeline(
        args.model, dtype=args.dtype, device=args.device, variant=args.variant
    )
    engine = engine_for(pipe)
    engine.validate(request)
    if args.fps is not None and not engine.produces_video:  # as the engine refuses num_frames
        raise InvalidRequest("fps", "this model makes images, not videos")
    _check_out(out, video=engine.produces_video)
    tuned = _tuned_hook(args, pipe)
    hooks = [tuned] if tuned else []

    # {l_bar} would show the description a second time; the ‰ counts are no use to read.
    bar_format = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
    with tqdm(total=1000, unit="‰", bar_format=bar_format) as bar:

        def on_progress(p: Progress) -> None:
            bar.set_description_str(f"stage {p.stage}/{p.stages} step {p.step}/{p.steps}")
            bar.update(round(p.fraction * 1000) - bar.n)

        result = engine.generate(request, on_progress=on_progress, stage_hooks=hooks)
    if isinstance(result, VideoResult):
        frames = result.frames
    else:
        assert isinstance(result, GenerationResult)
        frames = result.images
    fps = DEFAULT_FPS if args.fps is None else args.fps
    _write(out, frames, fps if isinstance(result, VideoResult) else None)
    kind = f"{len(frames)} frames of " if isinstance(result, VideoResult) else ""
    print(f"wrote {out} ({kind}{frames[0].width}x{frames[0].height})")
    stages = " -> ".join(str(s) for s in result.stages)
    timings = ", ".join(f"{s:.2f}s" for s in result.stage_seconds)
    print(
        f"seed {seed}; {_method_summary(request, tuned)}; stages {stages}; "
        f"{result.unet_evaluations} UNet evaluations; {timings}"
    )
    return 0


def _out_path(text: str) -> Path:
    """--out as typed, refused when it ends as a folder's name does ("x.png/", "x/."): Path
    would drop that end and the image would land in the file x.png, or x."""
    if os.path.basename(text) in ("", ".", ".."):
        raise InvalidRequest("out", f"{text} names a folder; give a file name such as out.png")
    return Path(text)


def _check_pixels(request: GenerationRequest, max_pixels: int) -> None:
    """The API's pixel budget, worded as it is, with how to lift it: without one, a slip of a
    digit plans a dozen stages and runs for hours."""
    if max_pixels < 0:
        raise InvalidRequest("max_pixels", f"must be 0 (no cap) or more, got {max_pixels}")
    over = pixel_budget_problem(request.width, request.height, max_pixels) if max_pixels else None
    if over:
        param, message = over
        raise InvalidRequest(param, f"{message}; raise it with --max-pixels (0 lifts the cap)")


def _check_fps(fps: int | None, out: Path) -> None:
    if fps is None:  # not typed: a video model's clip gets DEFAULT_FPS
        return
    if not 1 <= fps <= MAX_FPS:
        raise InvalidRequest("fps", f"must be between 1 and {MAX_FPS}, got {fps}")
    if fps > GIF_MAX_FPS and out.suffix.lower() == ".gif":
        # GIF delays are hundredths of a second and players slow 10 ms ones to 100 ms.
        raise InvalidRequest("fps", f"a .gif plays at most {GIF_MAX_FPS} fps, got {fps}")


def _check_tuning_flags(args: argparse.Namespace, request: GenerationRequest) -> None:
    """Tuning flags that would be ignored: refused, so nobody thinks they ran tuned."""
    if args.upsamplers and request.method == "direct":  # the API refuses tuned direct runs too
        raise InvalidRequest(
            "upsamplers", "tuned upsamplers work inside self-cascade stages, which a direct run "
            "has none of; drop --upsamplers or use --method self_cascade"
        )
    if args.lr_features is not None and not args.upsamplers:  # None: not typed, the default
        raise InvalidRequest("lr_features", "applies to tuned runs; add --upsamplers")


def _check_dtype(dtype: str) -> None:
    """Checked here, not at loading, so that the error names --dtype (and comes before the
    model loads)."""
    from selfcascade.loading import dtype_problem

    problem = dtype_problem(dtype)
    if problem:
        raise InvalidRequest("dtype", problem)


def _method_summary(request: GenerationRequest, tuned: TunedStageHook | None) -> str:
    """What ran: a direct run has no pivot to state; a self-cascade run is tuned or not."""
    if request.method == "direct":
        return "direct"
    if tuned is None:
        return f"tuning-free; pivot strength {request.pivot_strength}"
    sets = len(tuned.sets)
    plural = "s" if sets > 1 else ""
    return f"tuned ({sets} upsampler set{plural}); pivot strength {request.pivot_strength}"


# Pillow formats that hold every frame of a clip in one file.
ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")
# Clip files the service's encoder writes (selfcascade.video_encoding): by --out's extension.
ENCODED_CLIPS = {".mp4": "mp4", ".webm": "webm", ".gif": "gif"}
IMAGE_FILES = ".png, .webp or .jpg"
CLIP_FILES = ".mp4, .webm, or an animated .gif, .png or .webp"


def _check_out(out: Path, video: bool | None) -> None:
    """Refuse an --out that cannot be written before any compute, not after it. `video` is
    None before the model has loaded, when an image and a clip are both still possible."""
    from PIL import Image

    if out.is_dir():
        raise InvalidRequest("out", f"{out} is a directory; give a file name such as out.png")
    suffix = out.suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    image_ok = fmt in Image.SAVE
    clip_ok = suffix in ENCODED_CLIPS or fmt in ANIMATED_FORMATS
    if video is None and not (image_ok or clip_ok):
        raise InvalidRequest(
            "out", f"cannot write the extension {out.suffix or '(none)'!r}; use {IMAGE_FILES} "
            f"(a video model's clip: {CLIP_FILES})"
        )
    if video is False and not image_ok:
        if clip_ok:
            raise InvalidRequest("out", f"this model makes images, not clips; use {IMAGE_FILES}")
        raise InvalidRequest(
            "out", f"cannot write images with the extension {out.suffix or '(none)'!r}; "
            f"use {IMAGE_FILES}"
        )
    if video and not clip_ok:
        raise InvalidRequest("out", f"a clip needs {CLIP_FILES}, not {out.name}")


def _out_format(out: Path) -> str:
    """The format --out's extension asks for, by the names selfcascade.output_formats uses."""
    from PIL import Image

    suffix = out.suffix.lower()
    return ENCODED_CLIPS.get(suffix) or Image.registered_extensions().get(suffix, "").lower()


def _write(out: Path, frames: list, fps: int | None) -> None:
    """One image, or (given its fps) a clip: .mp4/.webm/.gif through the service's encoder (a gif
    with its exact frame delays), an animated .png/.webp through Pillow. Written beside `out`
    and then moved there (`replacing`): a failed write leaves whatever file was there."""
    from PIL import Image

    encoded = ENCODED_CLIPS.get(out.suffix.lower())
    clip = _encode(frames, encoded, fps) if fps is not None and encoded else None
    # Named, since Pillow would read it from the file's name, and the partial file's is .part.
    fmt = Image.registered_extensions().get(out.suffix.lower())
    try:
        with replacing(out) as file:
            if clip is not None:
                file.write(clip)
            elif fps is None:
                frames[0].save(
                    file, format=fmt, save_all=len(frames) > 1, append_images=frames[1:]
                )
            else:
                frames[0].save(
                    file, format=fmt, save_all=True, append_images=frames[1:],
                    duration=round(1000 / fps), loop=0,
                )
    except OSError as exc:  # the disk filled up, or the folder went away meanwhile
        raise InvalidRequest("out", f"cannot write {out}: {exc}") from None


def _encode(frames: list, fmt: str, fps: int) -> bytes:
    from selfcascade.video_encoding import VideoEncodingError, encode_video

    try:
        return encode_video(frames, fmt, fps)
    except VideoEncodingError as exc:  # frames it cannot encode (odd sizes for mp4)
        raise InvalidRequest("out", str(exc)) from None


def _check_writable(folder: Path) -> None:
    """Refuse a destination folder that cannot be written, before any compute."""
    problem = why_unwritable(folder)
    if problem:
        raise InvalidRequest("out", f"cannot write into {folder}: {problem}")


def _tuned_hook(args: argparse.Namespace, pipe: object) -> TunedStageHook | None:
    if not args.upsamplers:
        return None
    from selfcascade.tuned import load_tuned_hook

    return load_tuned_hook(args.upsamplers, pipe)


def _tiny_model(args: argparse.Namespace) -> int:
    from selfcascade.tiny_models import save_tiny_sd

    problem = why_unwritable(args.path)
    if problem:
        raise SelfCascadeError(f"cannot write a model folder at {args.path}: {problem}")
    try:
        path = save_tiny_sd(args.path, seed=args.seed)
    except OSError as exc:  # the disk filled up meanwhile
        raise SelfCascadeError(
            f"cannot write a model folder at {args.path}: {exc.strerror or exc}"
        ) from None
    print(f"wrote a tiny random Stable Diffusion pipeline to {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt as stop:
        # Ctrl-C: the user knows why it stopped, and a traceback of wherever torch was would
        # bury the one line that matters. Nothing more is claimed than the interrupt says (tune's
        # says where its state was saved; a plain one says nothing).
        print(f"selfcascade: {str(stop) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Only commands that load models pay for importing diffusers (the client never needs it).
    if getattr(args, "loads_models", False) and not args.verbose:
        quiet_libraries()
    handler: Handler = args.handler
    try:
        return handler(args)
    except SelfCascadeError as exc:
        print(f"selfcascade: error: {_as_typed(exc, args, argv)}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        # The bare `pip install selfcascade` is the job contract only: each command's third-party
        # imports come with an extra (`extra` in its parser's defaults), named here to install.
        if exc.name is None or exc.name.partition(".")[0] == "selfcascade":
            raise  # one of our own modules missing is a broken install or a bug
        print(
            f"selfcascade: error: `selfcascade {args.command}` needs {exc.name}, which is not "
            f"installed: pip install 'selfcascade[{args.extra}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE


def _as_typed(exc: SelfCascadeError, args: argparse.Namespace, argv: list[str]) -> str:
    """An `InvalidRequest` as the user typed it: `--pivot-strength: ...` for `pivot_strength`,
    `--frames: ...` where that alias was used. Only commands whose defaults carry `flags`."""
    flags: dict[str, list[str]] = getattr(args, "flags", {})
    if not isinstance(exc, InvalidRequest) or exc.param not in flags:
        return str(exc)

    def typed(dest: str) -> str:
        options = flags[dest]
        used = (o for o in options if any(a == o or a.startswith(f"{o}=") for a in argv))
        return next(used, options[0])  # the first spelling, when abbreviated

    # Only the param: a field's name inside the text may as well be a path or a value typed.
    return f"{typed(exc.param)}: {exc.message}"


if __name__ == "__main__":
    sys.exit(main())
