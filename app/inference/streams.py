"""The handler's end of a request (`ResultStream`: an asyncio queue the engine fills from another
thread) and the delivery of a step's events to the event loops that read them. No torch: the API
process uses these whether the engine runs in it or in a process of its own."""

import asyncio
from collections import defaultdict
from collections.abc import Callable

from app.inference.messages import Completion, Failure, TextDelta


class ResultStream:
    """TextDelta events, then a Completion or a Failure. `on_cancel` tells the engine (wakes its
    thread, or sends the cancel to its process)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[["ResultStream"], None]):
        self.loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held = None  # read past while joining text deltas; returned next
        self._on_cancel = on_cancel
        self.cancelled = False
        self.done = False  # the last event has been read
        self.ended = False  # the last event has arrived (it may not have been read yet)
        self._pause = None  # the future `pause` waits on

    async def get(self):
        event = self._held if self._held is not None else await self._queue.get()
        self._held = None
        if isinstance(event, TextDelta) and not self._queue.empty():
            # Deltas that piled up while this client was slower than the engine go out as one.
            parts = [event.text]
            while not self._queue.empty():
                event = self._queue.get_nowait()
                if not isinstance(event, TextDelta):
                    self._held = event
                    break
                parts.append(event.text)
            event = TextDelta("".join(parts))
        if isinstance(event, (Completion, Failure)):
            self.done = True
        return event

    async def pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the last event arrives meanwhile."""
        if self.ended:
            return
        self._pause = self.loop.create_future()
        timer = self.loop.call_later(seconds, _wake, self._pause)
        try:
            await self._pause
        finally:
            timer.cancel()
            self._pause = None

    def cancel(self) -> None:
        """Stop generating (client gone); frees the request's batch row at the next step."""
        if not self.done:
            self.cancelled = True
            self._on_cancel(self)


def deliver(items: list[tuple[ResultStream, object]]) -> None:
    """One call_soon_threadsafe per event loop for a batch of events (one wake-up of each loop per
    step, however many streams are running)."""
    by_loop = defaultdict(list)
    for stream, event in items:
        by_loop[stream.loop].append((stream, event))
    for loop, events in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put, events)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            for stream, _ in events:
                stream.cancelled = True


def _put(events: list[tuple[ResultStream, object]]) -> None:
    for stream, event in events:
        stream._queue.put_nowait(event)
        if isinstance(event, (Completion, Failure)):
            stream.ended = True
            if stream._pause is not None:
                _wake(stream._pause)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
