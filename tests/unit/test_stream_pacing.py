"""SSE pacing as a client sees it: a stream's deltas come from another thread at the engine's pace
(as the engine-events reader delivers them); under TUNEFORGE_STREAM_CHUNKS_PER_S each SSE stream
gets fewer, longer chunks with the same text, its first token and its end at once."""

import asyncio
import threading
import time

import pytest

from app.core import settings as settings_module
from app.inference.messages import Completion, TextDelta
from app.inference.streams import ResultStream, deliver
from app.services.inference import events

TOKENS, TOKEN_INTERVAL_S = 40, 0.005


def _engine(stream: ResultStream, delivered: dict) -> None:
    for i in range(TOKENS):
        deliver([(stream, TextDelta(f"t{i} "))])
        time.sleep(TOKEN_INTERVAL_S)
    delivered["end"] = time.perf_counter()
    deliver([(stream, Completion("length", prompt_tokens=3, completion_tokens=TOKENS))])


async def _read(paced: bool):
    """(chunk texts, seconds to the first one, seconds from the Completion's delivery to reading it)."""
    stream = ResultStream(asyncio.get_running_loop(), lambda _: None)
    delivered: dict = {}
    started = time.perf_counter()
    threading.Thread(target=_engine, args=(stream, delivered), daemon=True).start()
    texts, first = [], None
    async for event in events(stream, "m", paced=paced):
        if isinstance(event, Completion):
            return texts, first, time.perf_counter() - delivered["end"]
        first = first if first is not None else time.perf_counter() - started
        texts.append(event.text)
    raise AssertionError("no Completion")


@pytest.fixture
def chunks_per_s(monkeypatch):
    def use(rate: int):
        monkeypatch.setenv("TUNEFORGE_STREAM_CHUNKS_PER_S", str(rate))
        settings_module.get_settings.cache_clear()

    yield use
    settings_module.get_settings.cache_clear()


def test_a_paced_stream_joins_its_tokens_into_fewer_chunks_without_delaying_first_or_last(chunks_per_s):
    # One stream at 5 chunks a second: a chunk every 200 ms while tokens come every ~5 ms.
    chunks_per_s(5)
    texts, first, end_lag = asyncio.run(_read(paced=True))
    assert "".join(texts) == "".join(f"t{i} " for i in range(TOKENS))
    elapsed = TOKENS * TOKEN_INTERVAL_S
    assert len(texts) <= elapsed / 0.2 + 3, texts  # ~2-3 chunks in ~0.2 s, not 40
    assert first < 0.1  # the first token goes out at once
    assert end_lag < 0.1  # the end is not held back to the next 200 ms slot


def test_unpaced_and_disabled_streams_send_every_token(chunks_per_s):
    chunks_per_s(0)
    texts, _, _ = asyncio.run(_read(paced=True))
    assert len(texts) > TOKENS // 2  # about one a token (a few may pile up on a busy machine)
    chunks_per_s(5)
    texts, _, _ = asyncio.run(_read(paced=False))  # a whole answer's collection is never paced
    assert len(texts) > TOKENS // 2
