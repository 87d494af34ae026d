"""Tuning the feature upsamplers on high-resolution images (or short clips, for a video model),
with the base model frozen.

One step: random crops x0 at the target size (native size x scale), the pair
(x0, downsample(x0)) encoded by the VAE into z0^r and z0^(r-1), t ~ U{1..K} with K the pivot
timestep, z_t = add_noise(z0^r, eps, t), and the MSE between the UNet's prediction, with the
upsamplers injected from the clean pivot z0^(r-1) (see `selfcascade.tuned`), and the target the
scheduler's `prediction_type` asks for (eps, v, or z0).

A video model (text-to-video or AnimateDiff) tunes on clips (`selfcascade.tuning_clips`): a
sample is a window of consecutive frames with one crop; every frame is downsampled and encoded on
its own, the latents are stacked as the video pipelines lay them out, (B, C, F, H, W), and the
whole window shares one timestep, as every frame of a generated clip does.

Everything random (crop offsets, VAE posterior samples, noise, timesteps) is drawn from one
`torch.Generator` that the run owns, so a run resumed from its training state continues exactly
as an uninterrupted one would.

Ctrl-C saves the training state at the last completed step (loss.jsonl ends there too) and
raises `TuneInterrupted`; a failed write of the run's files is one `InvalidRequest` naming it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet3DConditionModel, UNetMotionModel

from selfcascade.checkpoint import BaseModelIdentity, save_upsamplers
from selfcascade.errors import CheckpointError, InvalidRequest
from selfcascade.folders import replace_file, why_unwritable
from selfcascade.image_files import image_size, load_rgb
from selfcascade.request import PAPER_PIVOT_STRENGTH
from selfcascade.tuned import UPSAMPLERS_FILE, inject_upsamplers
from selfcascade.tuning_clips import TuningClips
from selfcascade.upsamplers import FeatureUpsamplerSet

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STATE_FILE = "training_state.pt"
LOSS_LOG = "loss.jsonl"
# Frames per training window of a video model: enough for the temporal layers to matter, few
# enough that a window at 2x the native size fits next to the frozen UNet.
DEFAULT_CLIP_FRAMES = 8


@dataclass(frozen=True)
class TuneConfig:
    data_dir: Path
    out_dir: Path
    scale: int = 2
    steps: int = 4000
    batch_size: int = 1
    lr: float = 5e-5
    weight_decay: float = 1e-2
    pivot_strength: float = PAPER_PIVOT_STRENGTH
    crop_size: int | None = None  # default: the UNet's native size x scale
    save_every: int = 500
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start again at step 0 over a run already in out_dir
    mixed_precision: bool = True  # only ever used on CUDA
    gradient_checkpointing: bool = False
    # Video models only: frames per training window (None: DEFAULT_CLIP_FRAMES).
    clip_frames: int | None = None

    def validate(self) -> None:
        if self.scale < 2:
            raise InvalidRequest("scale", f"must be an integer >= 2, got {self.scale}")
        if self.steps < 1:
            raise InvalidRequest("steps", f"must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise InvalidRequest("batch_size", f"must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidRequest("lr", f"must be a positive number, got {self.lr}")
        if not 0 < self.pivot_strength <= 1:
            raise InvalidRequest("pivot_strength", f"must be in (0, 1], got {self.pivot_strength}")
        if self.crop_size is not None and self.crop_size < 1:
            # 0 would silently mean the default (hr_size's `or`), and a negative size reach PIL.
            raise InvalidRequest(
                "crop_size", f"must be a positive number of pixels, got {self.crop_size}"
            )
        if self.save_every < 1:
            raise InvalidRequest("save_every", f"must be >= 1, got {self.save_every}")
        if self.clip_frames is not None and self.clip_frames < 1:
            raise InvalidRequest("clip_frames", f"must be >= 1, got {self.clip_frames}")
        if self.resume and self.overwrite:
            raise InvalidRequest("overwrite", "cannot be combined with --resume: pick one")

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues."""
        return {
            "scale": self.scale,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "pivot_strength": self.pivot_strength,
            "crop_size": self.crop_size,
            "seed": self.seed,
            # Resolved: the same folder however it is named. States saved before it was recorded
            # lack it, and resume unchecked (`_refuse_changed_settings`).
            "data": str(Path(self.data_dir).resolve()),
            # Only when set, so image runs saved before video tuning existed still resume.
            **({"clip_frames": self.clip_frames} if self.clip_frames is not None else {}),
        }

    def hr_size(self, native_size: int) -> int:
        """The side of the high-resolution training crops (and of the stage tuned for)."""
        return self.crop_size or native_size * self.scale


