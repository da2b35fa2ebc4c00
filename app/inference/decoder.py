"""The forward passes of the engine's running batch over a paged KV cache.

The cache is a pool of fixed-size blocks per layer, (blocks, BLOCK_SIZE, kv_heads, head_dim); each
sequence owns a list of blocks (its row of the block table, kept by the engine), so memory is taken
as sequences grow, not reserved for the longest context, and a finished row gives its blocks back
without moving anyone's keys. Block 0 is scratch: padding tokens write there.

A decode step attends over each row's real length (`paged_decode_attention`, flash-decoding on
CUDA). Its shapes depend only on the batch, rounded up to a power of two (spare rows decode a dummy
token into the scratch block), and the width of the block table it reads (a power of two of blocks
that holds the longest row), so on CUDA each (batch, width) bucket is captured once as a CUDA graph
and replayed: one launch per step. Prefill takes chunks of prompts (the engine bounds the tokens per
turn, so a long prompt is spread over several turns and never stalls running decodes for long): each
chunk writes its keys into its blocks and attends to the sequence's earlier chunks and itself; small
buckets are captured as graphs too.

Built from the model's own modules (embedding, norms, rotary tables, head) and the pool's fused
projections (q/k/v and gate/up as one GEMM each, with per-row LoRA beside it; o's and down's LoRA
deltas go straight into the residual stream), so every family in
`app.core.model_families.FAMILIES` runs this one forward; what differs between them (q/k norms,
Gemma's norm placement, sliding windows, soft-capping, rope per layer type) is read off the model by
`families`."""

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from app.inference.families import (
    check_supported,
    final_softcap,
    layer_plans,
    rotary_tables,
    unit_offset_norm,
)
from app.inference.fused_ops import act_and_mul, activation_kind, add_rms_norm, rotary_write_kv
from app.inference.lora import AdapterPool
from app.inference.paged_attention import (
    BLOCK_SIZE,
    blocks_for,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv,
)

log = logging.getLogger(__name__)

# Prefill forwards up to this many (padded) tokens run as CUDA graphs; larger ones eagerly.
PREFILL_GRAPH_TOKENS = 4096
# Attention reads block tables cut to a power of two of blocks, at least this many (128 tokens):
# the decode kernel sizes its splits to the table's width.
MIN_KEY_BLOCKS = 8
DECODE_INPUTS = ("tokens", "positions", "slots", "sources")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    # Partial rotary (Phi-3's partial_rotary_factor): the dims past the tables pass unrotated.
    rotated, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rotated * cos + _rotate_half(rotated) * sin, rest), dim=-1)


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens of one sequence to prefill: `tokens` at positions start.., into `blocks`."""

    tokens: list[int]
    start: int
    slot: int
    blocks: list[int]


@dataclass(frozen=True)
class DecodeStep:
    """A launched decode step of n rows. `logits` are valid until the next step is launched;
    `tokens()` (until the step after next is) waits for the step and gives its greedy tokens."""

    padded_logits: torch.Tensor  # (batch bucket, vocab)
    n: int
    greedy: np.ndarray  # pinned host memory, written once `done` has happened
    done: "torch.cuda.Event | None"

    @property
    def logits(self) -> torch.Tensor:
        return self.padded_logits[: self.n]

    def tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.greedy.tolist()


class _Staging:
    """Host buffers of one decode step (pinned on CUDA) with numpy views, the device buffers'
    views per batch bucket, and the event after which the step's tokens are on the host."""

    def __init__(self, decoder: "BatchDecoder"):
        pin = decoder.device.type == "cuda"
        rows = decoder.max_rows
        # The decoder's buffers, not the decoder: a reference cycle would leave these pinned
        # buffers to the garbage collector, which may free them while a CUDA graph is captured
        # (the pinned allocator's event calls then invalidate the capture).
        self.device_inputs, self.device_tables = decoder.inputs, decoder.tables
        self.inputs = torch.zeros(len(DECODE_INPUTS), rows, dtype=torch.long, pin_memory=pin)
        self.tables = torch.zeros(rows, decoder.max_blocks, dtype=torch.int32, pin_memory=pin)
        self.tokens = torch.zeros(rows, dtype=torch.long, pin_memory=pin)
        self.inputs_np, self.tables_np = self.inputs.numpy(), self.tables.numpy()
        self.tokens_np = self.tokens.numpy()
        self.done = torch.cuda.Event() if pin else None
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}

    def views(self, batch: int) -> tuple[torch.Tensor, ...]:
        """(device inputs, device tables, host inputs, host tables, host tokens) of `batch` rows."""
        views = self._views.get(batch)
        if views is None:
            views = self._views[batch] = (
                self.device_inputs[:, :batch],
                self.device_tables[:batch],
                self.inputs[:, :batch],
                self.tables[:batch],
                self.tokens[:batch],
            )
        return views

    def wait(self) -> None:
        """Until the last step that used these buffers is done with them (an event never
        recorded is not waited on)."""
        if self.done is not None:
            self.done.synchronize()

    def record(self) -> "torch.cuda.Event | None":
        if self.done is not None:
            self.done.record()
        return self.done


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype) -> int:
    config = model.config
    attn = model.model.layers[0].self_attn
    return 2 * len(model.model.layers) * config.num_key_value_heads * attn.head_dim * dtype.itemsize


