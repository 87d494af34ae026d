"""Write rendered shapes as an image folder (`NNNNN.png` + same-name `.txt` caption).

This is the format `selfcascade tune --data DIR` reads: the demo model's 2x upsamplers are tuned
on renders at twice its native size, drawn from a seed the base model never trained on.

    python -m selfcascade.demo.export --out data/shapes-128 --size 128 --count 2000 --seed 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selfcascade.demo.shapes import render, sample_example

TUNING_SEED = 1  # the base model trains on seed 0; ShapesBench draws its own pairs


def write_image_folder(out: Path, size: int, count: int, seed: int = TUNING_SEED) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        caption, scene = sample_example(seed, index)
        stem = out / f"{index:05d}"
        render(scene, size).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption.text + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=TUNING_SEED)
    args = parser.parse_args(argv)
    write_image_folder(args.out, args.size, args.count, args.seed)
    print(f"wrote {args.count} renders of {args.size}x{args.size} px to {args.out}")


if __name__ == "__main__":
    main()
