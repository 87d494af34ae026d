"""Video results: frames encoded to mp4/webm/gif decode back to the same clip, and a stored video
job lists the clip and its poster with the right content types."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path

import av
import pytest
from PIL import Image

from contract.jobs import GenerationParams
from contract.storage.local import LocalResultStorage
from selfcascade.output_formats import GIF_MAX_FPS
from selfcascade.video_encoding import VideoEncodingError, encode_video, gif_delays_ms
from worker.outputs import store_video


def clip(count: int, width: int = 48, height: int = 32) -> list[Image.Image]:
    """Frames that differ from each other (a moving bar), so no encoder may merge two."""
    frames = []
    for i in range(count):
        image = Image.new("RGB", (width, height), (20, 40, 60))
        image.paste((250, 200, 10), (i * 4 % width, 0, i * 4 % width + 6, height))
        frames.append(image)
    return frames


def decode(data: bytes) -> tuple[list[Image.Image], float, str]:
    """Every frame, the stream's frame rate and its codec, read back with FFmpeg (PyAV)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        return frames, float(stream.average_rate or 0), stream.codec_context.name


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "h264"), ("webm", "vp9")])
def test_ffmpeg_formats_decode_to_every_frame_at_the_size_and_rate(fmt: str, codec: str) -> None:
    frames = clip(9)
    data = encode_video(frames, fmt, fps=12)
    decoded, fps, decoded_codec = decode(data)
    assert decoded_codec == codec
    assert len(decoded) == 9
    assert {f.size for f in decoded} == {(48, 32)}
    assert fps == 12
    # Lossy, but the moving bar is where it was: frame 5's bar starts at x = 20.
    assert decoded[5].getpixel((22, 16))[0] > 200 and decoded[5].getpixel((2, 16))[0] < 80


def test_mp4_is_h264_yuv420p_with_its_index_first() -> None:
    data = encode_video(clip(3), "mp4", fps=8)
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    assert data[4:8] == b"ftyp"
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: playable while downloading


def test_gif_keeps_every_frame_and_the_clip_length() -> None:
    data = encode_video(clip(8), "gif", fps=8)
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 8 and gif.size == (48, 32)
    delays = []
    for index in range(gif.n_frames):
        gif.seek(index)
        delays.append(gif.info["duration"])
    assert sum(delays) == 1000  # 8 frames at 8 fps, although 125 ms is not a whole centisecond


def test_gif_delays_add_up_to_the_clip_length() -> None:
    assert gif_delays_ms(3, 1) == [1000, 1000, 1000]
    assert sum(gif_delays_ms(30, 30)) == 1000
    assert set(gif_delays_ms(16, 8)) == {120, 130}


def test_gif_delays_stay_at_20_ms_or_more_up_to_the_apis_gif_limit() -> None:
    # Browsers play a delay of 10 ms or less as 100 ms: the API caps gif at GIF_MAX_FPS for this.
    for fps in range(1, GIF_MAX_FPS + 1):
        assert min(gif_delays_ms(64, fps)) >= 20, fps


@pytest.mark.parametrize(
    ("frames", "fmt", "fps", "message"),
    [
        ([], "mp4", 8, "no frames"),
        (clip(2), "avi", 8, "not a video format"),
        (clip(2), "mp4", 0, "fps"),
        (clip(2, 47, 32), "mp4", 8, "even"),
        ([*clip(1), *clip(1, 64, 32)], "webm", 8, "differ in size"),
    ],
)
def test_bad_input_is_refused_before_encoding(
    frames: list[Image.Image], fmt: str, fps: int, message: str
) -> None:
    with pytest.raises(VideoEncodingError, match=message):
        encode_video(frames, fmt, fps)


def test_a_stored_video_job_has_the_clip_and_a_png_poster(tmp_path: Path) -> None:
    storage = LocalResultStorage(tmp_path)
    job_id = uuid.uuid4().hex
    params = GenerationParams(
        prompt="p", model="tv", width=48, height=32, seed=5,
        output_format="mp4", num_frames=6, fps=10,
    )
    frames = clip(6)
    video, poster = store_video(storage, job_id, frames, params, [0.5, 0.25])

    assert (video.index, video.role, video.format) == (0, "video", "mp4")
    assert video.key == f"{job_id}/0.mp4"
    assert (video.width, video.height, video.frames, video.fps) == (48, 32, 6, 10)
    data = b"".join(storage.open(video.key))
    assert len(data) == video.bytes and hashlib.sha256(data).hexdigest() == video.sha256
    decoded, fps, _ = decode(data)
    assert len(decoded) == 6 and decoded[0].size == (48, 32) and fps == 10
    metadata = storage.metadata(video.key)
    assert metadata["content_type"] == "video/mp4" and metadata["role"] == "video"
    assert json.loads(metadata["params"])["num_frames"] == 6

    assert (poster.index, poster.role, poster.format, poster.frames) == (1, "poster", "png", None)
    still = Image.open(io.BytesIO(b"".join(storage.open(poster.key))))
    assert still.format == "PNG" and still.size == (48, 32)
    assert list(still.convert("RGB").getdata()) == list(frames[0].getdata())  # the first frame
    assert storage.metadata(poster.key)["content_type"] == "image/png"
