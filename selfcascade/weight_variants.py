"""Weight-file variants ("fp16": SDXL's `*.fp16.safetensors`): the names the CLI's --variant and
a models file's "variant" accept, checked before any model loads."""

from __future__ import annotations

import argparse
import re

# What diffusers puts between a weight file's name and its suffix: no dots, no path separators.
VARIANT_PATTERN = r"^[A-Za-z0-9_-]{1,32}$"
VARIANT_RULE = "letters, digits, '-' or '_', at most 32 of them (e.g. fp16)"


def variant_problem(value: str) -> str | None:
    """Why `value` cannot name a variant, or None."""
    if re.fullmatch(VARIANT_PATTERN, value):
        return None
    return f"{value!r} is not a variant name: {VARIANT_RULE}"


def parse_variant(value: str) -> str:
    """argparse's `type` for --variant: refused at parsing, before the model loads."""
    problem = variant_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value
