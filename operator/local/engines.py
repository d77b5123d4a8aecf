"""Engines as local processes: the command line, environment and health path of each replica.

The cluster runtime builds containers (`kube.engines`); on one machine the same Model runs as a
plain process on a free port. Commands are templates so users can point an engine at another
binary or add flags in the config file (`local.engines.<Engine>`), and the launch hash (what
triggers a rolling restart) is computed from the rendered template minus the port, so only a
change to what would actually run restarts replicas.

``spec.files`` (KubeAI mounts each at its absolute ``path`` in the container) are written under
the replica's own directory instead: ``/config/template.jinja`` becomes
``<stateDir>/logs/<model>/<replica>.files/config/template.jinja``. Every absolute path in the
engine's command, the Model's ``args`` and ``env`` values that names a file of ``spec.files``, or
a directory holding one, is rewritten to its place there, so ``--chat-template=/config/t.jinja``
works unchanged; ``{files}`` in a command template is that root. A file's content is part of the
launch hash: editing it rolls the replicas, each new one reading its own copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping

from lb.model import Model, ModelURL, parse_model_url

from lb_operator.kv_events import kv_events_args
from lb_operator.scheduling_policy import scheduling_policy_args
from lb_operator.local.config import LocalConfig, LocalEngine


class EngineUnavailable(RuntimeError):
    """The engine's binary or Python module is not installed here; the message says what to do."""


_SERVE = ("--host", "{host}", "--port", "{port}")

