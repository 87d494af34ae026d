"""Kernel-level GPU measurements behind issue #8's two remaining levers.

The 2048^2 stage is 80% of a self-cascade's time and attention is 74% of its arithmetic
(bench/GPU_NOTES.md), so the only road below the cascade's 0.80x FLOP floor is a faster
attention kernel than the one stock diffusers gets. This script answers, in under two minutes
of a lent GPU:

1. `attention`: each SDPA backend forced alone (FlashAttention-2, memory-efficient, cuDNN) on
   the attention shapes of the SD2.1 / SDXL stages: median ms, TFLOP/s, and the largest
   difference from the flash output (a backend that is fast but wrong is no lever);
2. `unet`: one UNet call (batch 2, as with classifier-free guidance) at the stage sizes, eager
   with SDPA's own choice, eager with each other backend preferred, and `torch.compile`d (one
   graph per size, `dynamic=False`; compile seconds recorded, the compiled output compared with
   the eager one). Compiling stops being started once the time budget is spent.

    python bench/gpu_kernels.py --out $OUT/gpu_kernels.json   # on the lent GPU
    .venv/bin/python bench/gpu_kernels.py --tiny               # the same code on a CPU

It writes JSON after every row (a killed run keeps what it measured) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from selfcascade.public_architectures import SD21_BASE_UNET

RESULTS = Path(__file__).parent / "results" / "gpu_kernels.json"
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: (batch, heads, query tokens, key tokens, head dim)."""

    name: str
    batch: int
    heads: int
    queries: int
    keys: int
    head_dim: int = 64
    # diffusers' attention processors hand SDPA (B, L, H, D) projections transposed to
    # (B, H, L, D): not contiguous, which some kernels take slower or not at all.
    contiguous: bool = False

    @property
    def tflop(self) -> float:
        # Two matmuls (QK^T and PV), two FLOPs a multiply-add.
        return 4 * self.batch * self.heads * self.queries * self.keys * self.head_dim / 1e12


# Latent side = pixels / 8; SD2.1's first level has 5 heads of 64, its second 10; SDXL attends
# at its second (10 heads) and third (20 heads) levels only. Batch 2: guidance.
SHAPES = (
    AttentionShape("sd21 2048 level 1 self", 2, 5, 256 * 256, 256 * 256),
    AttentionShape("same, contiguous", 2, 5, 256 * 256, 256 * 256, contiguous=True),
    AttentionShape("sd21 2048 level 1 cross", 2, 5, 256 * 256, 77),
    AttentionShape("sd21 2048 level 2 self", 2, 10, 128 * 128, 128 * 128),
    AttentionShape("sd21 1024 level 1 self", 2, 5, 128 * 128, 128 * 128),
    AttentionShape("sdxl 4096 level 2 self", 2, 10, 256 * 256, 256 * 256),
    AttentionShape("sdxl 2048 level 3 self", 2, 20, 64 * 64, 64 * 64),
)
TINY_SHAPES = (AttentionShape("tiny self", 2, 2, 256, 256, 16),
               AttentionShape("tiny self, contiguous", 2, 2, 256, 256, 16, contiguous=True),
               AttentionShape("tiny cross", 2, 2, 256, 77, 16))
