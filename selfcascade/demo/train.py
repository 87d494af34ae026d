"""Train the demo text-to-image model on the shapes data set; writes a diffusers SD folder.

    python -m selfcascade.demo.train --out models/demo --steps 6000 --size 64 --seed 0
    python -m selfcascade.demo.train --out models/demo --device cuda --batch-size 128 ...

Cost, measured on the shared 2-core CPU this was written on (one torch thread, other test runs
beside it): VAE phase 1.3-1.8 it/s (batch 16), UNet phase 1.6-2.2 it/s (batch 32). The
defaults (1,500 + 6,000 steps, 16,384 encoded renders) therefore take about 60-80 minutes.

Two phases, both reproducible from `--seed` (data by example index, noise by owned generators):

1. The VAE (factor 4) learns to reconstruct renders, drawn fresh every step.
2. A fixed set of `--dataset-size` renders is encoded once (posterior mean and log-variance are
   cached, a latent is sampled from them every time it is used), then the UNet and the text
   encoder learn epsilon-prediction on it, the caption dropped to "" with probability
   `--caption-dropout` so classifier-free guidance works. An exponential moving average of the
   weights is what gets saved.

Every `--checkpoint-every` steps the pipeline is saved (safetensors) to `--out` and the training
state to `<out>-checkpoint/state.pt`, from which `--resume` continues.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTokenizer

from selfcascade.demo import models
from selfcascade.demo.shapes import render, sample_example
from selfcascade.demo.tokenizer import build_word_tokenizer
from selfcascade.stage_runtime import synchronize_device

log = logging.getLogger(__name__)

# The VAE phase draws its renders from a stream of its own, disjoint from the UNet's data set.
VAE_DATA_STREAM = 1_000_003
# Min-SNR loss weighting (Hang et al. 2023): stops the near-noiseless timesteps from dominating.
MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True)
class TrainConfig:
    out: Path
    steps: int = 6000
    vae_steps: int = 1500
    size: int = models.NATIVE_SIZE
    seed: int = 0
    batch_size: int = 32
    vae_batch_size: int = 16
    dataset_size: int = 16384
    learning_rate: float = 5e-4
    vae_learning_rate: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    vae_kl_weight: float = 1e-6
    checkpoint_every: int = 500
    log_every: int = 25
    # One thread: on a shared 2-core machine a second one mostly adds contention.
    threads: int = 1
    device: str = "auto"
    # Seconds for the UNet phase (0: no limit). After the warm-up the step rate is measured and
    # the run (and its cosine schedule) shortened to fit; the log and the saved model card
    # say how many steps that was, so `--steps N` reproduces it.
    time_budget_s: float = 0.0
    # A saved demo model folder to start from: its VAE is kept (phase 1 is skipped) and its UNet
    # and text encoder are trained further under a fresh schedule ("" = train from scratch).
    init_from: str = ""

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out.with_name(self.out.name + "-checkpoint")


@dataclass
class LatentDataset:
    """Encoded renders: SD-scaled posterior mean and log-variance, and the captions."""

    mean: torch.Tensor  # (N, 4, h, w)
    logvar: torch.Tensor  # (N, 4, h, w)
    captions: list[str]
    # Tokenised once: a tokenizer call per step costs more than a GPU training step.
    input_ids: torch.Tensor  # (N, L)
    empty_ids: torch.Tensor  # (L,) the dropped caption ""


def render_batch(seed: int, start: int, count: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Examples start..start+count-1 of the data set `seed`, as images in [-1, 1]."""
    images, captions = [], []
    for index in range(start, start + count):
        caption, scene = sample_example(seed, index)
        images.append(np.asarray(render(scene, size), dtype=np.float32))
        captions.append(caption.text)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W)
    return pixels / 127.5 - 1.0, captions


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(step / max(total, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# -- phase 1: the VAE ------------------------------------------------------------------------


def train_vae(vae: AutoencoderKL, config: TrainConfig, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, config.warmup_steps, config.vae_steps)
    )
    vae.train()
    started = time.perf_counter()
    for step in range(1, config.vae_steps + 1):
        pixels, _ = render_batch(
            config.seed + VAE_DATA_STREAM, step * config.vae_batch_size, config.vae_batch_size,
            config.size,
        )
        pixels = pixels.to(config.torch_device)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        # L1 keeps edges sharp where MSE alone would blur them; KL only keeps latents tame.
        loss = (
            F.l1_loss(reconstruction, pixels)
            + F.mse_loss(reconstruction, pixels)
            + config.vae_kl_weight * posterior.kl().mean()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Without clipping, lr 1e-3 gave occasional loss spikes (0.03 -> 0.19) mid-run.
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % config.log_every == 0 or step == config.vae_steps:
            _log_progress("vae", step, config.vae_steps, loss.item(), started)
    vae.eval().requires_grad_(False)


@torch.inference_mode()
def encode_dataset(
    vae: AutoencoderKL, tokenizer: CLIPTokenizer, config: TrainConfig, chunk: int = 64
) -> LatentDataset:
    means, logvars, captions = [], [], []
    for start in range(0, config.dataset_size, chunk):
        count = min(chunk, config.dataset_size - start)
        pixels, texts = render_batch(config.seed, start, count, config.size)
        posterior = vae.encode(pixels.to(config.torch_device)).latent_dist
        means.append(posterior.mean)
        logvars.append(posterior.logvar)
        captions.extend(texts)
    mean, logvar = torch.cat(means), torch.cat(logvars)
    # SD's convention: latents scaled to unit variance, the factor stored in the VAE config.
    scaling = 1.0 / float(mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log.info("encoded %d renders; latent scaling factor %.4f", len(captions), scaling)
    return LatentDataset(
        mean * scaling,
        logvar + 2 * math.log(scaling),
        captions,
        input_ids=tokenize(tokenizer, captions).to(config.torch_device),
        empty_ids=tokenize(tokenizer, [""])[0].to(config.torch_device),
    )


# -- phase 2: the denoiser -------------------------------------------------------------------


class EMA:
    """An exponential moving average of a module's weights, with the usual warm-up."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        # One fused call, not a kernel launch per parameter (they dominate a GPU step).
        torch._foreach_lerp_(
            list(self.shadow.parameters()), list(module.parameters()), 1 - decay
        )


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # (B, L)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return snr.clamp(max=MIN_SNR_GAMMA) / snr  # (B,)


class DenoiserTraining:
    """The UNet and text encoder, their optimiser and EMA: one `step()` per batch."""

    def __init__(self, tokenizer: CLIPTokenizer, config: TrainConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.device = config.torch_device
        self.unet = models.build_unet(config.size // models.VAE_FACTOR).to(self.device)
        self.text_encoder = models.build_text_encoder(tokenizer).to(self.device)
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
        # Mutable: a time budget may shorten the run once the step rate is known.
        self.total_steps = config.steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, config.warmup_steps, self.total_steps)
        )
        self.noise_scheduler = models.build_training_scheduler()
        self.ema_unet = EMA(self.unet, config.ema_decay)
        self.ema_text = EMA(self.text_encoder, config.ema_decay)

    def step(self, data: LatentDataset, step: int, generator: torch.Generator) -> torch.Tensor:
        """One optimiser step; returns the loss as a device tensor (reading it syncs)."""
        cfg, device = self.config, self.device
        # Every random draw comes from the one CPU generator: the same run on any device.
        picks = torch.randint(len(data.captions), (cfg.batch_size,), generator=generator)
        mean, logvar = data.mean[picks.to(device)], data.logvar[picks.to(device)]
        noise_in_latent = torch.randn(mean.shape, generator=generator).to(device)
        latents = mean + (0.5 * logvar).exp() * noise_in_latent  # (B, 4, h, w)
        dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        input_ids = torch.where(
            dropped.to(device)[:, None], data.empty_ids, data.input_ids[picks.to(device)]
        )  # (B, L)
        noise = torch.randn(latents.shape, generator=generator).to(device)  # (B, 4, h, w)
        timesteps = torch.randint(
            self.noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator
        )
        weights = min_snr_weights(self.noise_scheduler.alphas_cumprod, timesteps).to(device)
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        text = self.text_encoder(input_ids)[0]  # (B, L, D)
        prediction = self.unet(noisy, timesteps, text).sample
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weights * per_sample).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [*self.unet.parameters(), *self.text_encoder.parameters()], 1.0
        )
        self.optimizer.step()
        self.schedule.step()
        self.ema_unet.update(self.unet, step)
        self.ema_text.update(self.text_encoder, step)
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "ema_unet": self.ema_unet.shadow.state_dict(),
            "ema_text": self.ema_text.shadow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.ema_unet.shadow.load_state_dict(state["ema_unet"])
        self.ema_text.shadow.load_state_dict(state["ema_text"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])


# -- the run ---------------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    """Run both phases (or resume), save the pipeline to `config.out`, and return that path."""
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = build_word_tokenizer()
    state_path = config.checkpoint_dir / "state.pt"
    resumed = _load_state(state_path) if state_path.exists() else None
    with torch.random.fork_rng():
        # Module initialisation draws from the global RNG: seed it inside a fork, not globally.
        torch.manual_seed(config.seed)
        vae = models.build_vae().to(config.torch_device)
        training = DenoiserTraining(tokenizer, config)
    if resumed is None and config.init_from:
        _initialise_from(Path(config.init_from), vae, training)
        start = 1
    elif resumed is None:
        train_vae(vae, config, generator)
        start = 1
    else:
        vae.load_state_dict(resumed["vae"])
        vae.eval().requires_grad_(False)
        training.load_state_dict(resumed["training"])
        generator.set_state(resumed["generator"])
        start = resumed["step"] + 1
        log.info("resumed from %s at step %d", state_path, start)
    data = encode_dataset(vae, tokenizer, config)
    training.unet.train()
    training.text_encoder.train()
    started = time.perf_counter()
    step = start
    while step <= training.total_steps:
        loss = training.step(data, step, generator)
        if step == start + config.warmup_steps and config.time_budget_s > 0:
            _fit_to_budget(training, config, start, step, time.perf_counter() - started)
        if step % config.log_every == 0 or step == training.total_steps:
            _log_progress("unet", step, training.total_steps, loss.item(), started, first=start)
        if step % config.checkpoint_every == 0 or step == training.total_steps:
            save_pipeline(vae, training, tokenizer, config.out)
            _save_state(state_path, vae, training, generator, step, config)
        step += 1
    if start > training.total_steps:
        save_pipeline(vae, training, tokenizer, config.out)
    return config.out


def _fit_to_budget(
    training: DenoiserTraining, config: TrainConfig, start: int, step: int, seconds: float
) -> None:
    synchronize_device(training.device)  # the rate must count the queued GPU work too
    rate = (step - start + 1) / max(seconds, 1e-9)
    fitting = start - 1 + int(config.time_budget_s * rate)
    if fitting < training.total_steps:
        training.total_steps = max(fitting, step + 1)
        log.info(
            "time budget %.0f s at %.1f it/s: the UNet phase runs %d steps (reproduce it with "
            "--steps %d)", config.time_budget_s, rate, training.total_steps, training.total_steps,
        )


def _initialise_from(folder: Path, vae: AutoencoderKL, training: DenoiserTraining) -> None:
    """Weights of a saved demo model into the freshly built modules (and the EMA copies)."""
    saved = StableDiffusionPipeline.from_pretrained(folder)
    vae.load_state_dict(saved.vae.state_dict())
    vae.eval().requires_grad_(False)
    for module, ema, name in (
        (training.unet, training.ema_unet, "unet"),
        (training.text_encoder, training.ema_text, "text_encoder"),
    ):
        weights = getattr(saved, name).state_dict()
        module.load_state_dict(weights)
        ema.shadow.load_state_dict(weights)
    log.info("initialised from %s (VAE kept, phase 1 skipped)", folder)


def save_pipeline(
    vae: AutoencoderKL, training: DenoiserTraining, tokenizer: CLIPTokenizer, out: Path
) -> StableDiffusionPipeline:
    pipe = models.assemble_pipeline(
        vae, training.ema_text.shadow, tokenizer, training.ema_unet.shadow
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return pipe


def _save_state(
    path: Path,
    vae: AutoencoderKL,
    training: DenoiserTraining,
    generator: torch.Generator,
    step: int,
    config: TrainConfig,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "vae": vae.state_dict(),
        "vae_scaling_factor": vae.config.scaling_factor,
        "training": training.state_dict(),
        "generator": generator.get_state(),
        "config": {k: str(v) for k, v in asdict(config).items()},
    }
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)  # a crash mid-save never leaves a truncated checkpoint


def _load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _log_progress(
    phase: str, step: int, total: int, loss: float, started: float, first: int = 1
) -> None:
    rate = (step - first + 1) / max(time.perf_counter() - started, 1e-9)
    remaining = (total - step) / rate
    log.info(
        "%s step %d/%d loss %.4f  %.2f it/s  ~%.0f s left", phase, step, total, loss, rate,
        remaining,
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig(out=Path("models/demo"))
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--resume", action="store_true", help="continue from <out>-checkpoint")
    for name, value in asdict(defaults).items():
        if name != "out":
            parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    config = replace(defaults, **args)
    if not resume and config.checkpoint_dir.exists():
        parser.error(f"{config.checkpoint_dir} exists: pass --resume or remove it")
    return config


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = parse_args(argv)
    torch.set_num_threads(config.threads)
    out = train(config)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
