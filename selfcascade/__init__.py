"""Self-cascade diffusion: a low-resolution model reused stage by stage at higher resolutions."""

from selfcascade.library_logs import drop_known_noise

# Before any module of the package imports diffusers, whose import logs the first of them.
drop_known_noise()