UNET_CASES = (("sd21-base", SD21_BASE_UNET, (2048, 1024)),)  # 2048 first: it matters most
# diffusers' own test size (selfcascade/tiny_models.py), with SD's cross-attention.
TINY_UNET = {
    "block_out_channels": (4, 8), "layers_per_block": 1, "norm_num_groups": 2,
    "in_channels": 4, "out_channels": 4, "cross_attention_dim": 32,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
TINY_UNET_CASES = (("tiny-sd", TINY_UNET, (128,)),)


@contextmanager
def preferring(backend: SDPBackend) -> Iterator[None]:
    """SDPA tries `backend` first, then the others (also bench/gpu.py's `*_attention`)."""
    rest = [b for b in (*BACKENDS.values(), SDPBackend.MATH) if b != backend]
    with sdpa_kernel([backend, *rest], set_priority=True):
        yield


@dataclass
class Report:
    device: str
    torch: str
    dtype: str
    attention: list[dict[str, Any]] = field(default_factory=list)
    unet: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def timed_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of `fn` after `warmup` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def bench_attention(shape: AttentionShape, device: torch.device, dtype: torch.dtype,
                    reps: int) -> list[dict[str, Any]]:
    """Every backend forced alone on `shape`; an unsupported one is recorded with its reason."""
    generator = torch.Generator(device).manual_seed(0)

    def tensor(tokens: int) -> torch.Tensor:
        if shape.contiguous:
            return torch.randn(shape.batch, shape.heads, tokens, shape.head_dim,
                               device=device, dtype=dtype, generator=generator)
        return torch.randn(shape.batch, tokens, shape.heads, shape.head_dim, device=device,
                           dtype=dtype, generator=generator).transpose(1, 2)

    q, k, v = tensor(shape.queries), tensor(shape.keys), tensor(shape.keys)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH, *BACKENDS.values()]):
        reference = F.scaled_dot_product_attention(q, k, v)  # SDPA's own choice
    rows = []
    for name, backend in BACKENDS.items():
        row: dict[str, Any] = {"shape": shape.name, "backend": name, **asdict(shape)}

        def call(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        try:
            with torch.no_grad():
                out = call()
                row["max_abs_diff_vs_default"] = float((out - reference).abs().max())
                row["ms"] = timed_ms(call, device, warmup=2, reps=reps)
            row["tflop_per_s"] = shape.tflop / (row["ms"] / 1e3)
        except RuntimeError as exc:  # this backend does not take these inputs here
            row["unsupported"] = str(exc).splitlines()[0][:200]
        rows.append(row)
    return rows


def unet_inputs(config: dict[str, Any], size: int, device: torch.device,
                dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What a pipeline passes the UNet at one guided step of a `size`^2 image."""
    latent = size // 8
    sample = torch.randn(2, config["in_channels"], latent, latent, device=device, dtype=dtype)
    states = torch.randn(2, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    kwargs: dict[str, Any] = {"encoder_hidden_states": states, "return_dict": False}
    if config.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device,
                                     dtype=dtype),
        }
    return (sample, torch.tensor(500, device=device)), kwargs


def bench_unet(architecture: str, config: dict[str, Any], sizes: tuple[int, ...],
               report: Report, args: argparse.Namespace, deadline: float) -> None:
    device, dtype = torch.device(args.device), args.torch_dtype
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config).to(dtype).eval().requires_grad_(False)
    compiled = torch.compile(unet, dynamic=False)  # one graph per size, as a worker would keep
    for size in sizes:
        bench_unet_size(unet, compiled, architecture, unet_inputs(config, size, device, dtype),
                        size, report, args, deadline)
    del unet, compiled
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_unet_size(unet: Any, compiled: Any, architecture: str,
                    inputs: tuple[tuple[Any, ...], dict[str, Any]], size: int, report: Report,
                    args: argparse.Namespace, deadline: float) -> None:
    device = torch.device(args.device)
    call_args, kwargs = inputs

    def record(variant: str, fn: Callable[[], Any], **extra: Any) -> None:
        with torch.no_grad():
            ms = timed_ms(fn, device, warmup=2, reps=args.reps)
        row = {"architecture": architecture, "size": size, "variant": variant, "ms": ms, **extra}
        report.unet.append(row)
        report.save(args.out)
        print(f"unet {architecture} {size} {variant}: {ms:.1f} ms", flush=True)

    record("eager", lambda: unet(*call_args, **kwargs))
    for name, backend in BACKENDS.items():

        def preferred(backend: SDPBackend = backend) -> Any:
            with preferring(backend):
                return unet(*call_args, **kwargs)

        record(f"eager, {name} preferred", preferred)
    if args.no_compile or time.perf_counter() > deadline:
        reason = "--no-compile" if args.no_compile else "over the budget"
        report.skipped.append(f"{architecture} {size} compiled: {reason}")
        return
    with torch.no_grad():
        eager_out = unet(*call_args, **kwargs)[0]
        started = time.perf_counter()
        compiled_out = compiled(*call_args, **kwargs)[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    compile_s = time.perf_counter() - started
    diff = float((compiled_out.float() - eager_out.float()).abs().max())
    record("torch.compile", lambda: compiled(*call_args, **kwargs), compile_s=compile_s,
           max_abs_diff_vs_eager=diff)


def print_table(report: Report) -> None:
    print(f"\n{report.device}, {report.dtype}, torch {report.torch}")
    print(f"{'attention shape':<26} {'backend':<10} {'ms':>8} {'TFLOP/s':>8} {'max diff':>9}")
    for r in report.attention:
        if "unsupported" in r:
            print(f"{r['shape']:<26} {r['backend']:<10} unsupported: {r['unsupported'][:60]}")
            continue
        print(f"{r['shape']:<26} {r['backend']:<10} {r['ms']:>8.2f} {r['tflop_per_s']:>8.1f}"
              f" {r['max_abs_diff_vs_default']:>9.2g}")
    print(f"\n{'UNet call (batch 2)':<26} {'variant':<24} {'ms':>8} {'/eager':>7} extra")
    eager = {(r["architecture"], r["size"]): r["ms"] for r in report.unet
             if r["variant"] == "eager"}
    for r in report.unet:
        extra = (f"compile {r['compile_s']:.0f}s, max diff {r['max_abs_diff_vs_eager']:.2g}"
                 if "compile_s" in r else "")
        ratio = r["ms"] / eager[(r["architecture"], r["size"])]
        print(f"{r['architecture'] + ' ' + str(r['size']):<26} {r['variant']:<24}"
              f" {r['ms']:>8.1f} {ratio:>7.3f} {extra}")
    for skipped in report.skipped:
        print(f"skipped: {skipped}")


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (tests the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="no compilation starts after this many seconds")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    # Half precision on a CPU is slow and not what runs there.
    args.torch_dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    deadline = time.perf_counter() + args.budget_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = Report(name, torch.__version__, str(args.torch_dtype).removeprefix("torch."))
    for shape in TINY_SHAPES if args.tiny else SHAPES:
        report.attention += bench_attention(shape, device, args.torch_dtype, args.reps)
        report.save(args.out)
    for architecture, config, sizes in TINY_UNET_CASES if args.tiny else UNET_CASES:
        bench_unet(architecture, config, sizes, report, args, deadline)
    report.save(args.out)
    print_table(report)
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
