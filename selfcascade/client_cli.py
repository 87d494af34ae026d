"""`selfcascade client ...`: generate through a running service, read a job, cancel one.

Registered by `selfcascade.cli`; imports only the standard library and the choice lists of
`selfcascade.request` at the top so building the parser stays cheap, and httpx/tqdm (the
`client` extra) when a command runs (no torch anywhere). Exit codes: 0 done, 1 the job or the
server said no (one line on stderr), 2 bad arguments or httpx/tqdm not installed, 130
interrupted (job canceled), 141 stdout closed early (`... | head`: output stops quietly).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfcascade.exit_codes import EXIT_BROKEN_PIPE, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from selfcascade.request import LR_FEATURE_MODES, METHODS, SCHEDULERS, UPSAMPLE_MODES

if TYPE_CHECKING:
    from selfcascade.client import ClientError, ServiceClient

# The API's own lists (contract.jobs OutputFormat, Priority, WebhookEvent), spelled out rather
# than imported: contract.jobs imports pydantic, which building this parser should not pay for.
OUTPUT_FORMATS = ("png", "webp", "jpeg", "mp4", "webm", "gif")
PRIORITIES = ("interactive", "batch")
WEBHOOK_EVENTS = ("start", "progress", "completed")

Handler = Callable[[argparse.Namespace], int]


def add_client_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = commands.add_parser(
        "client",
        help="use a running selfcascade service (no torch needed)",
        description="Talk to a selfcascade API. The API key comes from SELFCASCADE_API_KEY.",
    )
    p.set_defaults(extra="client")
    actions = p.add_subparsers(dest="client_command", required=True)

    g = actions.add_parser("generate", help="submit a generation, optionally wait and download")
    _add_server(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt")
    g.add_argument("--width", type=int, help="default: the model's native width")
    g.add_argument("--height", type=int, help="default: the model's native height")
    g.add_argument("--seed", type=int, help="random when omitted; always printed")
    g.add_argument("--steps", type=int, help="default: 50")
    g.add_argument("--guidance-scale", type=_finite_float, help="default: 7.5")
    g.add_argument(
        "--pivot-strength",
        type=_finite_float,
        help="K/T (default: the model's default_pivot_strength in GET /v1/models; the paper's "
        "0.7 for SD)",
    )
    g.add_argument("--method", choices=METHODS)
    g.add_argument("--scheduler", choices=SCHEDULERS, help="default: ddim")
    g.add_argument("--upsample-mode", choices=UPSAMPLE_MODES, help="default: bilinear")
    g.add_argument("--tuned", choices=("auto", "true", "false"))
    g.add_argument(
        "--lr-features",
        choices=LR_FEATURE_MODES,
        help="tuned mode: the pivot's features recomputed every step (per_step, the default) "
        "or once per stage",
    )
    g.add_argument("--model", help="default: the server's first model")
    g.add_argument("--num-frames", type=int, help="video models: frames of the clip")
    g.add_argument("--fps", type=int, help="video models: frames per second")
    g.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        help="default: --out's extension, else png for image models and mp4 for video models",
    )
    g.add_argument(
        "--metadata", action="append", type=_metadata_pair, metavar="KEY=VALUE", default=[],
        help="your own string kept with the job and echoed in its views and webhooks "
        "(repeatable)",
    )
    g.add_argument(
        "--priority",
        choices=PRIORITIES,
        help="workers take a model's interactive jobs before its batch ones (default: "
        "interactive)",
    )
    g.add_argument(
        "--webhook", metavar="URL",
        help="https URL the server posts the job's events to (a server with a webhook secret)",
    )
    g.add_argument(
        "--webhook-events-filter", nargs="+", choices=WEBHOOK_EVENTS, metavar="EVENT",
        help=f"which events --webhook gets, of {', '.join(WEBHOOK_EVENTS)} (default: completed)",
    )
    g.add_argument("--wait", action="store_true", help="follow progress until the job ends")
    g.add_argument(
        "--out", type=Path,
        help="write the image (or clip, its poster beside it) here (implies --wait)",
    )
    g.set_defaults(handler=_quiet_on_broken_pipe(_generate))

    s = actions.add_parser("status", help="show one generation")
    _add_server(s)
    s.add_argument("job_id")
    s.add_argument("--json", action="store_true", help="print the raw JSON view")
    s.set_defaults(handler=_quiet_on_broken_pipe(_status))

    c = actions.add_parser("cancel", help="cancel a queued or running generation")
    _add_server(c)
    c.add_argument("job_id")
    c.set_defaults(handler=_quiet_on_broken_pipe(_cancel))
    return p


def _add_server(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server", help="API base URL (default: $SELFCASCADE_SERVER or http://127.0.0.1:8000)"
    )
    p.add_argument(
        "--retry-budget", type=float, metavar="SECONDS",
        help="how long to keep retrying an unreachable or overloaded server (429/503) before "
        "giving up; 0 fails at once (default: 60)",
    )


def _client(args: argparse.Namespace) -> ServiceClient:
    # Read the environment here, when a command runs, never at import.
    from selfcascade.client import (
        RETRY_BUDGET_S,
        ServiceClient,
        api_key_from_env,
        server_from_env,
    )

    budget = RETRY_BUDGET_S if args.retry_budget is None else args.retry_budget
    return ServiceClient(
        args.server or server_from_env(), api_key=api_key_from_env(), retry_budget_s=budget
    )


def _quiet_on_broken_pipe(handler: Handler) -> Handler:
    """`handler`, stopping quietly with EXIT_BROKEN_PIPE when stdout's reader has gone (`| head`)
    instead of a BrokenPipeError traceback. stdout then points at /dev/null, so the flush at
    interpreter exit has nowhere to fail (Python docs, "Note on SIGPIPE")."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            code = handler(args)
            sys.stdout.flush()  # output piped is buffered: a reader gone shows here, not at exit
            return code
        except BrokenPipeError:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # a stdout without a descriptor (replaced in-process)
                pass
            return EXIT_BROKEN_PIPE

    return run


