"""Run a Kopf operator in its own thread and event loop, against the Kubernetes emulator.

    operator = OperatorThread("recsys_operator.controller.handlers").start()
    ...
    operator.stop()

Login: Kopf is given a login handler that returns whatever the kubernetes client's
*default configuration* points at. The `kube` fixture points that configuration at the
emulator (`kubernetes.config.load_kube_config(config_file=...)`), so Kopf and the
handlers' own kubernetes client talk to the same server. Kopf's built-in
`login_via_client` is not used: it reloads the kubeconfig from the location the client
read from `$KUBECONFIG` once, at import, which is not the test's emulator.

Handlers: `handlers` names a module (`"pkg.handlers"`) or a file (`"path/handlers.py"`);
it is imported once per process and registers its `@kopf.on...` handlers in Kopf's
default registry. Tests that define handlers inline pass their own `registry=`.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import sys
import threading
import traceback
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any

import kopf
import kubernetes

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0

# Registries that already have the emulator login (a registry keeps handlers forever).
_registries_with_login: weakref.WeakSet[kopf.OperatorRegistry] = weakref.WeakSet()


def fast_settings() -> kopf.OperatorSettings:
    """Kopf settings for tests: quick retries, and never kill the test process on exit."""
    settings = kopf.OperatorSettings()
    settings.execution.default_backoff = 0.5  # handlers without their own backoff retry fast
    settings.networking.error_backoffs = [0.1, 0.2, 0.5, 1.0]
    settings.watching.reconnect_backoff = 0.1
    settings.queueing.exit_timeout = 1.0
    # On exit, wait a moment for a timer busy in its handler: an orphaned one costs 5 s.
    settings.background.instant_exit_timeout = 0.5
    # Else Kopf SIGKILLs its thread, i.e. the whole pytest worker, 10 minutes after it
    # began to exit for another reason than the stop flag.
    settings.process.ultimate_exiting_timeout = None
    return settings


def login_with_client_defaults(**_: Any) -> kopf.ConnectionInfo:
    """Kopf login handler: the server of the kubernetes client's default configuration."""
    config = kubernetes.client.Configuration.get_default_copy()
    return kopf.ConnectionInfo(server=config.host, default_namespace="default", priority=1000)


class OperatorThread:
    def __init__(
        self,
        handlers: str | Path | None = None,
        *,
        registry: kopf.OperatorRegistry | None = None,
        namespaces: Collection[str] = ("default",),
        clusterwide: bool = False,
        settings: kopf.OperatorSettings | None = None,
        memo: Any = None,
    ) -> None:
        if handlers is not None:
            import_handlers(handlers)
        self.registry = registry if registry is not None else kopf.get_default_registry()
        if self.registry not in _registries_with_login:
            kopf.on.login(registry=self.registry, id="kubemock-login")(login_with_client_defaults)
            _registries_with_login.add(self.registry)
        self.settings = settings if settings is not None else fast_settings()
        self._scope: dict[str, Any] = (
            {"clusterwide": True} if clusterwide else {"namespaces": list(namespaces)}
        )
        self._memo = memo
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def start(self, timeout: float = START_TIMEOUT) -> OperatorThread:
        """Start Kopf and wait until its startup handlers have run."""
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"Kopf did not get ready in {timeout}s")
        if self.error is not None:
            raise RuntimeError("Kopf failed to start") from self.error
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask Kopf to exit (as on SIGTERM), wait for its thread; re-raise its failure.

        Kopf's own exit is the only reliable one: cancelling it from outside cancels its
        helper tasks before the tasks that wait for them, and it never ends. Mind that
        Kopf waits up to 5 s for tasks still running after its root tasks end (e.g. a
        timer busy in its handler) before it cancels them.
        """
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"Kopf did not stop in {timeout}s; it is at:\n{self._where()}")
        if self.error is not None:
            raise RuntimeError("Kopf failed") from self.error

    def _where(self) -> str:
        """The Kopf thread's stack and its event loop's pending tasks, to say why it hangs."""
        frame = sys._current_frames().get(self._thread.ident or 0)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        tasks = asyncio.all_tasks(self._loop) if self._loop is not None else set()
        return stack + "".join(f"pending: {task!r}\n" for task in tasks)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._operate())
        except BaseException as exc:  # reported in the test's thread by start()/stop()
            self.error = exc
        finally:
            self._ready.set()  # do not leave start() waiting for a thread that has ended

    async def _operate(self) -> None:
        self._loop = asyncio.get_running_loop()
        await kopf.operator(
            registry=self.registry,
            settings=self.settings,
            standalone=True,  # no peering objects, no waiting for other operators
            ready_flag=self._ready,
            stop_flag=self._stop,
            memo=self._memo,
            **self._scope,
        )


def import_handlers(handlers: str | Path) -> None:
    """Import a handlers module by dotted name or file path, once per process."""
    path = Path(handlers)
    if path.suffix != ".py":
        importlib.import_module(str(handlers))
        return
    name = "kubemock_handlers_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"cannot import {path}"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
