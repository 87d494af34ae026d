"""diffusers' and transformers' log lines that tell a user of this project nothing.

Two warnings appear on every model load here, in the CLI's output and in every worker's log:
transformers falling back to its PIL image processors because torchvision is not installed (they
are what Stable Diffusion's feature extractor always used; this project does not install
torchvision), and diffusers warning that casting "modules that should be kept in float32: []"
may be inconsistent when the list is empty (the engine's stage pipelines share the resident
modules at their own dtype, a cast that changes nothing). Both are dropped by filters on the
loggers that emit them; every other line, a non-empty float32 list included, passes.
`quiet_libraries` goes further for the command-line tools: errors only, no progress bars.
"""

from __future__ import annotations

import logging

_NOISE = {
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
}


class _DropLines(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def drop_known_noise() -> None:
    """Install the filters (once; they must be in place before diffusers is imported, which
    the package's __init__ sees to)."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(fragments))


def quiet_libraries() -> None:
    """Errors only and no progress bars from diffusers and transformers: for command-line tools
    whose own output is the point. A client-only install has neither library: nothing to do."""
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
