"""The `selfcascade` command as a user runs it: a real subprocess on a tiny model folder."""

import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest
from PIL import Image

from selfcascade.demo import card as demo_card

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfcascade.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,  # where the default model, models/demo, is found
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny"
    done = run("tiny-model", str(path))
    assert done.returncode == 0, done.stderr
    return path


def test_generate_writes_a_png_of_the_requested_size(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    done = run(
        "generate", "--model", str(model), "--prompt", "a red circle",
        "--width", "128", "--height", "96", "--steps", "4", "--seed", "5", "--out", str(out),
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (128, 96)
    assert "seed 5" in done.stdout
    assert "; tuning-free; pivot strength 0.7;" in done.stdout  # the paper's K but for the demo
    assert "UNet evaluations" in done.stdout
    shown = [line for line in done.stderr.splitlines() if "stage " in line]  # each bar refresh
    assert shown and all(line.count("stage ") == 1 for line in shown)  # was: the stage text twice


def test_the_summary_says_a_direct_run_has_no_pivot(model: Path, tmp_path: Path) -> None:
    done = run(
        "generate", "--model", str(model), "--prompt", "x", "--width", "128", "--height", "96",
        "--steps", "2", "--seed", "5", "--method", "direct", "--out", str(tmp_path / "d.png"),
    )
    assert done.returncode == 0, done.stderr
    assert "seed 5; direct; stages 128x96;" in done.stdout
    assert "pivot" not in done.stdout


def test_a_tuned_run_from_the_folder_tune_writes_says_it_is_tuned(
    model: Path, tmp_path: Path
) -> None:
    from selfcascade.checkpoint import save_upsamplers
    from selfcascade.loading import load_pipeline
    from selfcascade.tuned import UPSAMPLERS_FILE
    from selfcascade.upsamplers import FeatureUpsamplerSet

    unet = load_pipeline(str(model), device="cpu").unet
    ups = FeatureUpsamplerSet.for_unet(unet.config)
    save_upsamplers(tmp_path / "tuned" / UPSAMPLERS_FILE, ups, unet, 2, 700)
    done = run(
        "generate", "--model", str(model), "--prompt", "x", "--width", "128", "--height", "96",
        "--steps", "2", "--upsamplers", str(tmp_path / "tuned"), "--out", str(tmp_path / "t.png"),
    )
    assert done.returncode == 0, done.stderr  # was: "upsampler checkpoint ... does not exist"
    assert "; tuned (1 upsampler set); pivot strength 0.7;" in done.stdout


@pytest.mark.parametrize("model_args", [[], ["--model", str(ROOT / demo_card.MODEL_DIR)]])
def test_the_default_model_is_the_demo_with_its_own_pivot_strength(
    tmp_path: Path, model_args: list[str]
) -> None:
    out = tmp_path / "demo.png"
    done = run(
        "generate", *model_args, "--prompt", "a red circle and a blue square", "--width", "128",
        "--height", "128", "--steps", "5", "--seed", "1", "--out", str(out),
    )
    assert done.returncode == 0, done.stderr
    assert f"pivot strength {demo_card.PIVOT_STRENGTH};" in done.stdout
    assert Image.open(out).size == (128, 128)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "100", "--height", "64"], "error: --width: must be a multiple of 8"),
        (["--width", "64", "--height", "64", "--steps", "0"], "steps"),
        # The flag typed, not the request field behind it (was "guidance_scale: ...").
        (["--width", "64", "--height", "64", "--guidance-scale", "nan"],
         "error: --guidance-scale: must be a finite number"),
        (["--width", "64", "--height", "64", "--pivot-strength", "2"],
         "error: --pivot-strength: must be in (0, 1]"),
        (["--width", "128", "--height", "128", "--steps", "4", "--pivot-strength", "0.1"],
         "error: --pivot-strength: steps x pivot_strength must be at least 1"),
        (["--width", "64", "--height", "64", "--fps", "61"], "error: --fps: must be between 1"),
        (["--width", "64", "--height", "64", "--fps", "60", "--out", "c.gif"],
         "error: --fps: a .gif plays at most 50 fps"),
        (["--width", "64", "--height", "64", "--frames", "0"], "error: --frames: must be"),
        (["--width", "64", "--height", "64", "--num-frames=0"], "error: --num-frames: must be"),
        # Was ignored, the summary still giving a pivot strength; the API refuses it too.
        (["--width", "64", "--height", "64", "--method", "direct", "--upsamplers", "u"],
         "error: --upsamplers: tuned upsamplers work inside self-cascade stages"),
        # Caught before any compute: Pillow would only refuse these after the whole generation.
        (["--width", "64", "--height", "64", "--out", "result"],
         "--out: cannot write the extension '(none)'; use .png, .webp or .jpg (a video model's "
         "clip: .mp4, .webm, or an animated .gif, .png or .webp)"),
        # Known once the model has loaded: this one makes images.
        (["--width", "64", "--height", "64", "--out", "x.mp4"],
         "--out: this model makes images, not clips; use .png, .webp or .jpg"),
        (["--width", "64", "--height", "64", "--fps", "0"], "--fps: must be between 1 and 60"),
        # Sides the encoder refuses, refused before the cascade (was an error after all of it).
        (["--width", "16384", "--height", "64", "--out", "x.webp"],
         "error: --width: webp allows at most 16383 px per side, got 16384"),
        (["--width", "64", "--height", "65504", "--out", "x.JPG"],
         "error: --height: jpeg allows at most 65500 px per side, got 65504"),
        (["--width", "64", "--height", "64", "--out", "x.foo"], "extension '.foo'"),
        (["--width", "64", "--height", "64", "--out", "tests"], "tests is a directory"),
        (["--width", "64", "--height", "64", "--device", "bogus"], "'bogus' is not a device"),
        # DDIM's leading spacing would ask for t = 1000 of T = 1000 (an IndexError before).
        (["--width", "64", "--height", "64", "--steps", "1000"], ": --steps: must be at most 999"),
        # Known to torch, unusable here (a CPU build): refused at loading, not in pipe.to().
        (["--width", "64", "--height", "64", "--device", "mps"], "cannot use device 'mps'"),
        # Unwritable destinations are refused before the generation, not after it.
        (["--width", "64", "--height", "64", "--out", "/proc/no/x.png"],
         "--out: cannot write into /proc/no: cannot create that folder: "),
        # /proc is there but makes no files: was "No such file or directory", said of /proc.
        (["--width", "64", "--height", "64", "--out", "/proc/x.png"],
         "--out: cannot write into /proc: cannot create files there: "),
        # A file where its folder should be: mkdir said only "File exists".
        (["--width", "64", "--height", "64", "--out", "README.md/x.png"],
         "--out: cannot write into README.md: it is a file, not a folder"),
        # A size past the cap, refused before the model loads (was: 12 stages, 10+ minutes).
        (["--width", "4104", "--height", "4096"],
         "error: --width: 4104x4096 exceeds the pixel budget of 16777216 pixels; raise it with "
         "--max-pixels (0 lifts the cap)"),
        (["--width", "128", "--height", "136", "--max-pixels", "16384"],
         "error: --height: 128x136 exceeds the pixel budget of 16384 pixels"),
        (["--width", "64", "--height", "64", "--max-pixels", "-1"],
         "error: --max-pixels: must be 0 (no cap) or more, got -1"),
        # 4096^2 is within the cap, and 0 lifts it: the next check, on the extension, speaks.
        (["--width", "4096", "--height", "4096", "--out", "x.foo"], "--out: cannot write the "
         "extension '.foo'"),
        (["--width", "20000", "--height", "20000", "--max-pixels", "0", "--out", "x.webp"],
         "error: --width: webp allows at most 16383 px per side, got 20000"),
        # Flags that would be ignored (were): --fps on an image model, as --num-frames is.
        (["--width", "64", "--height", "64", "--fps", "12"],
         "error: --fps: this model makes images, not videos"),
        (["--width", "64", "--height", "64", "--lr-features", "per_stage"],
         "error: --lr-features: applies to tuned runs; add --upsamplers"),
        # Was "dtype must be auto or one of ...", from loading, naming no flag.
        (["--width", "64", "--height", "64", "--dtype", "float64"],
         "error: --dtype: must be auto or one of float32, float16, bfloat16, got 'float64'"),
        # Was passed to diffusers after seconds of loading, to fail naming a file.
        (["--width", "64", "--height", "64", "--variant", "../fp16"],
         "error: argument --variant: '../fp16' is not a variant name: letters, digits, '-' or "
         "'_', at most 32 of them (e.g. fp16)"),
    ],
)
def test_bad_values_are_one_line_errors_not_tracebacks(
    model: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    # Into tmp_path unless a case names its --out (the later one wins): a case that went
    # through would not leave an out.png in the repository.
    out = str(tmp_path / "out.png")
    done = run("generate", "--model", str(model), "--prompt", "x", "--out", out, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("tail", ["/", "/.", "//"])
def test_an_out_that_ends_as_a_folder_is_refused(model: Path, tmp_path: Path, tail: str) -> None:
    out = f"{tmp_path / 'ro.png'}{tail}"
    done = run(
        "generate", "--model", str(model), "--prompt", "x", "--width", "64", "--height", "64",
        "--steps", "2", "--out", out,
    )
    assert done.returncode == 2
    # Was: the file ro.png written, the slash dropped.
    assert done.stderr == (
        f"selfcascade: error: --out: {out} names a folder; give a file name such as out.png\n"
    )
    assert not (tmp_path / "ro.png").exists()


def limit_file_size() -> None:
    """In the child: writes past 1000 bytes fail with EFBIG (Python ignores SIGXFSZ), as on a
    full disk, after the whole generation."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))


@pytest.mark.parametrize("earlier", [b"an image of an earlier run", None])
def test_a_failed_write_leaves_the_file_that_was_there(
    model: Path, tmp_path: Path, earlier: bytes | None
) -> None:
    out = tmp_path / "img.png"
    if earlier is not None:
        out.write_bytes(earlier)
    done = subprocess.run(
        [sys.executable, "-m", "selfcascade.cli", "generate", "--model", str(model), "--prompt",
         "x", "--width", "128", "--height", "96", "--steps", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT, preexec_fn=limit_file_size,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith(f"selfcascade: error: --out: cannot write {out}: [Errno 27] "
                                "File too large\n")
    # Was: the earlier file truncated. Nor is a partial file left beside it.
    assert [p.name for p in tmp_path.iterdir()] == (["img.png"] if earlier else [])
    if earlier is not None:
        assert out.read_bytes() == earlier


def test_an_image_replaces_the_file_at_out(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "img.webp"
    out.write_bytes(b"an image of an earlier run")
    done = run(
        "generate", "--model", str(model), "--prompt", "x", "--width", "64", "--height", "64",
        "--steps", "2", "--out", str(out),
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(out).format == "WEBP"  # by the extension, though written as a .part file
    assert [p.name for p in tmp_path.iterdir()] == ["img.webp"]


def test_two_upsampler_sets_tuned_at_one_size_are_refused(model: Path, tmp_path: Path) -> None:
    from selfcascade.checkpoint import save_upsamplers
    from selfcascade.loading import load_pipeline
    from selfcascade.upsamplers import FeatureUpsamplerSet

    unet = load_pipeline(str(model), device="cpu").unet
    ups = FeatureUpsamplerSet.for_unet(unet.config)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path in (a, b):
        save_upsamplers(path, ups, unet, 2, 700, hr_size=128)
    done = run(
        "generate", "--model", str(model), "--prompt", "x", "--width", "128", "--height", "128",
        "--steps", "2", "--upsamplers", str(a), str(b), "--out", str(tmp_path / "t.png"),
    )
    assert done.returncode == 2
    # Was: the first set used, the second loaded for nothing.
    assert done.stderr == (
        f"selfcascade: error: {a} and {b} are both tuned at 128 px, so only the first would be "
        "used; pass one set per stage size\n"
    )


def read_until(stream: IO[bytes] | None, wanted: bytes, timeout_s: float) -> bytes:
    """What a child wrote to `stream` until `wanted` shows up in it."""
    assert stream is not None
    fd = stream.fileno()
    seen = b""
    deadline = time.monotonic() + timeout_s
    while wanted not in seen:
        assert select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0], seen
        chunk = os.read(fd, 4096)
        assert chunk, seen  # it ended first
        seen += chunk
    return seen


def test_ctrl_c_during_generate_is_one_line_and_exit_130(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    child = subprocess.Popen(
        [sys.executable, "-m", "selfcascade.cli", "generate", "--model", str(model), "--prompt",
         "x", "--width", "512", "--height", "512", "--steps", "999", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    try:
        seen = read_until(child.stderr, b"stage ", timeout_s=240)  # the bar: denoising began
        child.send_signal(signal.SIGINT)
        _, rest = child.communicate(timeout=60)
    finally:
        child.kill()  # a no-op once it has ended
    stderr = (seen + rest).decode()
    assert child.returncode == 130
    # Was a 25-line KeyboardInterrupt traceback.
    assert re.search(r"\nselfcascade: interrupted\n$", stderr), stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_a_command_that_reports_its_own_interruption_keeps_its_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from selfcascade import cli

    def saves_and_reraises(args: object) -> int:  # as tune does: its state saved, then Ctrl-C
        print("tune: interrupted; state saved at step 3", file=sys.stderr)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_tiny_model", saves_and_reraises)
    assert cli.main(["tiny-model", "unused"]) == 130
    assert capsys.readouterr().err == (
        "tune: interrupted; state saved at step 3\nselfcascade: interrupted\n"
    )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        # Were NotADirectoryError and PermissionError tracebacks, exit 1.
        ("README.md", "cannot write a model folder at README.md: it is a file, not a folder"),
        ("README.md/tiny", "cannot write a model folder at README.md/tiny: a folder above it is "
         "a file"),
        ("/sys/selfcascade-tiny", "cannot write a model folder at /sys/selfcascade-tiny: "),
    ],
)
def test_tiny_model_into_an_unwritable_place_is_a_one_line_error(path: str, message: str) -> None:
    done = run("tiny-model", path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"selfcascade: error: {message}")
    assert done.stderr.count("\n") == 1


def test_a_model_folder_under_home_can_be_named_with_a_tilde(model: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(model, home / "sd")
    args = ["generate", "--model", "~/sd", "--prompt", "x", "--width", "64", "--height", "64",
            "--steps", "2", "--out", str(tmp_path / "o.png")]
    done = subprocess.run(
        [sys.executable, "-m", "selfcascade.cli", *args], capture_output=True, text=True,
        timeout=240, cwd=ROOT, env={**os.environ, "HOME": str(home)},
    )
    assert done.returncode == 0, done.stderr  # was: "Repo id must use alphanumeric chars"


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    done = run(
        "generate", "--model", str(tmp_path / "missing"), "--prompt", "x",
        "--width", "64", "--height", "64",
    )
    assert done.returncode == 2
    assert "no model folder" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_model_that_is_no_folder_and_no_reachable_hub_id_is_one_short_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "selfcascade.cli", "generate", "--model", "nonexistent/folder",
         "--prompt", "x", "--width", "64", "--height", "64"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2
    # Was one long line from diffusers, pointing at a stack trace nobody printed.
    assert done.stderr == (
        "selfcascade: error: no local folder at 'nonexistent/folder', and loading it as a hub id "
        "failed: offline mode is on (HF_HUB_OFFLINE) and it is not in the local cache\n"
    )


@pytest.mark.parametrize(
    ("args", "needs", "extra"),
    [
        (["client", "status", "0123"], "httpx", "client"),
        (["generate", "--prompt", "x", "--width", "64", "--height", "64"], "tqdm", "worker"),
    ],
)
def test_a_command_whose_extra_is_not_installed_names_it_in_one_line(
    args: list[str], needs: str, extra: str
) -> None:
    # -S leaves site-packages off the path, so no extra's package imports, as after a bare
    # `pip install selfcascade` (these commands never import its job-contract dependencies).
    done = subprocess.run(
        [sys.executable, "-S", "-m", "selfcascade.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"selfcascade: error: `selfcascade {args[0]}` needs {needs}, which is not installed: "
        f"pip install 'selfcascade[{extra}]'\n"
    )

