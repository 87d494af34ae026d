"""`selfcascade client generate` with a video model: the clip where --out says, its poster
beside it; and the naming rule on its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import av
import pytest
from PIL import Image

from selfcascade.cli import main
from selfcascade.client_cli import _download_path
from tests.running_stack import RunningStack, running_stack


@pytest.fixture(scope="module")
def video_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    from selfcascade.tiny_models import save_tiny_text_to_video

    folder = tmp_path_factory.mktemp("client-video")
    model = save_tiny_text_to_video(folder / "tiny-t2v")
    with running_stack(redis_url, folder / "data", model, "client-video-1") as running:
        yield running


@pytest.mark.integration
def test_generate_downloads_the_clip_and_its_poster(
    video_stack: RunningStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "boat.mp4"
    argv = ["client", "generate", "--server", video_stack.url, "--prompt", "a paper boat"]
    argv += ["--steps", "2", "--num-frames", "5", "--fps", "10", "--out", str(out)]
    assert main(argv) == 0

    printed = capsys.readouterr().out
    assert f"wrote {out} (64x64, 5 frames at 10 fps" in printed
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.codec_context.name == "h264" and stream.average_rate == 10
    assert len(frames) == 5 and (frames[0].width, frames[0].height) == (64, 64)
    with Image.open(tmp_path / "boat.poster.png") as poster:
        assert poster.size == (64, 64)


def test_download_paths_follow_each_outputs_role() -> None:
    base = Path("out/clip.mp4")
    assert _download_path(base, {"role": "video", "format": "mp4"}, 0, 2) == base
    poster = {"role": "poster", "format": "png"}
    assert _download_path(base, poster, 1, 2) == Path("out/clip.poster.png")
    image = {"role": "image", "format": "png"}
    assert _download_path(Path("a.png"), image, 0, 1) == Path("a.png")
    assert _download_path(Path("a.png"), image, 1, 3) == Path("a-1.png")
