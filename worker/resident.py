"""The models this worker holds, loaded once at start and kept for its whole life.

`RESIDENT` is the one module-level mutable object the project allows: the RQ job function runs
in this process (SimpleWorker, no fork) and finds its loaded pipelines and services here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from contract.jobs import GenerationParams
from contract.settings import TINY_MODEL_NAME, ModelSpec, Settings
from contract.state import JobStore
from contract.storage import ResultStorage
from selfcascade.errors import ModelLoadError
from worker.stall_watchdog import StallWatchdog

log = logging.getLogger(__name__)


@dataclass
class ResidentModel:
    spec: ModelSpec
    # selfcascade.engines.engine_for's answer (image or video); typed loosely to keep imports lazy
    engine: Any
    tuned_hook: Any | None = None  # selfcascade.tuned.TunedStageHook when upsamplers are set

    def stage_hooks(self, params: GenerationParams) -> list[Any]:
        """THE place a request's `tuned` flag becomes engine stage hooks.

        tuned=True needs a checkpoint (the API refuses it otherwise); "auto" uses one if the
        model has it; False never does.
        """
        if params.tuned is False or self.tuned_hook is None:
            return []
        return [self.tuned_hook]


@dataclass
class WorkerRuntime:
    settings: Settings
    store: JobStore
    storage: ResultStorage
    worker_name: str
    models: dict[str, ResidentModel] = field(default_factory=dict)
    watchdog: StallWatchdog = field(init=False)

    def __post_init__(self) -> None:
        self.watchdog = StallWatchdog(self.settings.stalled_job_s)


class ModelRefused(ValueError):
    """A loaded model disagrees with its models-file entry; the worker must not serve it."""


RESIDENT: dict[str, WorkerRuntime] = {}


def runtime() -> WorkerRuntime:
    if "runtime" not in RESIDENT:
        raise RuntimeError("the worker runtime is not initialised (run selfcascade-worker)")
    return RESIDENT["runtime"]


def install(runtime_: WorkerRuntime) -> None:
    RESIDENT["runtime"] = runtime_


def load_models(specs: list[ModelSpec], settings: Settings) -> dict[str, ResidentModel]:
    """Load every configured model; the tiny default is written to disk the first time."""
    from selfcascade.engines import engine_for
    from selfcascade.loading import load_pipeline

    loaded: dict[str, ResidentModel] = {}
    for spec in specs:
        if spec.name == TINY_MODEL_NAME and settings.models_file is None:
            ensure_tiny_model(settings)
        try:
            pipe = load_pipeline(
                spec.path, dtype=spec.dtype, device=spec.device, variant=spec.variant
            )
        except ModelLoadError as exc:  # which entry: a models file may list several
            source = f" of {settings.models_file}" if settings.models_file else ""
            raise ModelLoadError(f"model {spec.name!r}{source}: {exc}") from exc
        engine = engine_for(pipe, **_engine_options(settings))
        spec = _with_modality(spec, engine.produces_video)
        _check_frame_limit(spec, engine.max_num_frames)
        _check_sizes(spec, engine)
        loaded[spec.name] = ResidentModel(spec, engine, _tuned_hook(spec, pipe))
        if settings.warm_up_on_load:
            _warm_up(loaded[spec.name], settings)
        log.info("model %s resident (%s)", spec.name, spec.path)
    return loaded


def _warm_up(model: ResidentModel, settings: Settings) -> None:
    """One short job at 2x native; an engine that compiles its UNet (image models with
    `torch_compile_scale`) runs it at that scale, capped by max_pixels, compiling every stage,
    and then tuned as well when the model has upsamplers. A model that cannot even run that
    here (out of memory, a broken kernel) would fail every real job, so the worker refuses to
    start, in one line."""
    from selfcascade.warmup import warm_up

    spec, engine = model.spec, model.engine
    compiling = engine.unet_graphs.compiled is not None
    scale = settings.torch_compile_scale if compiling else 2
    native = engine.native_size
    # The API admits nothing above max_pixels: compiling such a stage would be wasted.
    while scale > 2 and native.pixels * scale * scale > settings.max_pixels:
        scale //= 2
    try:
        warm_up(engine, scale=scale)
        if compiling and model.tuned_hook is not None:
            warm_up(engine, scale=scale, stage_hooks=[model.tuned_hook])
            model.tuned_hook.lr_inputs.pin_all()  # the compiled tuned stages read these
    except Exception as exc:
        advice = "SELFCASCADE_WARM_UP_ON_LOAD=false starts without it" + (
            " (with SELFCASCADE_TORCH_COMPILE_SCALE=0, or a smaller scale)" if compiling else ""
        )
        raise ModelRefused(
            f"model {spec.name}: its warm-up generation failed ({type(exc).__name__}: {exc}); "
            + advice
        ) from exc


# Dynamo's default compiler; tests trace with "eager" (same routing, seconds instead of minutes).
COMPILE_BACKEND = "inductor"


def _engine_options(settings: Settings) -> dict[str, Any]:
    """The engine's keyword arguments that settings override (unset: the engine's default)."""
    options: dict[str, Any] = {}
    if settings.cuda_graph_max_pixels is not None:
        options["cuda_graph_max_pixels"] = settings.cuda_graph_max_pixels or None
    if settings.torch_compile_scale:
        options["compile_backend"] = COMPILE_BACKEND
    return options


def _check_frame_limit(spec: ModelSpec, engine_limit: int | None) -> None:
    """The API admits up to the models file's max_num_frames; a worker whose model takes fewer
    would fail those jobs after they waited in the queue, so it refuses to start instead."""
    if engine_limit is not None and spec.max_num_frames > engine_limit:
        raise ModelRefused(
            f"model {spec.name}: its motion module takes at most {engine_limit} frames but the "
            f"models file allows max_num_frames {spec.max_num_frames}; set "
            f'"max_num_frames": {engine_limit} (or less) in its entry'
        )


def _check_sizes(spec: ModelSpec, engine: Any) -> None:
    """The API decides by the models file whether a request cascades (native size) and which
    sizes pass (size_multiple); the worker by the loaded UNet. Where they disagree, jobs the API
    accepted would fail after waiting in the queue, so the worker refuses to start instead."""
    native = engine.native_size
    # Video models keep their declared size: some sample a non-square native (zeroscope's
    # 576x320) that the square sample_size does not describe.
    if not engine.produces_video and (spec.native_width, spec.native_height) != (
        native.width, native.height
    ):
        raise ModelRefused(
            f"model {spec.name}: the models file says native {spec.native_width}x"
            f"{spec.native_height}, but its UNet samples {native.width}x{native.height}; set "
            f'"native_width": {native.width}, "native_height": {native.height}'
        )
    if spec.size_multiple % engine.size_multiple:
        raise ModelRefused(
            f"model {spec.name}: the models file allows sizes in multiples of "
            f"{spec.size_multiple} px, but the model needs multiples of {engine.size_multiple}; "
            f'set "size_multiple" to a multiple of {engine.size_multiple}'
        )


def _with_modality(spec: ModelSpec, produces_video: bool) -> ModelSpec:
    """The spec, saying what the loaded engine produces.

    The API validates requests by the models file's modality: a worker holding the other kind
    would take jobs it cannot run, so it refuses to start instead.
    """
    held = "video" if produces_video else "image"
    if spec.produces is None:
        return spec.model_copy(update={"produces": held})
    if spec.produces != held:
        raise ModelRefused(
            f"model {spec.name}: the models file says it produces {spec.produces}, but "
            f"{spec.path} holds {'a video' if produces_video else 'an image'} pipeline; fix "
            "`produces` in the models file"
        )
    return spec


def _tuned_hook(spec: ModelSpec, pipe: Any) -> Any | None:
    """A model's upsampler checkpoint -> the tuned-mode stage hook, verified against its UNet."""
    if not spec.upsamplers:
        return None
    from selfcascade.tuned import load_tuned_hook

    return load_tuned_hook(spec.upsamplers, pipe)


def ensure_tiny_model(settings: Settings) -> None:
    path = settings.tiny_model_dir
    if (path / "model_index.json").is_file():
        return
    from selfcascade.tiny_models import save_tiny_sd

    log.info("writing the tiny demo model to %s", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tiny_sd(path)