def _finite_float(text: str) -> float:
    """A float JSON can carry: `nan` or `inf` could not even be sent (JSON has neither)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _metadata_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _request_body(args: argparse.Namespace) -> dict[str, Any]:
    optional = {
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "pivot_strength": args.pivot_strength,
        "method": args.method,
        "scheduler": args.scheduler,
        "upsample_mode": args.upsample_mode,
        "lr_features": args.lr_features,
        "model": args.model,
        "num_frames": args.num_frames,
        "fps": args.fps,
        "output_format": _output_format(args),
        "tuned": {"true": True, "false": False, "auto": "auto"}.get(args.tuned or ""),
        "metadata": dict(args.metadata) or None,
        "priority": args.priority,
        "webhook": args.webhook,
        "webhook_events_filter": args.webhook_events_filter,
    }
    return {"prompt": args.prompt, **{k: v for k, v in optional.items() if v is not None}}


def _output_format(args: argparse.Namespace) -> str | None:
    """--output-format, else the format --out's extension names: the file then holds what its
    name says (a clip asked for as out.png would otherwise be mp4 bytes in a .png)."""
    suffix = args.out.suffix.lower().lstrip(".") if args.out else ""
    if not suffix:
        return args.output_format  # a bare name holds whatever format the job makes
    named = {"jpg": "jpeg"}.get(suffix, suffix)
    if named not in OUTPUT_FORMATS:  # refused now: it would be png bytes under, say, a .bmp name
        formats = ", ".join(f".{f}" for f in OUTPUT_FORMATS)
        raise ValueError(
            f"--out {args.out} names a .{suffix} file, which the service cannot write "
            f"(it writes {formats}; .jpg for jpeg)"
        )
    if args.output_format is not None and args.output_format != named:
        raise ValueError(
            f"--out {args.out} names a .{suffix} file, but --output-format is {args.output_format}"
        )
    return named


def _generate(args: argparse.Namespace) -> int:
    from selfcascade.client import ClientError

    try:
        body = _request_body(args)
    except ValueError as exc:
        print(f"selfcascade client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    job_id: str | None = None
    try:
        with _client(args) as client:
            try:
                if args.wait or args.out:
                    _check_read_scope(client)
                job = client.create(body)
                job_id = job["id"]
                params = job["params"]
                print(
                    f"generation {job_id} {job['status']}: {params['width']}x{params['height']}, "
                    f"seed {params['seed']}, {params['steps']} steps, {params['method']}"
                )
                if not (args.wait or args.out):
                    return 0
                return _follow_and_download(client, job_id, args.out)
            except KeyboardInterrupt:  # while creating, following or downloading
                _cancel_on_interrupt(client, job_id)
                return EXIT_INTERRUPTED
    except ClientError as exc:
        print(f"selfcascade client: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _check_read_scope(client: ServiceClient) -> None:
    """--wait and --out read the job back (its events, its view, its files), which needs the
    key's `read` scope, as canceling it does. A key without it is refused here, before a job
    exists that it could neither follow nor cancel: GET /v1/models needs `read` too."""
    from selfcascade.client import ClientError

    try:
        client.models()
    except ClientError as exc:
        if exc.status != 403:
            raise
        raise ClientError(
            f"{exc}, which --wait and --out need to follow the job; nothing was submitted: use "
            "a key with both generate and read, or leave out --wait and --out",
            exc.status,
        ) from exc


def _refused_to_follow(client: ServiceClient, job_id: str, refusal: ClientError) -> ClientError:
    """Following the job just made was refused (403: the key lacks `read`): cancel it rather
    than leave it to run unseen, and say in one line what came of that and what to do."""
    from selfcascade.client import ClientError

    advice = "use a key with both generate and read"
    try:
        job = client.cancel(job_id)
    except ClientError as exc:
        if exc.status == 409:
            outcome = f"{job_id} had already ended"
        else:  # canceling needs `read` too: a key without it cannot stop its own job
            outcome = f"could not cancel {job_id} either ({exc}), so it still runs"
    else:  # a running job stops between two denoising steps, a moment later
        canceled = job["status"] == "canceled"
        outcome = f"canceled {job_id}" if canceled else f"cancel requested for {job_id}"
    return ClientError(
        f"{refusal}, needed to follow the job; {outcome}: {advice}", refusal.status
    )


def _cancel_on_interrupt(client: ServiceClient, job_id: str | None) -> None:
    """Ctrl-C: cancel the job (one try, the user is leaving), saying in one line what came of
    it."""
    from selfcascade.client import ClientError

    if job_id is None:
        print("interrupted before the server answered with a job", file=sys.stderr)
        return
    try:
        client.cancel(job_id)
    except ClientError as exc:
        if exc.status == 409:  # it had ended: nothing left to cancel
            print(f"interrupted: {job_id} had already ended", file=sys.stderr)
        else:
            print(f"interrupted: could not cancel {job_id}: {exc}", file=sys.stderr)
        return
    print(f"interrupted: canceled {job_id}", file=sys.stderr)


def _follow_and_download(client: ServiceClient, job_id: str, out: Path | None) -> int:
    from selfcascade.client import ClientError

    try:
        _follow(client, job_id)
        job = client.get(job_id)
    except ClientError as exc:
        if exc.status != 403:
            raise
        raise _refused_to_follow(client, job_id, exc) from exc
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        reason = f": {error.get('code')}: {error.get('message')}" if error else ""
        print(f"generation {job_id} {job['status']}{reason}", file=sys.stderr)
        return EXIT_FAILED
    print(_summary(job))
    outputs = job["outputs"]
    base = out or Path(f"selfcascade-{job_id[:8]}.{outputs[0]['format']}")
    for index, output in enumerate(outputs):
        path = _download_path(base, output, index, len(outputs))
        size = client.download(output["url"], path, size=output["bytes"], sha256=output["sha256"])
        clip = f", {output['frames']} frames at {output['fps']} fps" if output.get("frames") else ""
        print(f"wrote {path} ({output['width']}x{output['height']}{clip}, {size} bytes)")
    return 0


def _download_path(base: Path, output: dict[str, Any], index: int, count: int) -> Path:
    """`base` for a single image or a clip; a clip's poster beside it (clip.poster.png);
    several images numbered (out-0.png, out-1.png)."""
    role = output.get("role", "image")
    if role == "poster":
        return base.with_name(f"{base.stem}.poster.{output['format']}")
    if role == "video" or count == 1:
        return base
    return base.with_stem(f"{base.stem}-{index}")


def _follow(client: ServiceClient, job_id: str) -> None:
    """A progress bar over the whole run, its label the current stage, from the event stream."""
    from tqdm import tqdm

    with tqdm(total=100, unit="%", desc="queued", bar_format="{desc} {bar} {n:.0f}%") as bar:
        for event in client.events(job_id):
            progress = event.data.get("progress")
            if event.type == "started":
                bar.set_description_str("running", refresh=False)
            elif progress:
                bar.set_description_str(
                    f"stage {progress['stage']}/{progress['stages']} "
                    f"step {progress['step']}/{progress['steps']}",
                    refresh=False,
                )
                bar.update(round(progress["fraction"] * 100, 1) - bar.n)
            if event.type == "succeeded":
                bar.update(100 - bar.n)
            if event.is_terminal:
                bar.set_description_str(event.type)  # refreshes: the last line says how it ended


def _summary(job: dict[str, Any]) -> str:
    metrics = job.get("metrics") or {}
    stages = metrics.get("stage_seconds") or []
    parts = [f"seed {job['params']['seed']}"]
    if stages:
        per_stage = " + ".join(f"{s:.2f}" for s in stages)
        parts.append(f"{len(stages)} stage(s) in {sum(stages):.2f}s ({per_stage})")
    if metrics.get("unet_evaluations") is not None:
        parts.append(f"{metrics['unet_evaluations']} UNet evaluations")
    if metrics.get("queue_s") is not None:
        parts.append(f"queued {metrics['queue_s']:.2f}s")
    return "; ".join(parts)


def _status(args: argparse.Namespace) -> int:
    from selfcascade.client import ClientError

    try:
        with _client(args) as client:
            job = client.get(args.job_id)
    except ClientError as exc:
        print(f"selfcascade client: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    for line in _status_lines(job):
        print(line)
    return 0


def _status_lines(job: dict[str, Any]) -> Sequence[str]:
    params = job["params"]
    clip = ""
    if params.get("num_frames"):
        clip = f", {params['num_frames']} frames at {params['fps']} fps"
    lines = [
        f"{job['id']}: {job['status']}",
        f"  {params['width']}x{params['height']}{clip} {params['method']}, seed {params['seed']}, "
        f"{params['steps']} steps, prompt {params['prompt']!r}",
    ]
    if metadata := job.get("metadata"):
        lines.append("  metadata " + ", ".join(f"{k}={v}" for k, v in metadata.items()))
    if job.get("queue_position") is not None:
        lines.append(f"  queue position {job['queue_position']}")
    if (progress := job.get("progress")) and job["status"] == "running":
        lines.append(
            f"  stage {progress['stage']}/{progress['stages']}, step "
            f"{progress['step']}/{progress['steps']}, {progress['fraction']:.0%}"
        )
    if error := job.get("error"):
        lines.append(f"  error {error['code']}: {error['message']}")
    if job["status"] == "succeeded":
        lines.append(f"  {_summary(job)}")
    lines.extend(
        f"  output {o['url']} ({o['width']}x{o['height']} {o.get('role', 'image')})"
        for o in job["outputs"]
    )
    return lines


def _cancel(args: argparse.Namespace) -> int:
    from selfcascade.client import ClientError

    try:
        with _client(args) as client:
            job = client.cancel(args.job_id)
    except ClientError as exc:
        print(f"selfcascade client: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if job["status"] == "canceled":
        print(f"{job['id']}: canceled")
    else:  # a running job stops between two denoising steps, a moment later
        print(f"{job['id']}: cancel requested ({job['status']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m selfcascade.client_cli generate ...`: `selfcascade client generate ...`."""
    from selfcascade.cli import main as cli_main  # its errors are answered in one line there

    return cli_main(["client", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
