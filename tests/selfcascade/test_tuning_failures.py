"""`selfcascade tune` when it is stopped or refused: Ctrl-C saves the last completed step, a write
that fails and a flag that cannot work are one line each, and --resume checks --data and says in
one line when the state cannot be read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from selfcascade.checkpoint import load_upsamplers
from selfcascade.cli import main as cli_main
from selfcascade.errors import CheckpointError, InvalidRequest
from selfcascade.tiny_models import build_tiny_sd_pipeline, save_tiny_sd
from selfcascade.tuning import (
    LOSS_LOG,
    STATE_FILE,
    UPSAMPLERS_FILE,
    StepReport,
    TuneInterrupted,
    TuningImages,
    tune,
)
from tests.selfcascade.single_thread import single_thread_torch  # noqa: F401 (fixture)
from tests.selfcascade.test_tuning import config, write_images

pytestmark = pytest.mark.usefixtures("single_thread_torch")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_images(tmp_path / "data")


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / LOSS_LOG).read_text().splitlines()]


def logged_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / LOSS_LOG).read_text().splitlines()]


def saved_step(out: Path) -> int:
    return int(torch.load(out / STATE_FILE, weights_only=True)["step"])


# -- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_in_tune_saves_the_last_step_says_so_in_one_line_and_resume_continues(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    model = save_tiny_sd(tmp_path / "model")
    out = tmp_path / "out"
    args = ["tune", "--model", str(model), "--data", str(data), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with (tmp_path / "stderr").open("wb") as stderr:
        # Never reaches its last step or a periodic save: only the interrupt's save can hold
        # the steps it trained.
        command = [*args, "--steps", "100000", "--save-every", "100000"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "selfcascade.cli", *command],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 180
            while not ((out / LOSS_LOG).is_file() and len(logged_steps(out)) >= 3):
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "no third step within 180 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = (tmp_path / "stderr").read_text()
    step = saved_step(out)
    assert rc == 130, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"selfcascade: interrupted at step {step}; state saved in {out}: rerun with --resume "
        "to continue"
    )
    # The state, the served checkpoint and the log all end at the same completed step.
    assert step >= 3 and logged_steps(out) == list(range(1, step + 1))
    assert load_upsamplers(out / UPSAMPLERS_FILE, build_tiny_sd_pipeline(0).unet).extra == {
        "tuning_step": str(step)
    }

    assert cli_main([*args, "--steps", str(step + 2), "--resume"]) == 0
    assert f"after step {step + 2} (started at {step})" in capsys.readouterr().out
    assert logged_steps(out) == list(range(1, step + 3))
    # As if never stopped: the steps resumed draw the crops and noise an unbroken run draws (the
    # losses would differ in the first digits if not). Not bit for bit: float32 sums rounded in
    # another process differ in the last digits. test_an_interrupt_mid_step_... is exact.
    straight = tune(build_tiny_sd_pipeline(0), config(tmp_path / "straight", data, steps=step + 2))
    assert logged_losses(out) == pytest.approx(straight.losses, rel=1e-4)


def test_an_interrupt_mid_step_saves_the_step_before_and_resumes_exactly(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = tune(build_tiny_sd_pipeline(0), config(tmp_path / "a", data, steps=4))
    sample = TuningImages.sample
    calls = []

    def cut_short_in_step_3(self: TuningImages, *args: Any) -> Any:
        drawn = sample(self, *args)  # the crops of step 3 drawn, then Ctrl-C
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return drawn

    out = tmp_path / "b" / "out"
    with monkeypatch.context() as patch, pytest.raises(TuneInterrupted) as stop:
        patch.setattr(TuningImages, "sample", cut_short_in_step_3)
        tune(build_tiny_sd_pipeline(0), config(tmp_path / "b", data, steps=4, save_every=100))
    assert (stop.value.step, stop.value.out_dir) == (2, out)
    assert saved_step(out) == 2 and logged_steps(out) == [1, 2]

    resumed = tune(build_tiny_sd_pipeline(0), config(tmp_path / "b", data, steps=4, resume=True))
    assert resumed.start_step == 2 and resumed.losses == straight.losses[2:]
    a, b = straight.upsamplers.state_dict(), resumed.upsamplers.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupt_after_a_step_saves_that_step_and_before_any_step_saves_nothing(
    tmp_path: Path, data: Path
) -> None:
    def stop_after_step_2(report: StepReport) -> None:
        if report.step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(TuneInterrupted, match="interrupted at step 2"):
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=9), stop_after_step_2)
    assert saved_step(out) == 2 and logged_steps(out) == [1, 2]

    def stop_at_once(report: StepReport) -> None:
        raise KeyboardInterrupt

    # Resumed, then stopped again after a step: the state moves on by that step.
    with pytest.raises(TuneInterrupted, match="interrupted at step 3"):
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=9, resume=True), stop_at_once)
    assert saved_step(out) == 3 and logged_steps(out) == [1, 2, 3]


def test_the_state_file_is_replaced_whole_or_not_at_all(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=1))
    before = (out / STATE_FILE).read_bytes()
    # Its next version cannot be written beside it (a folder where the new file goes): the
    # one there is left as it was, and a run resumes from it.
    (out / f"{STATE_FILE}.tmp").mkdir()
    with pytest.raises(InvalidRequest, match=r"cannot write .*training_state\.pt: \[Errno 21\]"):
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=2, resume=True))
    assert (out / STATE_FILE).read_bytes() == before
    (out / f"{STATE_FILE}.tmp").rmdir()
    assert tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=2, resume=True)).steps == 2


# -- a full disk ---------------------------------------------------------------------------------

full_disk = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")


@full_disk
def test_a_full_disk_under_the_loss_log_is_one_error_line_naming_it(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    model = save_tiny_sd(tmp_path / "model")
    capsys.readouterr()  # saving's progress bars (when a test before has not quieted them)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOSS_LOG).symlink_to("/dev/full")  # opens, and every write is ENOSPC
    args = ["tune", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "2"]
    assert cli_main(args) == 2
    assert capsys.readouterr().err == (
        f"selfcascade: error: --out: cannot write {out / LOSS_LOG}: [Errno 28] No space left on "
        "device\n"
    )


@full_disk
def test_a_full_disk_under_the_training_state_is_one_error_naming_it(
    tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{STATE_FILE}.tmp").symlink_to("/dev/full")
    with pytest.raises(InvalidRequest) as refused:
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=1))
    assert str(refused.value) == (
        f"out: cannot write {out / STATE_FILE}: [Errno 28] No space left on device"
    )
    assert not (out / STATE_FILE).exists()


def test_a_folder_where_the_checkpoint_goes_is_one_error_naming_it(
    tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "out"
    (out / f"{UPSAMPLERS_FILE}.tmp").mkdir(parents=True)
    with pytest.raises(InvalidRequest) as refused:
        tune(build_tiny_sd_pipeline(0), config(tmp_path, data, steps=1))
    assert (
        str(refused.value)
        == f"out: cannot write {out / UPSAMPLERS_FILE}: [Errno 21] Is a directory"
    )


# -- flags that cannot work ----------------------------------------------------------------------


@pytest.mark.parametrize("size", ["-128", "0"])
def test_a_crop_size_below_one_is_refused_in_one_line_before_the_model_loads(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, size: str
) -> None:
    # No model there: had it been loaded first, the error would name the model.
    args = ["tune", "--model", str(tmp_path / "no-model"), "--data", str(data)]
    assert cli_main([*args, "--out", str(tmp_path / "o"), "--crop-size", size]) == 2
    assert capsys.readouterr().err == (
        f"selfcascade: error: --crop-size: must be a positive number of pixels, got {size}\n"
    )


def test_clip_frames_on_an_image_model_is_refused_in_one_line(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    model = save_tiny_sd(tmp_path / "model")
    args = ["tune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")]
    assert cli_main([*args, "--steps", "1", "--clip-frames", "4"]) == 2
    assert capsys.readouterr().err == (
        "selfcascade: error: --clip-frames: this model makes images, not videos\n"
    )
    assert not (tmp_path / "o" / LOSS_LOG).exists()  # refused before any step


# -- --resume ------------------------------------------------------------------------------------


def test_resume_refuses_another_data_folder_but_not_the_same_one_by_another_name(
    tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = build_tiny_sd_pipeline(0)
    tune(pipe, config(tmp_path, data, steps=1))
    other = shutil.copytree(data, tmp_path / "other")
    with pytest.raises(CheckpointError) as refused:
        tune(pipe, config(tmp_path, other, steps=2, resume=True))
    assert str(refused.value) == (
        f"cannot resume {tmp_path / 'out' / STATE_FILE}: settings changed since it was saved "
        f"(data); its --data was {data.resolve()}"
    )
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(data)
    assert tune(pipe, config(tmp_path, Path("link"), steps=2, resume=True)).start_step == 1


def test_resume_takes_a_state_saved_before_data_was_recorded(tmp_path: Path, data: Path) -> None:
    pipe = build_tiny_sd_pipeline(0)
    tune(pipe, config(tmp_path, data, steps=1))
    path = tmp_path / "out" / STATE_FILE
    state = torch.load(path, weights_only=True)
    key = json.loads(state["resume_key"])
    del key["data"]  # as the previous release saved it
    torch.save({**state, "resume_key": json.dumps(key)}, path)
    other = shutil.copytree(data, tmp_path / "other")
    assert tune(pipe, config(tmp_path, other, steps=2, resume=True)).start_step == 1


def _not_a_state(path: Path) -> None:
    path.write_bytes(b"not a torch file")


def _pickled_object(path: Path) -> None:
    # Loads only with weights_only=False: torch's refusal runs to a dozen lines.
    torch.save({"step": 3, "where": Path("x")}, path)


@pytest.mark.parametrize("write", [_not_a_state, _pickled_object])
def test_an_unreadable_training_state_is_one_error_line(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, write: Any
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write(out / STATE_FILE)
    # No model there: the state is read, and refused, before any model loads.
    args = ["tune", "--model", str(tmp_path / "no-model"), "--data", str(data)]
    assert cli_main([*args, "--out", str(out), "--steps", "9", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"selfcascade: error: cannot resume: {out / STATE_FILE} is not a training state this "
        "release can read (corrupt, truncated, or not written by `selfcascade tune`)\n"
    )


def test_a_state_missing_its_parts_is_refused_as_unreadable(tmp_path: Path, data: Path) -> None:
    pipe = build_tiny_sd_pipeline(0)
    tune(pipe, config(tmp_path, data, steps=1))
    path = tmp_path / "out" / STATE_FILE
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "optimizer"}, path)
    with pytest.raises(CheckpointError, match="not a training state this release can read"):
        tune(pipe, config(tmp_path, data, steps=2, resume=True))
