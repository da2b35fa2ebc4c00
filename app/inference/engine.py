"""The inference engine: one resident base model owned by one thread that runs a continuous, mixed-
adapter batch.

HTTP handlers `submit` a request and read its events from a `ResultStream` (an asyncio queue), so
the event loop never waits on torch (the server runs the engine in a process of its own,
engine_process.py, and `enqueue`s there); the engine hands over each step's events for all streams
in one batch (`send_events`), and text is detokenized incrementally (a few tokens per step, not
the whole sequence). Each loop turn the engine thread admits waiting requests whose adapter sits in a pool
slot (loads run on the loader thread meanwhile) and whose prompt fits the free KV blocks. Short
admitted prompts (STEP_PREFILL_TOKENS in all) ride in the next decode step, a row per prompt token;
otherwise one prefill forward takes one chunk budget of them (a long prompt takes several turns,
with decode steps between them). Sequences whose prompt is in the cache join the running batch, and
one decode step runs for every running sequence at once (`BatchDecoder`: a paged KV cache, each row
at its own positions, so a row computes the same thing alone or next to others; on CUDA the decode
step is a replayed CUDA graph). Greedy tokens come back for the whole batch in one transfer, and the host
reads them while the next step already runs (on CUDA): that step is launched first, taking greedy
rows' tokens from the device (a row that has just ended has one step computed in vain, read past). A
step with a sampled row is read before the next launch. When a growing sequence finds no free block,
the most recently admitted sequence gives its blocks up and waits to be prefilled again, its tokens
so far included (recompute preemption, as in vLLM): nothing is reserved for the longest context."""

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.adapter_files import AdapterGone
from app.core.base_models import resolve_base_model
from app.core.metrics import (
    GPU_MEMORY_BYTES,
    INFERENCE_PREEMPTIONS,
    INFERENCE_REQUESTS,
    INFERENCE_RUNNING,
    INFERENCE_WAITING,
    TIME_TO_FIRST_TOKEN,
    TOKENS_GENERATED,
)
from app.core.settings import Settings
from app.inference.adapters import AdapterLoader, AdapterTiers, reserve_pinned_memory
from app.inference.decoder import BatchDecoder, Chunk, kv_bytes_per_token
from app.inference.lora import AdapterPool, slot_bytes
from app.inference.messages import Completion, EngineStopped, Failure, GenerationRequest, TextDelta
from app.inference.paged_attention import BLOCK_SIZE, blocks_for
from app.inference.prompts import encode_chat, encode_prompt
from app.inference.sampling import Detokenizer, TextTracker, make_generator, sample_token
from app.inference.streams import ResultStream, deliver

log = logging.getLogger(__name__)

# Automatic GPU adapter slots stop here (each costs every slot-indexed buffer a row).
MAX_AUTO_SLOTS = 512
# CPU tier staging buffers pinned at start (more are pinned as the tier fills).
PINNED_STAGING = 32
# Prompts that arrive together with up to this many tokens in all (and within the prefill chunk
# budget) are prefilled inside the next decode step, a row per prompt token beside the running
# rows: one forward reads the weights for both, where a prefill forward of its own would read
# them again and make the host wait for it before the next step.
STEP_PREFILL_TOKENS = 256


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
    blocks: list[int] = field(default_factory=list)
    # Of `context` (what must be in the cache before decoding), the tokens prefilled so far.
    prefilled: int = 0
    context: list[int] = field(default_factory=list)
    admitted: int = 0  # admission order: the latest gives its blocks up first
    # This row's block ids, as the decoder's block table holds them.
    table: np.ndarray | None = None
    # Decode tokens launched (the prefill's first token included) and, of them, those whose step
    # the host has not read yet; `row` is the sequence's row in the newest launched step.
    issued: int = 0
    unread: int = 0
    row: int = -1
    done: bool = False  # finished or cancelled: a step still running for it is read past


class BlockAllocator:
    """The KV cache's free blocks; block 0 is the decoder's scratch block, never handed out."""

    def __init__(self, num_blocks: int):
        self.free = list(range(num_blocks - 1, 0, -1))

    def take(self, count: int) -> list[int] | None:
        if count > len(self.free):
            return None
        taken = self.free[len(self.free) - count :]
        del self.free[len(self.free) - count :]
        return taken

    def give(self, blocks: list[int]) -> None:
        self.free.extend(blocks)


