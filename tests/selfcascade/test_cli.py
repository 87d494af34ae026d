"""The `selfcascade` command as a user runs it: a real subprocess on a tiny model folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
        (["--width", "64", "--height", "64", "--out", "/proc/no/x.png"], "cannot write into"),
        # A file where its folder should be: mkdir said only "File exists".
        (["--width", "64", "--height", "64", "--out", "README.md/x.png"],
         "--out: cannot write into README.md: it is a file, not a folder"),
    ],
)
def test_bad_values_are_one_line_errors_not_tracebacks(
    model: Path, args: list[str], message: str
) -> None:
    done = run("generate", "--model", str(model), "--prompt", "x", *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


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

