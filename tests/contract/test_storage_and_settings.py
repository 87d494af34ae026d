"""Local storage, object keys, and settings/models-file parsing (no network)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from contract.settings import ModelsFileError, Settings, load_model_specs
from contract.storage import build_storage, object_key
from contract.storage.local import LocalResultStorage


def test_object_keys_come_from_job_ids_only() -> None:
    assert object_key("a" * 32, 0, "png") == "a" * 32 + "/0.png"
    for bad in ("../../etc/passwd", "A" * 32, "a" * 31, "a" * 32 + "/x"):
        with pytest.raises(ValueError):
            object_key(bad, 0, "png")
    with pytest.raises(ValueError):
        object_key("a" * 32, 0, "exe")


def test_local_storage_round_trip_and_expiry(tmp_path: Path) -> None:
    storage = LocalResultStorage(tmp_path / "results")
    storage.check()
    key = object_key("b" * 32, 0, "png")
    stored = storage.put(key, b"image-bytes", "image/png", {"seed": "9"})
    assert stored.bytes == 11
    assert b"".join(storage.open(key)) == b"image-bytes"
    assert storage.metadata(key)["seed"] == "9"
    with pytest.raises(FileNotFoundError):
        storage.open("../outside.png")

    old = time.time() - 100
    os.utime(tmp_path / "results" / key, (old, old))
    assert storage.delete_older_than(time.time() - 1000) == 0
    assert storage.delete_older_than(time.time() - 10) == 1
    with pytest.raises(FileNotFoundError):
        storage.open(key)
    assert not (tmp_path / "results" / ("b" * 32)).exists()


def test_settings_from_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFCASCADE_REDIS_URL", "redis://example:1/2")
    monkeypatch.setenv("SELFCASCADE_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("PORT", "9123")
    settings = Settings()
    assert settings.redis_url == "redis://example:1/2"
    assert settings.port == 9123
    assert type(build_storage(settings)).__name__ == "S3ResultStorage"
    monkeypatch.delenv("SELFCASCADE_REDIS_URL")
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/0")
    assert Settings().redis_url == "redis://plain:6379/0"


def test_models_file_and_default(tmp_path: Path) -> None:
    default = load_model_specs(Settings(data_dir=tmp_path))
    assert [m.name for m in default] == ["tiny"]
    assert default[0].path == str(tmp_path / "models" / "tiny")

    models = tmp_path / "models.json"
    models.write_text(json.dumps([
        {"name": "sd21", "path": "stabilityai/stable-diffusion-2-1-base", "native_width": 512,
         "native_height": 512, "size_multiple": 64, "upsamplers": "ups.safetensors",
         "dtype": "float16", "device": "cuda"},
    ]))
    [spec] = load_model_specs(Settings(models_file=models))
    assert (spec.name, spec.native_width, spec.upsamplers) == ("sd21", 512, ["ups.safetensors"])

    # Several upsampler sets, one per stage size; null or absent means tuning-free only.
    models.write_text(json.dumps([
        {"name": "a", "path": "x", "native_width": 64, "native_height": 64,
         "upsamplers": ["ups-128.safetensors", "ups-256.safetensors"]},
        {"name": "b", "path": "x", "native_width": 64, "native_height": 64, "upsamplers": None},
        {"name": "c", "path": "x", "native_width": 64, "native_height": 64},
    ]))
    a, b, c = load_model_specs(Settings(models_file=models))
    assert a.upsamplers == ["ups-128.safetensors", "ups-256.safetensors"]
    assert b.upsamplers == c.upsamplers == []

    models.write_text(json.dumps([{"name": "bad name!", "path": "x", "native_width": 1,
                                   "native_height": 1}]))
    with pytest.raises(ModelsFileError, match=r"entry 0 \('bad name!'\): name: String should"):
        load_model_specs(Settings(models_file=models))

    models.write_text(json.dumps([{"name": "sdxl", "path": "x", "native_width": 1,
                                   "native_height": 1, "variant": "fp 16"}]))
    with pytest.raises(ModelsFileError, match=(
        r"entry 0 \('sdxl'\): variant: Value error, 'fp 16' is not a variant name: letters, "
        r"digits, '-' or '_', at most 32 of them \(e\.g\. fp16\)"
    )):
        load_model_specs(Settings(models_file=models))


ENTRY = {"name": "demo", "path": "x", "native_width": 64, "native_height": 64}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        # A misspelt key must stop the start, not quietly serve without tuned mode or the K.
        (json.dumps([{**ENTRY, "upsampler": "x.safetensors"}]),
         "entry 0 ('demo'): upsampler: unknown key"),
        (json.dumps({"models": [ENTRY, {**ENTRY, "name": "b", "default_pivot_strenght": 0.4}]}),
         "entry 1 ('b'): default_pivot_strenght: unknown key"),
        (json.dumps([{**ENTRY, "name": 7, "native_width": 0}]),
         "entry 0: name: Input should be a valid string; native_width: Input should be greater"),
        (json.dumps([ENTRY, "sd21"]), "entry 1: Input should be a valid dictionary"),
        (json.dumps({"model": [ENTRY]}), 'a top-level object takes one key, "models", not "model"'),
        (json.dumps({"models": [ENTRY], "default": "demo"}),
         'takes one key, "models", not "models", "default"'),
        (json.dumps({"models": {"demo": ENTRY}}), "the models must be a JSON list, not an object"),
        (json.dumps("demo"), "the models must be a JSON list, not a string"),
        ('[{"name": "demo",}]', "not valid JSON: Expecting property name"),
        (json.dumps([]), "lists no models"),
        (json.dumps([ENTRY, {**ENTRY, "path": "y"}]), "duplicate names: demo"),
    ],
)
def test_every_models_file_problem_is_one_line_naming_the_file(
    tmp_path: Path, content: str, problem: str
) -> None:
    models = tmp_path / "models.json"
    models.write_text(content)
    with pytest.raises(ModelsFileError) as raised:
        load_model_specs(Settings(models_file=models))
    message = str(raised.value)
    assert message.startswith(f"models file {models}: ") and problem in message, message
    assert "\n" not in message


def test_an_unreadable_models_file_is_a_models_file_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ModelsFileError, match=r"missing\.json: cannot read it: No such file"):
        load_model_specs(Settings(models_file=missing))
    with pytest.raises(ModelsFileError, match="cannot read it: Is a directory"):
        load_model_specs(Settings(models_file=tmp_path))
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"name": "d\xe9mo"}]'.encode("latin-1"))
    with pytest.raises(ModelsFileError, match=r"latin1\.json: not valid JSON: 'utf-8' codec"):
        load_model_specs(Settings(models_file=latin1))