class Engine:
    def __init__(self, settings: Settings, base_model: str | None = None, send_events=deliver):
        """`send_events` takes each batch of (stream, event) pairs: by default to the streams'
        event loops in this process; in an engine process, to the API process."""
        self.settings = settings
        self._deliver = send_events
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
        # Admitted, prompt not yet all in the cache (failed with the batch if a forward pass raises).
        self.prefilling: list[Sequence] = []
        self._admissions = 0
        # The decode step launched last and not read yet, with its rows: (sequences, DecodeStep).
        self.inflight: tuple[list[Sequence], object] | None = None
        # Launch a step before reading the last one where the device runs them asynchronously: on
        # the CPU a step is done when launched, and reading it a step later only delays its tokens.
        self.launch_ahead = self.device.type == "cuda"
        # Events for the handlers, sent to their event loops together by `_send_events`.
        self.outbox: list[tuple[ResultStream, object]] = []

    # --- Any thread ---

    def start(self) -> None:
        # This thread shares the GIL with the adapter loader's threads (and, run in-process, the event
        # loop): when a step's GPU work is done, it waits for them to give the GIL up, by default
        # for up to 5 ms. 1 ms keeps that wait small next to a decode step (0.25 ms measured worse,
        # beside the event loop: more time lost switching).
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
        stream = ResultStream(asyncio.get_running_loop(), lambda _: self.wake())
        self.enqueue(request, stream, time.monotonic())
        return stream

    def enqueue(self, request: GenerationRequest, stream, submitted_at: float) -> None:
        """Queue a request whose events go to `stream` (anything with `cancelled`, as
        `send_events` knows it); `submitted_at` on the monotonic clock, for time to first token."""
        if self._stopping:
            raise EngineStopped("the inference engine is shutting down")
        self._commands.put(("submit", Sequence(request, stream, submitted_at=submitted_at)))
        self.wake()

    def unload(self, version: str) -> None:
        """Drop an adapter version from every tier (its model id was deleted)."""
        self._commands.put(("unload", version))
        self.wake()

    def capacity(self) -> str:
        """What the engine holds, sized from the settings or the free memory (logged at start)."""
        return (
            f"{self.tiers.pool.num_slots - 1} adapter slots, {self.tiers.cpu_capacity} CPU tier "
            f"entries, {(self.decoder.num_blocks - 1) * BLOCK_SIZE} KV cache tokens on {self.device}"
        )

    def resident_adapters(self) -> dict[str, list[str]]:
        return self.tiers.resident() if self.tiers else {"gpu": [], "cpu": []}

    def encode_prompt(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    # --- Engine thread ---

    def _load_model(self) -> None:
        # No attn_implementation: the decoder computes attention itself, and asking for "sdpa"
        # refuses families that lack it (Gemma 2).
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=self.dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.context_window = min(self.settings.max_context_tokens, self.model.config.max_position_embeddings)
        # Rank 16 (the trainer's default) from the start: loading such adapters reallocates nothing.
        slots = self.settings.gpu_adapter_slots or self._auto_slots()
        pool = AdapterPool(self.model, slots, self.device, rank=16)
        cpu_entries = self.settings.cpu_adapter_cache or self._auto_cpu_entries(pool)
        self.tiers = AdapterTiers(pool, cpu_entries, self.loader, wake=self._wake)
        kv_blocks = blocks_for(self.settings.kv_cache_tokens or self._auto_kv_tokens())
        self.decoder = BatchDecoder(
            self.model,
            pool,
            self.settings.max_batch_size + STEP_PREFILL_TOKENS,
            self.context_window,
            kv_blocks,
            self.settings.prefill_chunk_tokens,
        )
        self.blocks = BlockAllocator(self.decoder.num_blocks)
        with torch.inference_mode():
            # A prefill forward takes at most a batch's sequences; decode rows also hold the
            # prompt tokens prefilled in the step.
            self.decoder.warm_up(prefill_batch=self.settings.max_batch_size)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        if self.device.type == "cuda":
            # Staging memory for the CPU tier, pinned now (for adapters of the pool's rank on
            # every layer, the trainer's default), not while requests wait and run: as many as
            # are likely in flight at once; more are pinned as the tier fills, and an evicted
            # entry's buffer is reused from torch's pinned-memory cache.
            staged = pool.staged_numel(pool.rank)
            reserve_pinned_memory(staged, min(cpu_entries, PINNED_STAGING) + 1, self.dtype)
            # Read when /metrics is scraped: reading it every step cost a third of the engine
            # thread's time holding the GIL (torch builds the allocator's whole stats dict).
            GPU_MEMORY_BYTES.set_function(lambda: torch.cuda.memory_allocated(self.device))

    def _auto_slots(self) -> int:
        """GPU adapter slots when not set: on CUDA as many rank-16 adapters as fit in a tenth of
        the memory free after the weights (up to MAX_AUTO_SLOTS); on the CPU a few."""
        if self.device.type != "cuda":
            return 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(8, min(MAX_AUTO_SLOTS, int(0.1 * free) // slot_bytes(self.model, 16)))

    def _auto_cpu_entries(self, pool: AdapterPool) -> int:
        """CPU tier entries when not set: twice the GPU slots, within an eighth of the host's memory."""
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(8, min(2 * (pool.num_slots - 1), host // 8 // slot_bytes(self.model, pool.rank)))

    def _auto_kv_tokens(self) -> int:
        """KV cache tokens when not set: enough for every batch row at the full context (never
        more), within half the GPU memory free once the weights and the adapter pool are in."""
        worst = self.settings.max_batch_size * self.context_window
        if self.device.type != "cuda":
            return worst  # CPU pages are committed only as they are written
        free, _ = torch.cuda.mem_get_info(self.device)
        return min(worst, int(0.5 * free) // kv_bytes_per_token(self.model, self.dtype))

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
        """Everything emitted since the last call, in one batch."""
        if self.outbox:
            items, self.outbox = self.outbox, []
            self._deliver(items)

    def _turn(self) -> None:
        self._wake.clear()
        self._drain_commands()
        for version, error in self.tiers.finished_loads():
            if error is not None:
                self._fail_waiting_for(version, error)
        admitted = self._admit()
        if self.prefilling and not self._step_prompts():
            self._prefill_chunks()
            self._send_events()  # first tokens out before the decode step
        self._drop_cancelled()
        INFERENCE_WAITING.set(len(self.waiting))
        INFERENCE_RUNNING.set(len(self.running))
        if self.running or self.inflight or self._step_prompts():
            self._grow_blocks()
            self._decode_step()
        elif not admitted and not self.prefilling:
            self._wake.wait(timeout=1.0)

    def _drain_commands(self) -> None:
        while True:
            try:
                command, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "submit":
                arg.context = arg.request.prompt_ids
                self.waiting.append(arg)
            elif command == "unload":
                self.tiers.unload(arg)
                self._fail_waiting_for(arg, AdapterGone("the model was deleted"))

    def _admit(self) -> list[Sequence]:
        """Waiting sequences, in order, while the batch has room and their prompt fits the free
        blocks (a sequence that does not fit holds the ones after it back, so a long prompt is not
        starved by short ones)."""
        for seq in [s for s in self.waiting if s.stream.cancelled]:
            self._finish_metrics(seq, "cancelled")
        self.waiting = [s for s in self.waiting if not s.stream.cancelled]
        admitted = []
        for seq in self.waiting:
            if len(self.running) + len(self.prefilling) >= self.settings.max_batch_size:
                break
            slot = 0
            if seq.request.adapter is not None:
                slot = self.tiers.acquire(seq.request.adapter)
                if slot is None:  # loading, or every slot pinned: the others may go ahead
                    continue
            blocks = self.blocks.take(blocks_for(len(seq.context) + 1))
            if blocks is None:
                self.tiers.release(slot)
                break
            seq.slot, seq.blocks, seq.prefilled = slot, blocks, 0
            seq.table = np.zeros(self.decoder.max_blocks, dtype=np.int32)
            seq.table[: len(blocks)] = blocks
            self._admissions += 1
            seq.admitted = self._admissions
            admitted.append(seq)
            self.prefilling.append(seq)
        taken = {id(seq) for seq in admitted}
        self.waiting = [s for s in self.waiting if id(s) not in taken]
        return admitted

    def _prefill_chunks(self) -> None:
        """One prefill forward over the next chunks of the admitted prompts, within the decoder's
        prefill_tokens (padded); sequences whose context is then all in the cache join the running batch
        (rows n.., in order)."""
        budget = self.decoder.prefill_tokens
        batch: list[tuple[Sequence, Chunk]] = []
        longest = 0
        for seq in self.prefilling:
            take = min(len(seq.context) - seq.prefilled, budget)
            padded = _pow2(len(batch) + 1) * max(16, _pow2(max(longest, take)))
            if batch and padded > budget:
                break
            longest = max(longest, take)
            tokens = seq.context[seq.prefilled : seq.prefilled + take]
            batch.append((seq, Chunk(tokens, seq.prefilled, seq.slot, seq.blocks)))
        logits, greedy = self.decoder.prefill([chunk for _, chunk in batch])
        greedy = greedy.tolist()  # waits for the device, the decode step in flight included
        for i, (seq, chunk) in enumerate(batch):
            seq.prefilled += len(chunk.tokens)
            if seq.prefilled < len(seq.context):
                continue
            self._prefilled(seq)
            if seq.generated:
                continue  # resumed after preemption: its next input is the last token it generated
            finished = self._accept_token(seq, self._choose(seq, logits, i, greedy[i]))
            seq.issued = 1
            if finished:
                self._retire([seq])

    def _step_prompts(self) -> list[Sequence]:
        """The admitted prompts the next decode step prefills: all of them, when none is empty or
        partly prefilled and together they fit STEP_PREFILL_TOKENS and the chunk budget; else none
        (`_prefill_chunks` takes them)."""
        budget = min(STEP_PREFILL_TOKENS, self.decoder.prefill_tokens)
        if any(s.prefilled or not s.context for s in self.prefilling):
            return []
        return self.prefilling if sum(len(s.context) for s in self.prefilling) <= budget else []

    def _prefilled(self, seq: Sequence) -> None:
        """Its context is in the cache: the sequence joins the running batch (its first token
        still to be read, unless it resumes after preemption)."""
        self.prefilling.remove(seq)
        seq.prefilled = seq.length = len(seq.context)
        seq.issued, seq.unread, seq.row = len(seq.generated), 0, -1
        self.running.append(seq)
        if not seq.generated:
            seq.generator = make_generator(seq.request.params)
            seq.tracker = TextTracker(seq.request.params.stop)
            seq.detokenizer = Detokenizer(self.tokenizer)
            seq.token_counter = TOKENS_GENERATED.labels(seq.request.model)

    def _grow_blocks(self) -> None:
        """A block for every row to decode whose next token starts one; when none is free, the
        rows of the step in flight are read first (finished rows give theirs back), then the latest
        admitted sequence gives its blocks up (preempted) until the rest fit."""
        while True:
            full = [s for s in self._to_decode() if s.length >= len(s.blocks) * BLOCK_SIZE]
            for seq in full:
                taken = self.blocks.take(1)
                if taken is None:
                    break
                seq.table[len(seq.blocks)] = taken[0]
                seq.blocks.append(taken[0])
            else:
                return
            if self.inflight is not None:
                self._read_inflight()
                continue
            self._preempt(max([*self.running, *self.prefilling], key=lambda s: s.admitted))

    def _preempt(self, seq: Sequence) -> None:
        """Give the sequence's blocks and slot up; it waits, first in line, to be prefilled again
        with what it generated so far, then goes on where it stopped."""
        (self.running if seq in self.running else self.prefilling).remove(seq)
        self._release(seq)
        if seq.generated:
            seq.context = seq.request.prompt_ids + seq.generated[:-1]
        seq.prefilled = 0
        self.waiting.insert(0, seq)
        INFERENCE_PREEMPTIONS.inc()

    def _to_decode(self) -> list[Sequence]:
        """Running rows that still need a token (the others' last one is in flight)."""
        return [s for s in self.running if s.issued < s.request.params.max_new_tokens]

    def _decode_step(self) -> None:
        """Launch a step for the running rows and the prompts of `_step_prompts` (a row per
        prompt token, at its position, with its sequence's blocks: decode attention over the keys
        up to each row is causal prefill), then read the step before it while this one runs: a
        row whose newest token the host has not read yet takes it from the device, as does a
        prompt's first decode row from the prompt's last row. A step with a sampled row is read at
        once (its token is drawn on the host from the logits), as is every step without
        `launch_ahead`."""
        rows, prompts = self._to_decode(), list(self._step_prompts())
        launched = None
        if rows or prompts:
            # The token each row gives to whom (None: a prompt row before the last, or a resumed
            # sequence's, whose next input is the token it generated last).
            readers: list[Sequence | None] = list(rows)
            tokens = [s.generated[-1] if s.generated else 0 for s in rows]  # 0: taken from the device
            positions, slots = [s.length for s in rows], [s.slot for s in rows]
            tables, sources = [s.table for s in rows], [s.row if s.unread else -1 for s in rows]
            last_rows = []
            for seq in prompts:
                n = len(seq.context)
                tokens += seq.context
                positions += range(n)
                slots += [seq.slot] * n
                tables += [seq.table] * n
                sources += [-1] * n
                readers += [None] * (n - 1) + [None if seq.generated else seq]
                last_rows.append(len(readers) - 1)
            step = self.decoder.decode(tokens, positions, slots, np.stack(tables), sources)
            for row, seq in enumerate(rows):
                seq.length += 1
                seq.issued += 1
                seq.unread += 1
                seq.row = row
            for seq, row in zip(prompts, last_rows, strict=True):
                self._prefilled(seq)
                if not seq.generated:
                    seq.issued, seq.unread, seq.row = 1, 1, row
            launched = (readers, step)
        previous, self.inflight = self.inflight, launched
        if previous is not None:
            self._read(*previous)
        if launched is not None and not (
            self.launch_ahead and all(s.request.params.greedy for s in readers if s is not None)
        ):
            self._read_inflight()

    def _read_inflight(self) -> None:
        previous, self.inflight = self.inflight, None
        if previous is not None:
            self._read(*previous)

    def _read(self, readers: list[Sequence | None], step) -> None:
        """Accept each row's token of a finished step; rows that are done leave the batch (a step
        launched after this one may still compute theirs: it is read past)."""
        greedy = step.tokens()
        finished = []
        for row, seq in enumerate(readers):
            if seq is None or seq.done:
                continue
            seq.unread -= 1
            if self._accept_token(seq, self._choose(seq, step.padded_logits, row, greedy[row])):
                finished.append(seq)
        self._retire(finished)

    def _choose(self, seq: Sequence, logits: torch.Tensor, row: int, greedy: int) -> int:
        params = seq.request.params
        return greedy if params.greedy else sample_token(logits[row], params, seq.generator)

    def _accept_token(self, seq: Sequence, token: int) -> bool:
        """Record one token and send its text; True when the sequence is finished."""
        params = seq.request.params
        if not seq.generated:
            TIME_TO_FIRST_TOKEN.labels(seq.request.model).observe(time.monotonic() - seq.submitted_at)
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

    def _retire(self, seqs: list[Sequence]) -> None:
        """Finished or cancelled rows leave the batch; their blocks and slots are given back."""
        if not seqs:
            return
        for seq in seqs:
            seq.done = True
            self._release(seq)
        self.running = [s for s in self.running if not s.done]

    def _drop_cancelled(self) -> None:
        cancelled = [s for s in self.running if s.stream.cancelled]
        for seq in cancelled:
            self._finish_metrics(seq, "cancelled")
        self._retire(cancelled)
        for seq in [s for s in self.prefilling if s.stream.cancelled]:
            self.prefilling.remove(seq)
            seq.done = True
            self._release(seq)
            self._finish_metrics(seq, "cancelled")

    def _release(self, seq: Sequence) -> None:
        self.tiers.release(seq.slot)
        self.blocks.give(seq.blocks)
        seq.blocks = []

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
            seq.done = True
            self._emit(seq, Failure(error))
            self._finish_metrics(seq, "failed")
        self.running, self.prefilling, self.waiting, self.inflight = [], [], [], None

    def _finish_metrics(self, seq: Sequence, outcome: str) -> None:
        INFERENCE_REQUESTS.labels(seq.request.model, outcome).inc()


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
