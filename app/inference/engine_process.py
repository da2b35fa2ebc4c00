"""The inference engine in a process of its own, as the API process sees it.

In one process the engine thread and the event loop take turns on the GIL: a decode step's launch
waits behind the event loop's chunks (docs/BENCHMARKS.md has the figures before and after). So
the API process runs each `Engine` in a spawned process and
speaks to it over two pipes: requests, cancels and unloads in; each turn's events for every stream
out, as one message. The API process keeps a tokenizer (prompts go over tokenized) and no torch.

If the engine process dies (killed, a CUDA fault), its requests fail with EngineStopped (503),
/readyz says the engine is restarting, and a new engine process starts."""

import asyncio
import itertools
import logging
import multiprocessing
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from transformers import AutoTokenizer

from app.core.base_models import resolve_base_model
from app.core.metrics import ENGINE_REGISTRY
from app.core.model_families import UnsupportedBaseModel
from app.core.settings import Settings
from app.inference.messages import EngineStopped, Failure, GenerationRequest, TextDelta
from app.inference.prompts import encode_chat, encode_prompt
from app.inference.streams import ResultStream, deliver

log = logging.getLogger("uvicorn.error")

# A failed engine process is started again after this long (its GPU memory must be freed first).
RESTART_DELAY_S = 2.0


class EngineStartFailed(RuntimeError):
    """The engine process could not start (out of GPU memory, a broken checkpoint...)."""


