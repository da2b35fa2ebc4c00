"""The inference engine: one resident base model owned by one thread that runs a continuous,
mixed-adapter batch.

HTTP handlers `submit` a request and read its events from a `ResultStream` (an asyncio queue), so
the event loop never waits on torch; the engine hands over each step's events for all streams in
one thread-safe call, and text is detokenized incrementally (a few tokens per step, not the whole
sequence). Each loop turn the engine thread admits
waiting requests whose adapter sits in a pool slot (loads run on the loader thread meanwhile),
prefills the newcomers together, appends them to the running batch, then runs one decode step for
every running sequence at once (`BatchDecoder`: a preallocated KV cache, one row per sequence at
its own positions, so a row computes the same thing alone or next to others; on CUDA the decode
step is a replayed CUDA graph). Greedy tokens come back for the whole batch in one transfer."""

import asyncio
import logging
import queue
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.adapter_files import AdapterGone
from app.core.base_models import resolve_base_model
from app.core.metrics import (
    GPU_MEMORY_BYTES,
    INFERENCE_REQUESTS,
    INFERENCE_RUNNING,
    INFERENCE_WAITING,
    TIME_TO_FIRST_TOKEN,
    TOKENS_GENERATED,
)
from app.core.settings import Settings
from app.inference.adapters import AdapterLoader, AdapterTiers, reserve_pinned_memory
from app.inference.decoder import PREFILL_TOKENS, BatchDecoder
from app.inference.lora import AdapterPool
from app.inference.messages import Completion, EngineStopped, Failure, GenerationRequest, TextDelta
from app.inference.sampling import Detokenizer, TextTracker, make_generator, sample_token

log = logging.getLogger(__name__)


class ResultStream:
    """The handler's end of one request: TextDelta events, then a Completion or a Failure."""

    def __init__(self, loop: asyncio.AbstractEventLoop, engine: "Engine"):
        self.loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._held = None  # read past while joining text deltas; returned next
        self._engine = engine
        self.cancelled = False
        self.done = False

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

    def cancel(self) -> None:
        """Stop generating (client gone); frees the request's batch row at the next step."""
        if not self.done:
            self.cancelled = True
            self._engine.wake()


@dataclass
class Sequence:
    request: GenerationRequest
    stream: ResultStream
    submitted_at: float
    slot: int = 0
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    tracker: TextTracker | None = None
    detokenizer: Detokenizer | None = None
    token_counter: object = None  # TOKENS_GENERATED's child for this model, looked up once
    # Tokens held in the KV cache for this row (prompt + generated except the newest).
    length: int = 0


