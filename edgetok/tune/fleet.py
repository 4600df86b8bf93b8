"""Where trials run: a Ray cluster (:class:`Fleet`). Export, quantize and eval are CPU tasks that any node
may take; build and profile run in one actor per unit of the target's resource (``{"sm87": 1}`` on each
Jetson), so a device profiles one model at a time and nothing else of ours runs on it meanwhile. ``--target
cpu`` profiles here, in one actor pinned to this node.

Without ``--address`` a local instance is started for the run: loopback only (Ray's single-node mode, no
dashboard, no usage statistics), quiet, and shut down at the end. With ``--address`` the run joins a cluster
someone started (``ray start --head`` on the workstation, ``ray start --address ... --resources`` on each
device) and leaves it running.

A task whose worker process dies is retried by Ray (``max_retries``; an actor is restarted and its call
retried); what still fails comes back as an exception the study records with its reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Callable

from edgetok.errors import EdgetokError
from edgetok.tune import trial as work

TASK_RETRIES = 2  # a worker that dies (killed, out of memory) is replaced and the task run again
CONNECT_TIMEOUT_S = 5.0


def parse_address(address: str) -> tuple[str, int]:
    """``ray://HOST:PORT`` (Ray Client) or ``HOST:PORT`` (a head's GCS) as (host, port); one line otherwise."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgetokError(f"--address {address!r} is not HOST:PORT or ray://HOST:PORT, e.g. ray://192.168.1.10:10001 "
                           "(Ray Client) or 192.168.1.10:6379 (the head's `ray start --head --port`)")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the head's port, before Ray is imported: an address nobody answers on is one line
    after ``timeout_s``, not Ray's minute of retries."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc)).lower()
        raise EdgetokError(f"--address {address}: no Ray head answers at {host}:{port} ({why} after at most "
                           f"{timeout_s:g} s); start one with `ray start --head --port {port}` there, or leave "
                           "--address out to run on a local instance") from None


class Fleet:
    """A Ray cluster to run trials on: ``workers`` CPU tasks at most at once (None: the cluster's CPUs)."""

    def __init__(self, address: str | None, target: str, workers: int | None = None,
                 say: Callable[[str], None] = lambda s: None):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no report leaves the machine
        self.local = address is None
        self.target = target
        self._temp = None
        if self.local:  # single-node mode binds every service to 127.0.0.1 (read when ray is imported)
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray

        self.ray = ray
        own = signal.getsignal(signal.SIGTERM)  # Ray's driver installs a handler that aborts the process
        kwargs = dict(logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
        if self.local:
            self._temp = tempfile.mkdtemp(prefix="edgetok-ray-")
            cpus = workers or os.cpu_count() or 1
            say(f"starting a local Ray instance ({cpus} CPU workers, loopback only)")
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, _temp_dir=self._temp, **kwargs)
        else:
            if address.startswith("ray://"):
                try:
                    import grpc  # noqa: F401
                except ImportError:
                    raise EdgetokError(f"--address {address}: Ray Client needs grpcio (pip install 'ray[client]'); "
                                       "or give the head's HOST:PORT") from None
            say(f"joining the Ray cluster at {address}")
            try:
                ray.init(address=address, **kwargs)
            except Exception as exc:  # a port that answers but is no Ray head, a version mismatch
                line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EdgetokError(f"--address {address}: Ray could not join the cluster there: {line}") from None
        if own is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, own)  # SIGTERM unwinds as Ctrl-C does: running trials are queued again
        self.node_id = ray.get_runtime_context().get_node_id()
        self.workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._prepare = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False)(work.prepare)
        self._profilers: list = []
        self._pending: dict = {}

    # ---------------------------------------------------------------- devices
    def wait_for_target(self, timeout_s: float, say: Callable[[str], None] = lambda s: None) -> int:
        """The units of the target's resource in the cluster, waiting up to ``timeout_s`` for a first one."""
        if self.target == "cpu":
            return 1
        deadline = time.monotonic() + timeout_s
        told = False
        while True:
            units = int(self.ray.cluster_resources().get(self.target, 0))
            if units:
                return units
            if time.monotonic() >= deadline:
                raise EdgetokError(
                    f"--target {self.target}: no Ray node provides the resource {self.target!r} after {timeout_s:g} s; "
                    f"start each device with `ray start --address HEAD:PORT --resources '{{\"{self.target}\": 1}}'`, "
                    "or raise --target-timeout")
            if not told:
                say(f"waiting up to {timeout_s:g} s for a node with the resource {self.target!r}")
                told = True
            time.sleep(0.5)

    def start_profilers(self, units: int) -> None:
        """One profiling actor per unit of the target (``cpu``: one, on this node). An actor runs its calls one
        at a time, so each device profiles one model at a time."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = self.ray.remote(_Profiler)
        if self.target == "cpu":
            options = dict(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False))
        else:
            options = dict(num_cpus=0, resources={self.target: 1})
        self._profilers = [actor.options(max_restarts=TASK_RETRIES, max_task_retries=TASK_RETRIES, **options).remote()
                           for _ in range(units)]
        self._pending = {i: 0 for i in range(units)}

    # ---------------------------------------------------------------- work
    def put(self, value):
        return self.ray.put(value)

    def prepare(self, config: dict, spec: dict, reference=None):
        return self._prepare.remote(config, spec, reference)

    def measure(self, config: dict, spec: dict, files_ref, artifact: str):
        """Queue a build + profile on the least busy device; returns (ref, device index)."""
        index = min(self._pending, key=self._pending.get)
        self._pending[index] += 1
        return self._profilers[index].measure.remote(config, spec, files_ref, artifact), index

    def measured(self, index: int) -> None:
        self._pending[index] -= 1

    def wait(self, refs: list, timeout_s: float) -> list:
        if not refs:
            return []
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout_s)
        return ready

    def get(self, ref):
        return self.ray.get(ref)

    def cancel(self, refs: list) -> None:
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # an actor call cannot be force-cancelled; it ends with the actor
                pass

    def close(self) -> None:
        """Leave the cluster; a local instance is stopped and its folder removed."""
        try:
            self.ray.shutdown()
        finally:
            if self._temp:
                shutil.rmtree(self._temp, ignore_errors=True)


def failure_reason(exc: BaseException) -> str:
    """One line for a trial's failure: an edgetok refusal as it was said, a dead worker as Ray says it."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EdgetokError):
        return str(cause)
    text = str(exc).strip().splitlines()
    name = type(exc).__name__
    if name in ("WorkerCrashedError", "ActorDiedError", "NodeDiedError", "ObjectLostError"):
        return f"{name} after {TASK_RETRIES} retries: " + (text[0] if text else "the worker process died")
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    return f"{name}: {text[-1] if text else ''}"


class _Profiler:
    """The actor holding one device: its calls run one after another."""

    def measure(self, config: dict, spec: dict, files: dict, artifact: str) -> dict:
        return work.measure(config, spec, files, artifact)