class EngineProcess:
    """What the API process holds for one served base: `submit`, `unload`, `metrics`, `stop`, the
    tokenizer's `encode_prompt` / `encode_chat`, and `state` ("loading", "ok", "restarting",
    "stopped")."""

    def __init__(self, settings: Settings, base_model: str):
        self.settings = settings
        self.base_model = base_model
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(base_model, settings))
        self.context_window = settings.max_context_tokens
        self.state = "loading"
        self._capacity = ""
        self._lock = threading.Lock()  # the command pipe, the open streams and replies, the state
        self._ids = itertools.count()
        self._streams: dict[int, ResultStream] = {}
        self._replies: dict[int, Future] = {}
        self._stopping = False
        self._process = self._commands = self._events = None
        self._reader = threading.Thread(target=self._read, name=f"engine-events-{base_model}", daemon=True)

    @property
    def ready(self) -> bool:
        return self.state == "ok"

    def start(self) -> None:
        """Start the engine process and wait until its model is loaded; raises UnsupportedBaseModel
        or EngineStartFailed if it cannot serve."""
        self._spawn()
        self._reader.start()

    def capacity(self) -> str:
        return self._capacity

    def encode_prompt(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def submit(self, request: GenerationRequest) -> ResultStream:
        """Send a request to the engine; must be called on the event loop that reads the stream."""
        request_id = next(self._ids)
        stream = ResultStream(asyncio.get_running_loop(), lambda _: self._send(("cancel", request_id)))
        with self._lock:
            if not self.ready:
                raise EngineStopped(f"the inference engine for {self.base_model} is {self.state}")
            self._streams[request_id] = stream
            try:
                self._commands.send(("submit", (request_id, request, time.monotonic())))
            except OSError:
                del self._streams[request_id]
                raise EngineStopped(f"the inference engine for {self.base_model} is not running") from None
        return stream

    def unload(self, version: str) -> None:
        self._send(("unload", version))

    def metrics(self) -> list:
        """The engine process's metric families (app.core.metrics.ENGINE_REGISTRY's), or none while
        it is not running."""
        future: Future = Future()
        with self._lock:
            request_id = next(self._ids)
            self._replies[request_id] = future
        if not self._send(("metrics", request_id)):
            self._replies.pop(request_id, None)
            return []
        try:
            return future.result(timeout=5)
        except FutureTimeout:
            self._replies.pop(request_id, None)
            return []

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._send(("stop", None))
        if self._reader.is_alive():
            self._reader.join(timeout=60)  # it ends when the engine process has closed its pipe
        if self._process is not None and self._process.is_alive():
            self._process.kill()
        self.state = "stopped"

    # --- Internals ---

    def _send(self, message) -> bool:
        with self._lock:
            if self._commands is None or self.state != "ok":
                return False
            try:
                self._commands.send(message)
                return True
            except OSError:  # the process is gone; the reader finds out and fails its streams
                return False

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: the API process runs threads
        commands_out, commands_in = context.Pipe(duplex=False)
        events_out, events_in = context.Pipe(duplex=False)
        process = context.Process(
            target=serve_engine,
            args=(self.settings, self.base_model, commands_out, events_in),
            name=f"tuneforge-engine-{self.base_model}",
            daemon=True,
        )
        process.start()
        commands_out.close()  # the engine process's ends: with them closed here, its exit is an EOF
        events_in.close()
        try:
            kind, payload = events_out.recv()
        except EOFError:
            process.join()
            raise EngineStartFailed(f"the engine process exited with code {process.exitcode}") from None
        if kind != "ready":
            process.join()
            raise (UnsupportedBaseModel if kind == "refused" else EngineStartFailed)(payload)
        with self._lock:
            self._process, self._commands, self._events = process, commands_in, events_out
            self.context_window, self._capacity = payload
            self.state = "ok"

    def _read(self) -> None:
        """Each message from the engine process: a turn's events, or a reply. When the process is
        gone, fail what it held and start another."""
        while True:
            try:
                kind, payload = self._events.recv()
            except (EOFError, OSError):
                if self._restart():
                    continue
                return
            if kind == "events":
                self._dispatch(payload)
            else:  # "reply"
                request_id, value = payload
                future = self._replies.pop(request_id, None)
                if future is not None:
                    future.set_result(value)

    def _dispatch(self, events: list[tuple[int, object]]) -> None:
        items = []
        with self._lock:
            for request_id, event in events:
                stream = self._streams.get(request_id)
                if stream is None:
                    continue
                if isinstance(event, str):
                    event = TextDelta(event)
                else:  # a Completion or a Failure: the stream's last event
                    del self._streams[request_id]
                items.append((stream, event))
        deliver(items)

    def _restart(self) -> bool:
        """Fail the dead process's streams; unless stopping, start a new process (retrying until
        it comes up). True when one runs."""
        with self._lock:
            self.state = "stopped" if self._stopping else "restarting"
            streams, self._streams = self._streams, {}
            replies, self._replies = self._replies, {}
            self._commands.close()
        self._process.join(timeout=30)
        error = EngineStopped(
            f"the inference engine for {self.base_model} stopped"
            + ("" if self._stopping else f" (exit code {self._process.exitcode}); it is restarting")
        )
        deliver([(stream, Failure(error)) for stream in streams.values()])
        for future in replies.values():
            future.set_result([])
        while not self._stopping:
            log.error(
                "the inference engine for %s exited (code %s); restarting it",
                self.base_model,
                self._process.exitcode,
            )
            time.sleep(RESTART_DELAY_S)
            try:
                self._spawn()
            except Exception:  # noqa: BLE001 - e.g. its GPU memory not yet freed: try again
                log.exception("the inference engine for %s failed to restart", self.base_model)
                continue
            log.info("the inference engine for %s is serving again", self.base_model)
            return True
        return False


# --- The engine process ---


@dataclass
class _RemoteStream:
    """The engine's handle on a request of the API process."""

    request_id: int
    cancelled: bool = False


def serve_engine(settings: Settings, base_model: str, commands, events) -> None:
    """The engine process: load the engine, say "ready" (or why not), then run the API process's
    commands until it says stop or goes away."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s:     [engine {base_model}] %(message)s")
    # torch and the model load here, in the engine process only.
    from app.inference.engine import Engine
    from app.inference.families import UnsupportedModel

    lock = threading.Lock()  # the engine thread sends events, this one replies
    streams: dict[int, _RemoteStream] = {}

    def send(message) -> None:
        with lock:
            events.send(message)

    def send_events(items) -> None:
        out = []
        for stream, event in items:
            if isinstance(event, TextDelta):
                out.append((stream.request_id, event.text))  # the common case, pickled small
                continue
            streams.pop(stream.request_id, None)
            out.append((stream.request_id, _portable(event)))
        send(("events", out))

    engine = Engine(settings, base_model, send_events=send_events)
    try:
        engine.start()
    except (UnsupportedModel, UnsupportedBaseModel) as exc:
        send(("refused", str(exc)))
        return
    except Exception as exc:  # noqa: BLE001 - reported to the API process, which logs and refuses
        logging.exception("the engine failed to start")
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    send(("ready", (engine.context_window, engine.capacity())))
    while True:
        try:
            command, arg = commands.recv()
        except EOFError:  # the API process is gone
            command, arg = "stop", None
        if command == "submit":
            request_id, request, submitted_at = arg
            streams[request_id] = stream = _RemoteStream(request_id)
            engine.enqueue(request, stream, submitted_at)
        elif command == "cancel":
            stream = streams.get(arg)
            if stream is not None:
                stream.cancelled = True
                engine.wake()
        elif command == "unload":
            engine.unload(arg)
        elif command == "metrics":
            send(("reply", (arg, list(ENGINE_REGISTRY.collect()))))
        elif command == "stop":
            engine.stop()
            return


def _portable(event):
    """A Completion as it is; a Failure's error as one the API process can unpickle without the
    engine's imports (torch's errors become a RuntimeError that names them)."""
    if isinstance(event, Failure) and not type(event.error).__module__.startswith("app."):
        return Failure(RuntimeError(f"{type(event.error).__name__}: {event.error}"))
    return event
