"""Worker tests reuse the service tests' tiny model and settings fixtures."""

from tests.service.conftest import settings_for, tiny_model_dir

__all__ = ["settings_for", "tiny_model_dir"]