class Engine:
    def __init__(self, settings: Settings, base_model: str | None = None):
        self.settings = settings
        self.base_model = base_model or settings.serve_base_model
        self.base_dir: Path = resolve_base_model(self.base_model, settings)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.device = torch.device(
            "cuda"
            if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.ready = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inference-engine", daemon=True)
        self.loader = AdapterLoader(
            self.base_dir, self._on_adapter_loaded, self.dtype, pin=self.device.type == "cuda"
        )
        self.tiers: AdapterTiers | None = None
        self.context_window = settings.max_context_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        # Admitted, not yet in the batch (failed with the batch if a forward pass raises).
        self.prefilling: list[Sequence] = []
        # Events for the handlers, sent to their event loops together by `_send_events`.
        self.outbox: list[tuple[ResultStream, object]] = []

    # --- Any thread ---

    def start(self) -> None:
        # The event loop and this thread share the GIL: when a step's GPU work is done, the engine
        # thread waits for the loop to give the GIL up, by default for up to 5 ms. 1 ms keeps
        # that wait small next to a decode step (0.25 ms measured worse: more time lost switching).
        sys.setswitchinterval(0.001)
        self._load_model()
        self.loader.start()
        self._thread.start()
        self.ready = True

    def stop(self) -> None:
        self._stopping = True
        self.wake()
        self._thread.join(timeout=30)
        self.loader.stop()

    def wake(self) -> None:
        self._wake.set()

    def submit(self, request: GenerationRequest) -> ResultStream:
        """Queue a request; must be called on the event loop that reads the stream."""
        stream = ResultStream(asyncio.get_running_loop(), self)
        if self._stopping:
            raise EngineStopped("the inference engine is shutting down")
        self._commands.put(("submit", Sequence(request, stream, submitted_at=time.monotonic())))
        self.wake()
        return stream

    def unload(self, version: str) -> None:
        """Drop an adapter version from every tier (its model id was deleted)."""
        self._commands.put(("unload", version))
        self.wake()

    def resident_adapters(self) -> dict[str, list[str]]:
        return self.tiers.resident() if self.tiers else {"gpu": [], "cpu": []}

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --- Engine thread ---

    def _load_model(self) -> None:
        # No attn_implementation: the decoder computes attention itself, and asking for "sdpa"
        # refuses families that lack it (Gemma 2).
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        # Rank 16 (the trainer's default) from the start: loading such adapters reallocates nothing.
        pool = AdapterPool(self.model, self.settings.gpu_adapter_slots, self.device, rank=16)
        self.tiers = AdapterTiers(pool, self.settings.cpu_adapter_cache, self.loader, wake=self._wake)
        self.context_window = min(self.settings.max_context_tokens, self.model.config.max_position_embeddings)
        self.decoder = BatchDecoder(self.model, pool, self.settings.max_batch_size, self.context_window)
        with torch.inference_mode():
            self.decoder.warm_up()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        if self.device.type == "cuda":
            # The CPU tier's staging memory, pinned now (for adapters of the pool's rank on every
            # layer, the trainer's default), not while requests wait and run; one more for a load
            # in flight while the tier is full.
            reserve_pinned_memory(
                pool.staged_numel(pool.rank), self.settings.cpu_adapter_cache + 1, self.dtype
            )
            # Read when /metrics is scraped: reading it every step cost a third of the engine
            # thread's time holding the GIL (torch builds the allocator's whole stats dict).
            GPU_MEMORY_BYTES.set_function(lambda: torch.cuda.memory_allocated(self.device))

    def _on_adapter_loaded(self, version: str, result) -> None:
        self.tiers.deliver(version, result)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._turn()
                except Exception as exc:
                    log.exception("inference step failed")
                    self._fail_all(exc)
                self._send_events()
        self._drain_commands()
        self._fail_all(EngineStopped("the inference engine stopped"))
        self._send_events()

    def _emit(self, seq: Sequence, event) -> None:
        self.outbox.append((seq.stream, event))

    def _send_events(self) -> None:
        """One call_soon_threadsafe per event loop for everything emitted since the last call
        (one wake-up of the loop per step, however many streams are running)."""
        by_loop = defaultdict(list)
        for stream, event in self.outbox:
            by_loop[stream.loop].append((stream, event))
        self.outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                for stream, _ in items:
                    stream.cancelled = True

    def _turn(self) -> None:
        self._wake.clear()
        self._drain_commands()
        for version, error in self.tiers.finished_loads():
            if error is not None:
                self._fail_waiting_for(version, error)
        admitted = self._admit()
        self.prefilling = list(admitted)
        if self.prefilling:
            self._prefill_all()
            self._send_events()  # first tokens out before the decode step
        self._drop_cancelled()
        INFERENCE_WAITING.set(len(self.waiting))
        INFERENCE_RUNNING.set(len(self.running))
        if self.running:
            self._decode_step()
        elif not admitted:
            self._wake.wait(timeout=1.0)

    def _drain_commands(self) -> None:
        while True:
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "submit":
                self.waiting.append(arg)
            elif command == "unload":
                self.tiers.unload(arg)
                self._fail_waiting_for(arg, AdapterGone("the model was deleted"))

    def _admit(self) -> list[Sequence]:
        admitted, still_waiting = [], []
        for seq in self.waiting:
            if seq.stream.cancelled:
                self._finish_metrics(seq, "cancelled")
                continue
            slot = 0
            room = len(self.running) + len(admitted) < self.settings.max_batch_size
            if room and seq.request.adapter is not None:
                slot = self.tiers.acquire(seq.request.adapter)
            if not room or slot is None:
                still_waiting.append(seq)
                continue
            seq.slot = slot
            admitted.append(seq)
        self.waiting = still_waiting
        return admitted

    def _prefill_all(self) -> None:
        """Prefill this turn's newcomers in batches (one forward pass each) and append them to the
        running batch; rows run, in order, n.. for the newcomers."""
        batch: list[Sequence] = []
        longest = 0
        for seq in list(self.prefilling):
            longest = max(longest, len(seq.request.prompt_ids))
            if batch and longest * (len(batch) + 1) > PREFILL_TOKENS:
                self._prefill(batch)
                batch, longest = [], len(seq.request.prompt_ids)
            batch.append(seq)
        if batch:
            self._prefill(batch)

    def _prefill(self, batch: list[Sequence]) -> None:
        for seq in batch:
            seq.generator = make_generator(seq.request.params)
            seq.tracker = TextTracker(seq.request.params.stop)
            seq.detokenizer = Detokenizer(self.tokenizer)
            seq.token_counter = TOKENS_GENERATED.labels(seq.request.model)
            seq.length = len(seq.request.prompt_ids)
        logits, greedy = self.decoder.prefill(
            len(self.running), [s.request.prompt_ids for s in batch], [s.slot for s in batch]
        )
        greedy = greedy.tolist()
        now = time.monotonic()
        first = len(self.running)
        self.running.extend(batch)
        for seq in batch:
            self.prefilling.remove(seq)
        finished = []
        for i, seq in enumerate(batch):
            TIME_TO_FIRST_TOKEN.labels(seq.request.model).observe(now - seq.submitted_at)
            if self._accept_token(seq, logits[i], greedy[i]):
                finished.append(first + i)
        self._remove_rows(finished)

    def _decode_step(self) -> None:
        logits, greedy = self.decoder.decode(
            [s.generated[-1] for s in self.running],
            [s.length for s in self.running],
            [s.slot for s in self.running],
        )
        greedy = greedy.tolist()
        finished = []
        for row, seq in enumerate(self.running):
            seq.length += 1
            if self._accept_token(seq, logits[row], greedy[row]):
                finished.append(row)
        self._remove_rows(finished)

    def _accept_token(self, seq: Sequence, logits: torch.Tensor, greedy: int) -> bool:
        """Record one sampled token and send its text; True when the sequence is finished."""
        params = seq.request.params
        token = greedy if params.greedy else sample_token(logits, params, seq.generator)
        seq.generated.append(token)
        is_eos = token in self.eos_ids
        finished = is_eos or len(seq.generated) >= params.max_new_tokens
        seq.token_counter.inc()
        if not is_eos:
            seq.detokenizer.add(token)
        if finished:
            seq.detokenizer.finish()
        delta = seq.tracker.advance(seq.detokenizer.text, finished)
        if delta:
            self._emit(seq, TextDelta(delta))
        if not (finished or seq.tracker.stopped):
            return False
        reason = "stop" if is_eos or seq.tracker.stopped else "length"
        self._emit(seq, Completion(reason, len(seq.request.prompt_ids), len(seq.generated)))
        self._finish_metrics(seq, "completed")
        return True

    def _remove_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        for row in rows:
            self._release(self.running[row])
        gone = set(rows)
        keep = [i for i in range(len(self.running)) if i not in gone]
        columns = max(s.length + 1 for s in self.running)
        self.running = [self.running[i] for i in keep]
        if keep:
            self.decoder.compact(keep, columns)

    def _drop_cancelled(self) -> None:
        rows = [i for i, s in enumerate(self.running) if s.stream.cancelled]
        for row in rows:
            self._finish_metrics(self.running[row], "cancelled")
        self._remove_rows(rows)

    def _release(self, seq: Sequence) -> None:
        self.tiers.release(seq.slot)

    def _fail_waiting_for(self, version: str, error: Exception) -> None:
        keep = []
        for seq in self.waiting:
            if seq.request.adapter is not None and seq.request.adapter.version == version:
                self._emit(seq, Failure(error))
                self._finish_metrics(seq, "failed")
            else:
                keep.append(seq)
        self.waiting = keep

    def _fail_all(self, error: Exception) -> None:
        for seq in [*self.running, *self.prefilling]:
            self._release(seq)
        for seq in [*self.running, *self.prefilling, *self.waiting]:
            self._emit(seq, Failure(error))
            self._finish_metrics(seq, "failed")
        self.running, self.prefilling, self.waiting = [], [], []

    def _finish_metrics(self, seq: Sequence, outcome: str) -> None:
        INFERENCE_REQUESTS.labels(seq.request.model, outcome).inc()


def _deliver(items: list[tuple[ResultStream, object]]) -> None:
    for stream, event in items:
        stream._queue.put_nowait(event)