def check_paths(config: TuneConfig, *, steps_left: bool = True) -> None:
    """Refuse a missing data folder, an --out that cannot be written, a --resume with no step
    left to train (unless `steps_left` is False: `tune` asks that of the state it loads anyway),
    or a fresh run over an earlier one without --overwrite. Needs no model, so the CLI runs it
    before loading one; `tune` runs it too. Creates --out."""
    data = Path(config.data_dir)
    if not data.is_dir():
        raise InvalidRequest("data", f"{data} is not a directory")
    out = Path(config.out_dir)
    problem = why_unwritable(out)
    if problem:
        raise InvalidRequest("out", f"cannot write into {out}: {problem}")
    if config.resume:
        if steps_left:
            _refuse_finished(out, _saved_step(out / STATE_FILE), config.steps)
    elif not config.overwrite:
        _refuse_to_replace(out)


def _refuse_finished(out: Path, step: int, steps: int) -> None:
    """Nothing left to train: say so rather than report a finished run."""
    if step >= steps:
        raise InvalidRequest(
            "steps",
            f"the run in {out} is already at step {step}; raise --steps above {step} "
            "to train further",
        )


def _refuse_to_replace(out: Path) -> None:
    """A fresh run would silently restart at step 0 over an earlier one in `out`: ask which."""
    state = out / STATE_FILE
    if state.is_file():
        try:
            at = f"at step {_saved_step(state)}"
        except CheckpointError:  # starting again is then the way out: still offer it
            at = f"with an unreadable {STATE_FILE}"
        raise InvalidRequest(
            "out",
            f"{out} already holds a tuning run {at}: pass --resume to continue it, or "
            "--overwrite to start again from step 0",
        )
    if (out / UPSAMPLERS_FILE).exists():
        raise InvalidRequest(
            "out",
            f"{out} already holds {UPSAMPLERS_FILE} (no {STATE_FILE} to resume): pass "
            "--overwrite to replace it, or choose another --out",
        )


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuningImages:
    """Image files (with optional same-name .txt captions), all checked once up front."""

    paths: tuple[Path, ...]
    captions: tuple[str, ...]
    crop_size: int

    @classmethod
    def scan(cls, data_dir: Path, crop_size: int) -> TuningImages:
        if not data_dir.is_dir():
            raise InvalidRequest("data", f"{data_dir} is not a directory")
        paths = sorted(p for p in data_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise InvalidRequest("data", f"no images ({', '.join(IMAGE_SUFFIXES)}) in {data_dir}")
        captions = []
        for path in paths:
            width, height = image_size(path)
            if min(width, height) < crop_size:
                raise InvalidRequest(
                    "data",
                    f"{path} is {width}x{height}, smaller than the {crop_size}x{crop_size} crop",
                )
            caption = path.with_suffix(".txt")
            captions.append(
                caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""
            )
        return cls(tuple(paths), tuple(captions), crop_size)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Random images, random crops: pixels in [-1, 1], shape (B, 3, S, S)."""
        picks = torch.randint(len(self.paths), (batch_size,), generator=generator).tolist()
        crops = []
        for i in picks:
            image = load_rgb(self.paths[i])
            top = int(torch.randint(image.height - self.crop_size + 1, (1,), generator=generator))
            left = int(torch.randint(image.width - self.crop_size + 1, (1,), generator=generator))
            box = (left, top, left + self.crop_size, top + self.crop_size)
            pixels = torch.frombuffer(bytearray(image.crop(box).tobytes()), dtype=torch.uint8)
            pixels = pixels.view(self.crop_size, self.crop_size, 3).permute(2, 0, 1)  # (3, S, S)
            crops.append(pixels.float() / 127.5 - 1.0)
        return torch.stack(crops), [self.captions[i] for i in picks]


# -- one step ----------------------------------------------------------------------------------


@dataclass
class TrainingBatch:
    """Everything one loss evaluation needs, drawn up front so it can be replayed."""

    latents: torch.Tensor  # z0^r, (B, C, H, W); video: (B, C, F, H, W)
    pivot: torch.Tensor  # z0^(r-1), (B, C, H/scale, W/scale); video: (B, C, F, h, w)
    noise: torch.Tensor  # shaped like latents
    timesteps: torch.Tensor  # (B,), in 1..K
    encoder_hidden_states: torch.Tensor  # (B, L, D)
    added_cond_kwargs: dict[str, torch.Tensor] | None = None


@dataclass
class TuningModel:
    """The frozen pipeline's parts the loss uses, plus the training noise schedule."""

    pipe: Any  # a diffusers SD, SDXL, TextToVideoSD or AnimateDiff pipeline
    noise_scheduler: Any = field(init=False)  # a diffusers DDPMScheduler

    def __post_init__(self) -> None:
        # The training schedule is the pipeline's, as DDPM: same betas, same prediction_type.
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        vae = self.pipe.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            # This VAE overflows in fp16 (SDXL's: NaN latents, then NaN losses); tuning only
            # encodes, so it runs in fp32, as diffusers' own pipelines upcast it to decode.
            vae.to(dtype=torch.float32)

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return torch.device(self.pipe.unet.device)

    @property
    def native_size(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def is_video(self) -> bool:
        return isinstance(self.pipe.unet, UNet3DConditionModel | UNetMotionModel)

    def pivot_timestep(self, pivot_strength: float) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps * pivot_strength)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)  # (B, 3, S, S)
        posterior = vae.encode(pixels).latent_dist
        # Drawn on the CPU from the run's generator: the same sample on any device.
        eps = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        latents = posterior.mean + posterior.std * eps  # (B, C, S/f, S/f)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.unet.dtype)

    @torch.no_grad()
    def encode_text(
        self, captions: Sequence[str], size: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        pipe = self.pipe
        if not self.is_sdxl:
            embeds, _ = pipe.encode_prompt(
                list(captions), self.device, 1, do_classifier_free_guidance=False
            )
            return embeds, None
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=list(captions), device=self.device, do_classifier_free_guidance=False
        )
        # SDXL micro-conditioning: original size, crop offset, target size of each crop.
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * len(captions))
        return embeds, {"text_embeds": pooled, "time_ids": time_ids.to(self.device, embeds.dtype)}

    def make_batch(
        self,
        pixels: torch.Tensor,
        captions: Sequence[str],
        scale: int,
        pivot_timestep: int,
        generator: torch.Generator,
    ) -> TrainingBatch:
        size = pixels.shape[-1]
        frames = pixels.shape[1] if pixels.dim() == 5 else None  # video: (B, F, 3, S, S)
        flat = pixels.flatten(0, 1) if frames else pixels  # (B[*F], 3, S, S)
        low = F.interpolate(
            flat, size=(size // scale, size // scale), mode="bicubic", antialias=True
        ).clamp(-1, 1)  # (B[*F], 3, S/scale, S/scale)
        latents = _unflatten_frames(self.encode_images(flat, generator), frames)
        pivot = _unflatten_frames(self.encode_images(low, generator), frames)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.randint(1, pivot_timestep + 1, (len(captions),), generator=generator)
        embeds, added = self.encode_text(captions, size)
        return TrainingBatch(latents, pivot, noise, timesteps.to(self.device), embeds, added)

    def loss(self, upsamplers: FeatureUpsamplerSet, batch: TrainingBatch) -> torch.Tensor:
        sched = self.noise_scheduler
        noisy = sched.add_noise(batch.latents, batch.noise, batch.timesteps)  # like latents
        prediction_type = sched.config.prediction_type
        if prediction_type == "epsilon":
            target = batch.noise
        elif prediction_type == "v_prediction":
            target = sched.get_velocity(batch.latents, batch.noise, batch.timesteps)
        elif prediction_type == "sample":
            target = batch.latents
        else:
            raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")
        text = batch.encoder_hidden_states  # (B, L, D)
        if isinstance(self.unet, UNetMotionModel):
            # AnimateDiff's pipeline hands its UNet one text state per frame; UNet3D repeats itself.
            text = text.repeat_interleave(batch.latents.shape[2], dim=0)  # (B*F, L, D)
        # UNet3DConditionModel's forward has no `added_cond_kwargs` at all: pass it only when set.
        added = {"added_cond_kwargs": batch.added_cond_kwargs} if batch.added_cond_kwargs else {}
        with inject_upsamplers(self.unet, upsamplers, batch.pivot, "per_step"):
            pred = self.unet(
                noisy, batch.timesteps, encoder_hidden_states=text, return_dict=False, **added
            )[0]  # shaped like latents
        return F.mse_loss(pred.float(), target.float())


def _unflatten_frames(latents: torch.Tensor, frames: int | None) -> torch.Tensor:
    """(B*F, C, h, w) -> (B, C, F, h, w), the video pipelines' latent layout; images unchanged."""
    if frames is None:
        return latents
    bf, c, h, w = latents.shape
    return latents.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


# -- the loop ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepReport:
    step: int
    steps: int
    loss: float


@dataclass
class TuneResult:
    upsamplers: FeatureUpsamplerSet
    checkpoint: Path
    start_step: int
    steps: int
    losses: list[float]


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `tune`: the training state in `out_dir` is at `step`, the last step
    completed, and loss.jsonl ends there, for --resume to continue from. A KeyboardInterrupt
    still, for callers that know nothing of tuning; its message is the line `selfcascade`
    prints for it (cli.main)."""

    def __init__(self, step: int, steps: int, out_dir: Path) -> None:
        if step >= steps:  # during the last step's save: nothing left to resume
            said = f"after its last step ({step}); the run is complete, in {out_dir}"
        else:
            said = f"at step {step}; state saved in {out_dir}: rerun with --resume to continue"
        super().__init__(f"interrupted {said}")
        self.step = step
        self.out_dir = out_dir


def tune(
    pipe: Any,
    config: TuneConfig,
    on_step: Callable[[StepReport], None] | None = None,
) -> TuneResult:
    """Train (or resume training) the upsamplers; the base pipeline's weights never change.
    Raises `TuneInterrupted` on Ctrl-C once a step was trained, plain KeyboardInterrupt before."""
    config.validate()
    # A training state is read once, below: the optimizer's moments make it large.
    check_paths(config, steps_left=False)
    model = TuningModel(pipe)
    _check_fits(config, model)
    data = _scan_data(config, model)
    run = _Training.begin(model, config)

    out = Path(config.out_dir)
    start = 0
    if config.resume:
        start = _load_state(out, config, run)
        _refuse_finished(out, start, config.steps)
        logger.info("resuming from step %d", start)
    elif config.overwrite:
        # Gone now, not at the first save: a run stopped before then must not leave the earlier
        # run's state for --resume to continue against the loss log truncated below.
        for name in (STATE_FILE, UPSAMPLERS_FILE):
            with _writing(out / name):
                (out / name).unlink(missing_ok=True)
    _truncate_loss_log(out / LOSS_LOG, start)
    losses = _train(run, data, config, start, on_step)
    return TuneResult(run.upsamplers, out / UPSAMPLERS_FILE, start, config.steps, losses)


def _check_fits(config: TuneConfig, model: TuningModel) -> None:
    """The settings only the model can judge."""
    crop = config.hr_size(model.native_size)
    levels = len(model.unet.config.down_block_types)
    multiple = int(model.pipe.vae_scale_factor) * 2 ** (levels - 1) * config.scale
    if crop % multiple:
        raise InvalidRequest("crop_size", f"must be a multiple of {multiple} px, got {crop}")
    if config.clip_frames is not None and not model.is_video:
        # It would be accepted and unused: an image model trains on single images.
        raise InvalidRequest("clip_frames", "this model makes images, not videos")


def _scan_data(config: TuneConfig, model: TuningModel) -> TuningImages | TuningClips:
    crop = config.hr_size(model.native_size)
    if model.is_video:
        frames = config.clip_frames or DEFAULT_CLIP_FRAMES
        return TuningClips.scan(Path(config.data_dir), crop, frames)
    return TuningImages.scan(Path(config.data_dir), crop)


@dataclass
class _Training:
    """What the steps change, and what a training state holds besides the step."""

    model: TuningModel
    upsamplers: FeatureUpsamplerSet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    amp_dtype: torch.dtype | None
    pivot_timestep: int

    @classmethod
    def begin(cls, model: TuningModel, config: TuneConfig) -> _Training:
        upsamplers = FeatureUpsamplerSet.for_unet(model.unet.config).to(model.device)  # float32
        upsamplers.train()
        optimizer = torch.optim.AdamW(
            upsamplers.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        amp_dtype = _amp_dtype(model.device) if config.mixed_precision else None
        return cls(
            model,
            upsamplers,
            optimizer,
            torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16),
            torch.Generator().manual_seed(config.seed),
            amp_dtype,
            model.pivot_timestep(config.pivot_strength),
        )

    def backward(self, batch: TrainingBatch, step: int) -> float:
        """The loss and its gradients; nothing a training state holds changes yet."""
        device_type = self.model.device.type
        amp = self.amp_dtype
        with torch.autocast(device_type, dtype=amp or torch.float32, enabled=bool(amp)):
            loss = self.model.loss(self.upsamplers, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            # Before the update, so the last saved state is never a poisoned one.
            raise FloatingPointError(f"loss became {value} at step {step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return value

    def update(self) -> None:
        self.scaler.step(self.optimizer)  # float16 only: skips steps whose gradients overflowed
        self.scaler.update()


def _train(
    run: _Training,
    data: TuningImages | TuningClips,
    config: TuneConfig,
    start: int,
    on_step: Callable[[StepReport], None] | None,
) -> list[float]:
    """Steps start+1..config.steps, saved every config.save_every and at the last; on Ctrl-C,
    saved at the last step completed."""
    out = Path(config.out_dir)
    losses: list[float] = []
    done = saved = start  # the last step applied and logged; the step the state file holds
    rng = run.generator.get_state()  # the generator as step `done` left it
    started = time.perf_counter()
    try:
        with (
            _gradient_checkpointing(run.model.unet, config.gradient_checkpointing),
            _loss_log(out / LOSS_LOG) as log,
        ):
            for step in range(start + 1, config.steps + 1):
                pixels, captions = data.sample(config.batch_size, run.generator)
                batch = run.model.make_batch(
                    pixels, captions, config.scale, run.pivot_timestep, run.generator
                )
                value = run.backward(batch, step)
                # Applied and logged whole or not at all: a Ctrl-C waits the moment it takes.
                with _sigint_held() as held:
                    run.update()
                    log({"step": step, "loss": value, "elapsed_s": time.perf_counter() - started})
                    losses.append(value)
                    done, rng = step, run.generator.get_state()
                if held:
                    raise KeyboardInterrupt
                if on_step is not None:
                    on_step(StepReport(step, config.steps, value))
                if step % config.save_every == 0 or step == config.steps:
                    _save_state(out, config, run, step)
                    saved = step
    except KeyboardInterrupt:
        # A step cut short drew crops and noise: un-drawn, so --resume draws them again, as an
        # uninterrupted run would have.
        run.generator.set_state(rng)
        if done > saved:
            # A second Ctrl-C waits for the save: one pressed out of impatience would otherwise
            # throw away the steps the first one is saving.
            with _sigint_held():
                _save_state(out, config, run, done)
        if done == 0:
            raise  # nothing trained, nothing to resume
        raise TuneInterrupted(done, config.steps, out) from None
    return losses


@contextmanager
def _sigint_held() -> Iterator[list[int]]:
    """Ctrl-C inside the block is noted in the list it yields, not raised there, so what the block
    changes it changes whole. Only where Python's own handler would raise KeyboardInterrupt: in
    the main thread (the only one signals reach), with no other handler installed."""
    held: list[int] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield held
        return
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def _loss_log(path: Path) -> Iterator[Callable[[dict[str, Any]], None]]:
    """Appends one JSON line per step to `path`, flushed at once."""
    with _writing(path):
        file = path.open("a", encoding="utf-8")

    def append(record: dict[str, Any]) -> None:
        with _writing(path):
            file.write(json.dumps(record) + "\n")
            file.flush()

    try:
        yield append
    except BaseException:
        # A line that failed to write is still buffered, and closing would fail on it again,
        # in place of the error already on its way.
        with contextlib.suppress(OSError):
            file.close()
        raise
    with _writing(path):
        file.close()


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A failed write of one of the run's files (a full disk, a folder in its way) is the user's
    to fix: one line naming the file and the system's reason, as `generate` reports its --out."""
    try:
        yield
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
        raise InvalidRequest("out", f"cannot write {path}: {reason}") from None


@contextmanager
def _gradient_checkpointing(unet: Any, enabled: bool) -> Iterator[None]:
    """Recompute the HR pass's activations in backward (for large crops); undone after."""
    if not enabled:
        yield
        return
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None  # CPU autocast is slower than float32 for these convolutions
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _save_state(out: Path, config: TuneConfig, run: _Training, step: int) -> None:
    """Weights for serving, then the full training state; each file replaced atomically."""
    with _writing(out / UPSAMPLERS_FILE):
        save_upsamplers(
            out / UPSAMPLERS_FILE,
            run.upsamplers,
            run.model.unet,
            scale=config.scale,
            pivot_timestep=run.pivot_timestep,
            hr_size=config.hr_size(run.model.native_size),
            extra={"tuning_step": str(step)},
        )
    state = {
        "step": step,
        "resume_key": json.dumps(config.resume_key()),
        "base_config_sha256": BaseModelIdentity.of(run.model.unet).config_sha256,
        "upsamplers": {k: v.detach().cpu() for k, v in run.upsamplers.state_dict().items()},
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "generator": run.generator.get_state(),
    }
    # Into memory first, not torch.save(path): its zip writer reports a full disk as a
    # RuntimeError ("unexpected pos"), where Python's own write says ENOSPC.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with _writing(out / STATE_FILE):
        replace_file(out / STATE_FILE, buffer.getvalue())
    logger.info("saved tuning state at step %d to %s", step, out)


def _load_state(out: Path, config: TuneConfig, run: _Training) -> int:
    path = out / STATE_FILE
    state = _read_state(path)
    if state.get("base_config_sha256") != BaseModelIdentity.of(run.model.unet).config_sha256:
        raise CheckpointError(f"training state {path} was made for another base model")
    try:
        saved_key = json.loads(state["resume_key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if not isinstance(saved_key, dict):
        raise _unreadable(path, None)
    _refuse_changed_settings(path, saved_key, config, run.model.native_size)
    try:
        run.upsamplers.load_state_dict(state["upsamplers"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.scaler.load_state_dict(state["scaler"])
        run.generator.set_state(state["generator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # torch's own: multi-line
        raise _unreadable(path, exc) from None
    return int(state["step"])


def _refuse_changed_settings(
    path: Path, saved_key: dict[str, Any], config: TuneConfig, native_size: int
) -> None:
    # The settings as used, on both sides: a run that left one to its default (None) and one
    # naming that same default are the same run.
    saved = _as_used(saved_key, native_size)
    key = _as_used(config.resume_key(), native_size)
    if "data" not in saved:  # saved before the data folder was recorded: taken on trust
        key.pop("data")
    if saved == key:
        return
    changed = sorted(k for k in saved.keys() | key.keys() if saved.get(k) != key.get(k))
    was = f"; its --data was {saved['data']}" if "data" in changed else ""
    raise CheckpointError(
        f"cannot resume {path}: settings changed since it was saved ({', '.join(changed)}){was}"
    )


def _saved_step(path: Path) -> int:
    """The step a training state was saved at, read without reading its tensors: the checks
    before a run ask only that, and a large model's optimiser moments run to gigabytes."""
    return int(_read_state(path, mmap=True)["step"])


def _read_state(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no training state at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises several types for corrupt or truncated files
        raise _unreadable(path, exc) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _unreadable(path, None)
    return state


def _unreadable(path: Path, exc: Exception | None) -> CheckpointError:
    """One line: torch's reasons run to paragraphs (weights_only's "please file an issue")."""
    if exc is not None:
        logger.debug("reading %s failed", path, exc_info=exc)
    return CheckpointError(
        f"cannot resume: {path} is not a training state this release can read (corrupt, "
        "truncated, or not written by `selfcascade tune`)"
    )


def _as_used(key: dict[str, Any], native_size: int) -> dict[str, Any]:
    used = {**key, "clip_frames": key.get("clip_frames") or DEFAULT_CLIP_FRAMES}
    if key.get("crop_size") is None and "scale" in key:
        used["crop_size"] = native_size * int(key["scale"])
    return used


def _truncate_loss_log(path: Path, step: int) -> None:
    """Drop log lines past `step`: they belong to steps the resumed run will redo."""
    if not path.is_file():
        return
    with _writing(path):
        text = path.read_text(encoding="utf-8")
        kept = []
        for line in text.splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a half-written last line from an interruption
        truncated = "".join(f"{line}\n" for line in kept)
        if truncated != text:  # replaced whole: a full disk must not leave it empty
            replace_file(path, truncated.encode())