class BatchDecoder:
    def __init__(
        self,
        model: nn.Module,
        pool: AdapterPool,
        max_rows: int,
        context_window: int,
        kv_blocks: int,
        prefill_tokens: int = 4096,
    ):
        check_supported(model.config, context_window)
        self.model = model
        self.pool = pool
        self.body = model.model
        config = model.config
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.num_layers = len(self.body.layers)
        layer = self.body.layers[0]
        attn = layer.self_attn
        self.head_dim = attn.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = attn.scaling
        self.qkv_sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qk_norm = hasattr(attn, "q_norm")
        # Gemma: norms after attention and around the MLP; else the norm before the MLP only.
        self.sandwich_norms = hasattr(layer, "pre_feedforward_layernorm")
        self.activations = [getattr(x.mlp, "act_fn", None) or x.mlp.activation_fn for x in self.body.layers]
        # On CUDA the elementwise steps run as fused Triton kernels (fused_ops).
        self.fused = self.device.type == "cuda"
        self.fused_activation = [activation_kind(a) if self.fused else None for a in self.activations]
        self.unit_offset_norm = unit_offset_norm(config)
        self.plans = layer_plans(model, context_window)
        self.final_softcap = final_softcap(config)
        self.max_rows = _pow2(max_rows)
        self.context_window = context_window
        # The most (padded) tokens one prefill forward takes; the engine chunks prompts to fit.
        self.prefill_tokens = _pow2(prefill_tokens)
        self.max_blocks = blocks_for(context_window)
        # One context's worth at least, plus the scratch block.
        self.num_blocks = max(kv_blocks, self.max_blocks + 1)
        # Rotary tables for every position of the context (no further: rope types whose tables
        # change with the length see the length they serve), computed by the model's own rotary
        # module, then padded to the positions that prefill padding reaches.
        positions = _pow2(context_window) + self.prefill_tokens
        self.arange = torch.arange(positions, device=self.device)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        self.rotary = {}
        for key, (cos, sin) in rotary_tables(model, self.arange[None, :context_window], probe).items():
            padded = cos.new_zeros(2, positions, cos.shape[-1])
            padded[0, :context_window], padded[1, :context_window] = cos[0], sin[0]
            self.rotary[key] = padded
        shape = (self.num_blocks, BLOCK_SIZE, self.num_kv_heads, self.head_dim)
        # On the CPU pages are only committed as blocks are first written.
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        self.k = [alloc(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [alloc(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        # Static inputs of the decode step, one row each: token ids, positions, pool slots, and
        # where a token comes from instead (its row in the previous step's output, or -1). Rows
        # past the batch read the scratch block.
        self.inputs = torch.zeros(len(DECODE_INPUTS), self.max_rows, dtype=torch.long, device=self.device)
        self.tokens, self.positions, self.slots, self.sources = self.inputs
        self.tables = torch.zeros(self.max_rows, self.max_blocks, dtype=torch.int32, device=self.device)
        # Each decode step's greedy tokens, where the next step reads the tokens it feeds back.
        self.feedback = torch.zeros(self.max_rows, dtype=torch.long, device=self.device)
        # Two host stagings: a step's inputs are written while the previous step's copies may
        # still be in flight, and its tokens land while the previous step's are being read.
        self._staging = [_Staging(self) for _ in range(2)]
        self._steps = 0
        self.use_graphs = self.device.type == "cuda"
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_version = None
        self._graph_pool = None
        self._prefill_inputs: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}

    def warm_up(self, prefill_batch: int | None = None) -> None:
        """On CUDA: capture the decode step for every batch bucket and short first-chunk prefills
        of up to `prefill_batch` sequences (default: as many as the rows), so that no request
        waits for a capture."""
        if not self.use_graphs:
            return
        batch = 1
        scratch = [0] * self.max_blocks
        prefill_rows = _pow2(prefill_batch or self.max_rows)
        while batch <= self.max_rows:
            width = MIN_KEY_BLOCKS
            while True:
                position = min(width, self.max_blocks) * BLOCK_SIZE - 1
                self.decode([0] * batch, [position] * batch, [0] * batch, [scratch] * batch)
                if width >= self.max_blocks:
                    break
                width *= 2
            for length in (16, 32, 64, 128):
                fits = batch * length <= PREFILL_GRAPH_TOKENS and length <= self.context_window
                if fits and batch <= prefill_rows:
                    self.prefill([Chunk([0] * length, 0, 0, scratch)] * batch)
            batch *= 2
        torch.cuda.synchronize()

    # --- forward ---

    def _forward(self, tokens, positions, slots, slot_mapping, attend):
        """The residual stream of a flat batch of tokens before the final norm, as (x, pending):
        x and the last block's output not yet added to it. Inputs: the tokens' ids, positions, pool
        slots and cache slots (where each token's key and value go). attend(q, layer, plan) gives
        the attention output (tokens, heads * head_dim) of queries (tokens, heads, head_dim)."""
        count = tokens.shape[0]
        x = self.body.embed_tokens(tokens)
        pending = None
        rotary = None if self.fused else {k: t[:, positions].unsqueeze(2) for k, t in self.rotary.items()}
        layers = zip(self.body.layers, self.plans, self.pool.layers, strict=True)
        for i, (layer, plan, groups) in enumerate(layers):
            attn = layer.self_attn
            x, h = self._add_norm(layer.input_layernorm, x, pending)
            q, k, v = groups["qkv"](h, slots).split(self.qkv_sizes, dim=-1)
            q = q.view(count, self.num_heads, self.head_dim)
            k = k.view(count, self.num_kv_heads, self.head_dim)
            v = v.view(count, self.num_kv_heads, self.head_dim)
            if self.qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            if self.fused:
                table = self.rotary[plan.rope]
                q = rotary_write_kv(q, k, v, table, positions, self.k[i], self.v[i], slot_mapping)
            else:
                cos, sin = rotary[plan.rope]
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
                write_kv(self.k[i], self.v[i], k, v, slot_mapping)
            # Outside Gemma's sandwich norms the o and down outputs are only added to the
            # residual stream, so their LoRA deltas go there directly (beside the base GEMM).
            o = groups["o"](attend(q, i, plan), slots, None if self.sandwich_norms else x)
            if self.sandwich_norms:
                x = x + layer.post_attention_layernorm(o)
                h = layer.pre_feedforward_layernorm(x)
            else:
                x, h = self._add_norm(layer.post_attention_layernorm, x, o)
            gate_up = groups["gate_up"](h, slots)
            if self.fused_activation[i] is not None:
                h = act_and_mul(gate_up, self.fused_activation[i])
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                h = self.activations[i](gate) * up
            h = groups["down"](h, slots, None if self.sandwich_norms else x)
            pending = layer.post_feedforward_layernorm(h) if self.sandwich_norms else h
        return x, pending

    def _add_norm(self, norm: nn.Module, x, add):
        """(x + add, norm(x + add)); add may be None."""
        if self.fused and not self.sandwich_norms:
            eps = getattr(norm, "variance_epsilon", None) or norm.eps
            return add_rms_norm(x, add, norm.weight, eps, self.unit_offset_norm)
        x = x if add is None else x + add
        return x, norm(x)

    def _head(self, x: torch.Tensor, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, hidden = self._add_norm(self.body.norm, x, pending)
        logits = self.model.lm_head(hidden)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits, logits.argmax(dim=-1)

    def _cache_slots(self, tables, positions, valid=None):
        """Flat cache slot of each position in its row's blocks (scratch 0 where not `valid`)."""
        index = (positions // BLOCK_SIZE).clamp(max=tables.shape[1] - 1)
        slots = tables.gather(1, index).long() * BLOCK_SIZE + positions % BLOCK_SIZE
        return slots if valid is None else torch.where(valid, slots, 0)

    # --- prefill ---

    def prefill(self, chunks: list[Chunk]):
        """Write the chunks' keys and values into their blocks and return (logits, greedy tokens)
        of each chunk's last position. The batch is padded to a power of two, the chunk length to
        a power of two (at least 16) and the keys to a power of two of blocks."""
        n = len(chunks)
        batch = _pow2(n)
        length = max(16, _pow2(max(len(c.tokens) for c in chunks)))
        key_blocks = self._width(max(c.start + len(c.tokens) for c in chunks))
        key = (batch, length, key_blocks)
        inputs = self._prefill_inputs.get(key)
        if inputs is None:
            inputs = self._prefill_inputs[key] = (
                torch.zeros(batch, length, dtype=torch.long, device=self.device),
                torch.zeros(batch, dtype=torch.long, device=self.device),  # start
                torch.zeros(batch, dtype=torch.long, device=self.device),  # chunk length
                torch.zeros(batch, dtype=torch.long, device=self.device),  # pool slot
                torch.zeros(batch, key_blocks, dtype=torch.int32, device=self.device),
            )
        tokens = torch.zeros(batch, length, dtype=torch.long)
        tables = torch.zeros(batch, key_blocks, dtype=torch.int32)
        for row, c in enumerate(chunks):
            tokens[row, : len(c.tokens)] = torch.tensor(c.tokens)
            blocks = c.blocks[:key_blocks]
            tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        pad = [0] * (batch - n)
        inputs[0].copy_(tokens, non_blocking=True)
        inputs[1].copy_(torch.tensor([c.start for c in chunks] + pad), non_blocking=True)
        inputs[2].copy_(torch.tensor([len(c.tokens) for c in chunks] + pad), non_blocking=True)
        inputs[3].copy_(torch.tensor([c.slot for c in chunks] + pad), non_blocking=True)
        inputs[4].copy_(tables, non_blocking=True)
        graph = batch * length <= PREFILL_GRAPH_TOKENS
        logits, greedy = self._run(("prefill", *key), lambda: self._prefill_static(*inputs), graph)
        return logits[:n], greedy[:n]

    def _prefill_static(self, tokens, start, count, slots, tables):
        batch, length = tokens.shape
        offsets = self.arange[:length]
        positions = start[:, None] + offsets
        valid = offsets < count[:, None]
        lengths = (start + count).int()
        cache_slots = self._cache_slots(tables, positions, valid)

        def attend(q, i, plan):
            q = q.view(batch, length, self.num_heads, self.head_dim)
            o = paged_prefill_attention(
                q, self.k[i], self.v[i], tables, start.int(), lengths, self.scaling, plan.window, plan.softcap
            )
            return o.reshape(batch * length, -1)

        x, pending = self._forward(
            tokens.reshape(-1),
            positions.reshape(-1),
            slots[:, None].expand(batch, length).reshape(-1),
            cache_slots.reshape(-1),
            attend,
        )
        last = self.arange[:batch] * length + (count - 1).clamp(min=0)
        return self._head(x[last], pending[last])

    # --- decode ---

    def decode(self, tokens, positions, slots, tables, sources=None) -> "DecodeStep":
        """Launch one step for rows 0..n-1: token i sits at position positions[i] of row i, whose
        blocks are tables[i] (a sequence of block ids, or an (n, max_blocks) int32 array). Where
        sources[i] >= 0 the token is instead the greedy token of row sources[i] of the previous
        decode step, read on the device: the step can be launched before the host has seen the
        previous one's tokens. Returns without waiting for the device."""
        n = len(tokens)
        batch = _pow2(n)
        staging = self._staging[self._steps % 2]
        self._steps += 1
        staging.wait()
        # Written through numpy: every torch call gives the GIL up, and on a busy event loop
        # each costs this thread a wait to get it back (up to the switch interval).
        inputs = staging.inputs_np
        inputs[:, n:batch] = 0
        inputs[3, n:batch] = -1
        inputs[:3, :n] = (tokens, positions, slots)
        inputs[3, :n] = -1 if sources is None else sources
        tables_np = staging.tables_np
        if isinstance(tables, np.ndarray):
            tables_np[:n] = tables
        else:
            tables_np[:n] = 0
            for row, blocks in enumerate(tables):
                tables_np[row, : len(blocks)] = blocks
        tables_np[n:batch] = 0
        device_inputs, device_tables, host_inputs, host_tables, host_tokens = staging.views(batch)
        device_inputs.copy_(host_inputs, non_blocking=True)
        device_tables.copy_(host_tables, non_blocking=True)
        width = self._width(max(positions) + 1)
        logits, greedy = self._run(("decode", batch, width), lambda: self._decode_static(batch, width))
        host_tokens.copy_(greedy, non_blocking=True)
        return DecodeStep(logits, n, staging.tokens_np[:n], staging.record())

    def _width(self, keys: int) -> int:
        """Block-table width (blocks) that attention reads for rows of up to `keys` keys."""
        return min(max(MIN_KEY_BLOCKS, _pow2(blocks_for(keys))), self.max_blocks)

    def _decode_static(self, batch: int, width: int):
        positions, tables = self.positions[:batch], self.tables[:batch, :width]
        lengths = (positions + 1).int()
        cache_slots = self._cache_slots(tables, positions[:, None])[:, 0]

        def attend(q, i, plan):
            o = paged_decode_attention(
                q, self.k[i], self.v[i], tables, lengths, self.scaling, plan.window, plan.softcap
            )
            return o.reshape(batch, -1)

        sources = self.sources[:batch]
        tokens = torch.where(sources >= 0, self.feedback[sources.clamp(min=0)], self.tokens[:batch])
        x, pending = self._forward(tokens, positions, self.slots[:batch], cache_slots, attend)
        logits, greedy = self._head(x, pending)
        self.feedback[:batch].copy_(greedy)
        return logits, greedy

    # --- CUDA graphs ---

    def _run(self, key, step, graph: bool = True):
        """step() reads only static buffers; on CUDA it is captured once per key and replayed."""
        if not (self.use_graphs and graph):
            return step()
        if self.pool.version != self._graph_version:
            # The pool's buffers were reallocated: graphs read the old ones. A memory pool whose
            # graphs are all gone cannot be captured into again: start a new one. A step still
            # running may be replaying one of them: it finishes first.
            torch.cuda.synchronize(self.device)
            self._graphs.clear()
            self._graph_pool = None
            self._graph_version = self.pool.version
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(step)
            log.info("captured %s", key)
        graph, outputs = entry
        graph.replay()
        return outputs

    def _capture(self, step):
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        # Warm-up runs on a side stream (the documented capture recipe); they write the same
        # cache entries as the replay that follows (or the scratch block).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader thread may pin host memory meanwhile.
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            outputs = step()
        return graph, outputs