BUILTIN_ENGINES: dict[str, LocalEngine] = {
    # The bundled simulator: vLLM's endpoints and metrics, no GPU. The default engine.
    "Sim": LocalEngine(command=("{python}", "-m", "kvgate_sim", *_SERVE, "--model-name", "{name}",
                                "--model", "{model}"),
                       health_path="/health", requires=("kvgate_sim",)),
    "VLLM": LocalEngine(command=("{python}", "-m", "vllm.entrypoints.openai.api_server", *_SERVE,
                                 "--model", "{model}", "--served-model-name", "{name}"),
                        health_path="/health", requires=("vllm",)),
    # llama-cpp-python has no /health: /v1/models answers once the GGUF is loaded.
    "LlamaCpp": LocalEngine(command=("{python}", "-m", "llama_cpp.server", *_SERVE,
                                     "--model", "{model}", "--model_alias", "{name}"),
                            health_path="/v1/models", requires=("llama_cpp",)),
    # One `ollama serve` per replica, each with its own port; the model is pulled and copied to
    # the Model's name once the server answers, as the cluster's startup probe does.
    "OLlama": LocalEngine(command=("ollama", "serve"),
                          env={"OLLAMA_HOST": "{host}:{port}", "OLLAMA_KEEP_ALIVE": "999999h"},
                          health_path="/",
                          setup=(("ollama", "pull", "{model}"), ("ollama", "cp", "{model}", "{name}"))),
    # PyPI's faster-whisper-server (0.0.3) takes the model (a CTranslate2 directory or a size
    # name) as its argument and has no `main:create_app` (the container image's server does).
    # It loads the model on the first request; /health answers as soon as it listens.
    "FasterWhisper": LocalEngine(command=("{python}", "-m", "faster_whisper_server", "{model}",
                                          *_SERVE),
                                 health_path="/health", requires=("faster_whisper_server",)),
    # As a module of {python}: the `infinity_emb` script is only on PATH inside its virtualenv.
    "Infinity": LocalEngine(command=("{python}", "-m", "infinity_emb.cli", "v2", *_SERVE,
                                     "--model-id", "{model}", "--served-model-name", "{name}",
                                     "--url-prefix", "/v1"),
                            health_path="/health", requires=("infinity_emb",)),
}


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one replica process."""

    argv: tuple[str, ...]
    env: Mapping[str, str]  # added to this process's environment
    health_path: str
    setup: tuple[tuple[str, ...], ...]
    files: tuple[tuple[str, str], ...] = ()  # (path on this machine, content): write before start


def engine_for(model: Model, config: LocalConfig) -> LocalEngine:
    """The built-in template for the Model's engine with the config's non-empty fields over it."""
    base = BUILTIN_ENGINES.get(model.spec.engine)
    given = config.engines.get(model.spec.engine)
    if base is None and given is None:
        raise EngineUnavailable(f"engine {model.spec.engine} has no local command; "
                                f"set local.engines.{model.spec.engine}.command in the config")
    if given is None:
        return base  # type: ignore[return-value]
    if base is None:
        return given
    overrides = {f.name: getattr(given, f.name) for f in dataclasses.fields(LocalEngine)
                 if getattr(given, f.name)}
    return dataclasses.replace(base, **overrides)


def model_location(model: Model, base_dir: Path) -> str:
    """What {model} becomes: a hub id, an Ollama ref, or a file path (relative to the models file).

    A GGUF on the hub (hf://org/repo/file.gguf) is passed as is for the user's command to handle.
    """
    url: ModelURL = parse_model_url(model.spec.url)
    if url.scheme == "file":
        return local_path(url.ref, base_dir)
    if url.scheme in ("s3", "gs", "oss"):
        return f"{url.scheme}://{url.ref}"
    return url.ref


def local_path(ref: str, base_dir: Path) -> str:
    """A file:// url's path on this machine; a relative one is relative to the models file."""
    path = Path(ref)
    return os.path.normpath(path if path.is_absolute() else (base_dir / path))


FILES_SUFFIX = ".files"  # a replica's spec.files live in <its directory>/<replica>.files


def render_launch(model: Model, config: LocalConfig, *, port: int, state: Path,
                  base_dir: Path, replica: str = "replica", rank: int = 0) -> Launch:
    """The replica's command line: engine template, then its KV-event flag (ports offset by
    its ``rank``), then the Model's own args and env."""
    engine = engine_for(model, config)
    if not engine.command:
        raise EngineUnavailable(f"local.engines.{model.spec.engine}.command: empty")
    root = state / f"{replica}{FILES_SUFFIX}"
    files = local_files(model, root)
    values = {"python": engine_python(engine), "host": config.replica_host, "port": str(port),
              "name": model.name, "model": model_location(model, base_dir), "state": str(state),
              "files": str(root)}
    fill, point = _filler(values, model.spec.engine), _pointer(model, root)
    argv = (tuple(point(fill(a)) for a in engine.command) + _lora_args(model)
            + tuple(kv_events_args(model, rank)) + tuple(scheduling_policy_args(model))
            + tuple(point(a) for a in model.spec.args))
    env = {k: point(fill(v)) for k, v in engine.env.items()} | _lora_env(model) | {
        k: point(v) for k, v in model.spec.env.items()}
    setup = tuple(tuple(fill(a) for a in step) for step in engine.setup)
    return Launch(argv, env, engine.health_path or "/health", setup, files)


def engine_python(engine: LocalEngine) -> str:
    """The interpreter {python} names: the engine's own virtualenv if configured (absolute, so
    a replica started in another directory finds it), else kvgate's."""
    return os.path.abspath(engine.python) if engine.python else sys.executable


def local_files(model: Model, root: Path) -> tuple[tuple[str, str], ...]:
    """(where the file goes on this machine, its content) for each of ``spec.files``."""
    return tuple((str(root / _relative(f.path, model)), f.content) for f in model.spec.files)


def _relative(path: str, model: Model) -> PurePosixPath:
    parts = PurePosixPath(path).parts[1:]
    if not parts or any(p in ("..", ".") for p in parts):
        raise EngineUnavailable(f"model {model.name}: spec.files path {path!r} must name a file "
                                "by an absolute path without '.' or '..'")
    return PurePosixPath(*parts)


_ABSOLUTE = re.compile(r"(?<![\w.~-])/[^\s=:,;\"']*")  # an absolute path inside an argument


def _pointer(model: Model, root: Path):  # type: ignore[no-untyped-def]
    """Rewrites the absolute paths of an argument that name a file of spec.files (or a
    directory holding one) to their place under `root`; anything else is left alone."""
    known = {str(PurePosixPath(f.path)) for f in model.spec.files}
    known |= {str(parent) for p in list(known) for parent in PurePosixPath(p).parents
              if str(parent) != "/"}

    def replace(match: re.Match[str]) -> str:
        path = match.group(0)
        normal = str(PurePosixPath(path)) if path != "/" else path
        return str(root / normal.lstrip("/")) if normal in known else path

    def point(text: str) -> str:
        return _ABSOLUTE.sub(replace, text) if known else text
    return point


# Spec fields that only mean something in a cluster: named as the manifest names them.
CLUSTER_ONLY = (("cache_profile", "cacheProfile"), ("resource_profile", "resourceProfile"),
                ("image", "image"), ("env_from", "envFrom"),
                ("priority_class_name", "priorityClassName"))


def ignored_fields(model: Model) -> tuple[str, ...]:
    """The Model's fields set to something a local process cannot honour (no shared cache
    volume, no GPU profile or node selection, no image, no Secrets, no scheduler)."""
    return tuple(name for attr, name in CLUSTER_ONLY if getattr(model.spec, attr))


def write_files(launch: Launch) -> None:
    """Write a replica's spec.files (blocking: run it off the event loop)."""
    for path, content in launch.files:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)


