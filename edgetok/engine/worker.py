"""The child process that parses and builds: a parser or builder fault kills only this process.

Run as ``python -m edgetok.engine.worker REQUEST.json EVENTS_FD PARENT_PID``; it dies with that parent. It reports on the pipe EVENTS_FD,
one JSON object per line: ``stage`` and ``progress`` while it works, then one of ``result``,
``parse_error`` (the failing nodes) or ``error``. The library's own log goes to stdout/stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

from edgetok.engine.backend import BACKENDS


class Events:
    def __init__(self, fd: int):
        self.stream = os.fdopen(fd, "w", buffering=1)

    def send(self, kind: str, **data) -> None:
        self.stream.write(json.dumps({"event": kind, **data}) + "\n")
        self.stream.flush()


def _parser_errors(parser) -> list[dict]:
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        desc = err.desc().split("\n")[0]
        errors.append({
            "node": err.node_name() if hasattr(err, "node_name") else str(err.node()),
            "op_type": err.node_operator() if hasattr(err, "node_operator") else "",
            "reason": desc,
            "importer": err.func() if hasattr(err, "func") else "",  # e.g. importScatterElements
        })
    return errors


def _plugin_failure(request: dict) -> str | None:
    """Why an edgetok plugin refused the build: TensorRT reports only that a plugin callback failed."""
    if not (request.get("edgetok_plugins") or {}).get("bundle"):
        return None  # the C++ library reports through TensorRT's logger (the log tail names it)
    from edgetok.plugins.tensorrt import failures

    found = failures()
    return found[0] if found else None


def _progress_monitor(trt, events: Events):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            events.send("progress", phase=phase_name, parent=parent_phase, steps=num_steps)

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _engine_layers(trt, logger, engine_bytes) -> tuple[list | None, str | None]:
    """Per-layer names/types from the engine inspector, which needs the engine deserialized (a GPU)."""
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
    except Exception as exc:  # no GPU / driver: the library raises or returns None
        return None, f"cannot deserialize here: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if engine is None:
        return None, "cannot deserialize the engine on this machine (no usable GPU)"
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = [{"name": layer.get("Name", layer) if isinstance(layer, dict) else layer,
               "type": layer.get("LayerType") if isinstance(layer, dict) else None}
              for layer in info.get("Layers", [])]
    return layers, None


def _serializing(trt, base, library: str, rtx: bool):
    """A config that puts the plugin library into the engine (TensorRT's plugins to serialize), so that the
    engine alone is enough. TensorRT serializes plugin libraries only into version-compatible engines, so there
    the flag comes too; TensorRT-RTX takes the library as it is."""
    def config(builder, network):
        cfg = base(builder, network)
        cfg.plugins_to_serialize = [library]
        if not rtx:
            cfg.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        return cfg

    return config


def build(request: dict, events: Events) -> int:
    backend = BACKENDS[request["backend"]]
    if backend.polygraphy_rtx:
        os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    events.send("stage", text=f"importing {backend.module}")
    trt = __import__(backend.module)
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile
    from polygraphy.backend.trt import util as trt_util
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    logger = trt_util.get_trt_logger()

    registry = trt.get_plugin_registry()
    plugin_notes = []
    edgetok_plugins = request.get("edgetok_plugins") or {}
    if edgetok_plugins.get("library"):  # creators from the C++ library, as trtexec --dynamicPlugins loads them
        from edgetok.errors import EdgetokError
        from edgetok.plugins.library import load

        events.send("stage", text=f"loading the edgetok plugin library {edgetok_plugins['library']}")
        try:
            load(trt, edgetok_plugins["library"])
        except EdgetokError as exc:
            events.send("error", message=str(exc))
            return 6
    elif edgetok_plugins:  # Python creators must be registered before the parser meets an edgetok node
        from edgetok.plugins.tensorrt import register

        events.send("stage", text="registering edgetok plugins")
        register(trt, edgetok_plugins["bundle"])
    for lib in request["plugins"]:
        events.send("stage", text=f"loading plugin library {lib}")
        try:
            ctypes.CDLL(lib)  # a clear reason (dlerror) when the file is not a loadable library
        except OSError as exc:
            events.send("error", message=f"cannot load plugin library {lib}: {exc}")
            return 6
        if registry.load_library(lib) is None:
            plugin_notes.append(f"{lib}: the plugin registry returned no handle (no creators found?)")

    events.send("stage", text=f"parsing {os.path.basename(request['onnx'])}")
    settings = dict(request["config"])
    strongly_typed = settings.pop("strongly_typed")
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and not backend.polygraphy_rtx:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(request["onnx"]):
        reason = _plugin_failure(request)
        if reason:
            events.send("error", message=reason, plugin=True)
        else:
            events.send("parse_error", nodes=_parser_errors(parser))
        return 3
    network_layers = [{"name": network.get_layer(i).name, "type": network.get_layer(i).type.name}
                      for i in range(network.num_layers)]
    network_outputs = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name}
                       for t in map(network.get_output, range(network.num_outputs))]

    if "memory_pool_limits" in settings:
        settings["memory_pool_limits"] = {getattr(trt.MemoryPoolType, k): v
                                          for k, v in settings["memory_pool_limits"].items()}
    dla_core = settings.pop("dla_core", None)
    profiles = []
    for spec in request["profiles"]:
        profile = Profile()
        for item in spec:
            profile.add(item["name"], item["min"], item["opt"], item["max"])
        profiles.append(profile)
    if backend.polygraphy_rtx:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX as Config
    else:
        Config = CreateConfig
    config = Config(profiles=profiles, progress_monitor=_progress_monitor(trt, events), **settings)
    if dla_core is not None:
        base = config

        def config(builder, network):  # polygraphy sets use_dla; the core number is ours to set
            cfg = base(builder, network)
            cfg.DLA_core = dla_core
            return cfg
    if edgetok_plugins.get("serialize"):
        config = _serializing(trt, config, edgetok_plugins["library"], backend.polygraphy_rtx)

    events.send("stage", text="building engine")
    start = time.perf_counter()
    engine_bytes = EngineBytesFromNetwork((builder, network, parser), config=config,
                                          save_timing_cache=request.get("save_timing_cache"))()
    seconds = time.perf_counter() - start
    if engine_bytes is None:
        reason = _plugin_failure(request)
        events.send("error", message=reason or "the builder returned no engine (see the log above)", plugin=bool(reason))
        return 4
    with open(request["engine"], "wb") as f:
        f.write(engine_bytes)
    engine_layers, inspect_note = _engine_layers(trt, logger, engine_bytes)
    events.send("result", build_seconds=seconds, network_layers=network_layers, network_outputs=network_outputs,
                engine_layers=engine_layers, engine_inspector=inspect_note or "ok", plugin_notes=plugin_notes,
                library_version=trt.__version__)
    return 0


def die_with_parent(parent: int) -> None:
    """The build must not outlive edgetok: a killed parent (even by SIGKILL) takes its worker with it.
    Linux delivers SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere, and for a parent
    that died before this ran, a watchdog thread notices the new parent PID."""
    import signal
    import threading

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(9)

    threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    die_with_parent(int(sys.argv[3]))
    request = json.loads(open(sys.argv[1]).read())
    events = Events(int(sys.argv[2]))
    try:
        return build(request, events)
    except Exception as exc:  # library errors arrive as exceptions: report them as one line
        reason = _plugin_failure(request)
        message = reason or " ".join(str(exc).split())[:500] or type(exc).__name__
        events.send("error", message=message, plugin=bool(reason))
        return 5


if __name__ == "__main__":
    sys.exit(main())