def _lora_args(model: Model) -> tuple[str, ...]:
    """vLLM loads adapters at runtime (/v1/load_lora_adapter) only when started for it, as in the
    cluster's Pods; the simulator always accepts them, so its replicas do not roll for this."""
    return ("--enable-lora",) if model.spec.engine == "VLLM" and model.spec.adapters else ()


def _lora_env(model: Model) -> dict[str, str]:
    if model.spec.engine == "VLLM" and model.spec.adapters:
        return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    return {}


def _filler(values: Mapping[str, str], engine: str):  # type: ignore[no-untyped-def]
    def fill(template: str) -> str:
        try:
            return template.format_map(values)
        except (KeyError, ValueError, IndexError) as exc:
            raise EngineUnavailable(
                f"local.engines.{engine}: bad placeholder in {template!r} ({exc}); "
                f"known: {', '.join('{' + k + '}' for k in values)}") from None
    return fill


def launch_hash(model: Model, config: LocalConfig, base_dir: Path) -> str:
    """A hash of what a replica would run, independent of its port and state directory."""
    launch = render_launch(model, config, port=0, state=Path("."), base_dir=base_dir)
    fields = [launch.argv, sorted(launch.env.items()), launch.health_path, launch.setup]
    blob = json.dumps(fields + [launch.files] if launch.files else fields)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def check_engine(model: Model, config: LocalConfig, base_dir: Path) -> None:
    """Fail early, with a fix, if the engine cannot start here (binary or module missing).

    Cheap and import-free: `find_spec` of a top-level package only reads the file system.
    """
    engine = engine_for(model, config)
    launch = render_launch(model, config, port=0, state=Path("."), base_dir=base_dir)
    where = f"model {model.name}: engine {model.spec.engine}"
    program = launch.argv[0]
    if os.sep not in program and shutil.which(program) is None:
        raise EngineUnavailable(f"{where}: `{program}` is not installed (not found on PATH); "
                                f"install it or set local.engines.{model.spec.engine}.command")
    if os.sep in program and not os.access(program, os.X_OK):
        hint = (f" (local.engines.{model.spec.engine}.python; `make engines` installs the engines "
                "into .kvgate/engines/)" if engine.python else "")
        raise EngineUnavailable(f"{where}: {program} is not an executable file{hint}")
    if parse_model_url(model.spec.url).scheme == "file":
        location = model_location(model, base_dir)
        if not os.path.exists(location):
            raise EngineUnavailable(f"model {model.name}: spec.url: {location} does not exist "
                                    "(a relative file:// url is relative to the models file)")
    for i, adapter in enumerate(model.spec.adapters):
        url = parse_model_url(adapter.url)
        if url.scheme == "file" and not os.path.exists(location := local_path(url.ref, base_dir)):
            raise EngineUnavailable(f"model {model.name}: spec.adapters[{i}].url: {location} does "
                                    "not exist (a relative file:// url is relative to the models file)")
    if program != sys.executable:
        return  # another interpreter or a binary: its modules are not ours to inspect
    modules = list(engine.requires)
    if len(launch.argv) > 2 and launch.argv[1] == "-m":
        modules.append(launch.argv[2])
    for module in dict.fromkeys(modules):
        if not _module_exists(module):
            raise EngineUnavailable(
                f"{where}: the Python module `{module.split('.')[0]}` is not installed in "
                f"{sys.executable}; install it (e.g. `pip install {_package_hint(module)}`) or set "
                f"local.engines.{model.spec.engine}.command")


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


_PACKAGES = {"vllm": "vllm", "llama_cpp": "'llama-cpp-python[server]'",
             "faster_whisper_server": "faster-whisper-server", "kvgate_sim": "kvgate",
             "infinity_emb": "'infinity-emb[server,torch]'"}


def _package_hint(module: str) -> str:
    top = module.split(".")[0]
    return _PACKAGES.get(top, top)
