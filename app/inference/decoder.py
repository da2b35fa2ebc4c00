"""The forward passes of the engine's running batch over a preallocated KV cache.

The cache holds one row per running sequence, each written from column 0 at its own positions
(no shared padding, nothing to trim): a decode step writes every row's new key and value at the
row's own length and attends to the columns up to it. Rows are kept compact (0..n-1, in the
engine's order); a finished row is closed up by copying the later rows down.

A decode step has static shapes once the batch is rounded up to a power of two (spare rows
decode a dummy token into spare cache rows) and the attended columns to a power of two, so on
CUDA each (batch, columns) bucket is captured once as a CUDA graph and replayed: one launch per
step instead of thousands of small ones. Prefill takes every newcomer of a turn in one batch
(right-padded; causal attention keeps the padding out of the real tokens), also bucketed and
replayed as a graph up to PREFILL_GRAPH_TOKENS tokens.

Built from the model's own modules (embedding, norms, projections with their pooled LoRA, MLP,
rotary tables, head), so every family in `app.core.model_families.FAMILIES` runs this one
forward; what differs between them (fused projections, q/k norms, Gemma's norm placement, sliding
windows, soft-capping, rope per layer type) is read off the model by `families`. Sliding-window
layers keep every position in the cache and mask the keys outside the window."""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from app.inference.families import check_supported, final_softcap, layer_plans, rotary_tables
from app.inference.lora import AdapterPool

log = logging.getLogger(__name__)

# Prefill batches hold at most this many (padded) tokens; more newcomers go in further batches.
PREFILL_TOKENS = 8192
MIN_COLUMNS = 128
# Prefill batches up to this many (padded) tokens run as CUDA graphs; larger ones eagerly.
PREFILL_GRAPH_TOKENS = 4096


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


def _attend(q, k, v, mask, scaling: float, softcap: float | None) -> torch.Tensor:
    """Attention of q over k/v where `mask` is True (None: causal). Soft-capped logits take the
    eager path that transformers takes for them (SDPA has no soft-capping)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class BatchDecoder:
    def __init__(self, model: nn.Module, pool: AdapterPool, max_rows: int, context_window: int):
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
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = attn.scaling
        self.fused_qkv = hasattr(attn, "qkv_proj")
        self.qkv_sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        self.qk_norm = hasattr(attn, "q_norm")
        # Gemma: norms after attention and around the MLP; else the norm before the MLP only.
        self.sandwich_norms = hasattr(layer, "pre_feedforward_layernorm")
        self.plans = layer_plans(model, context_window)
        self.final_softcap = final_softcap(config)
        self.max_rows = _pow2(max_rows)
        self.context_window = context_window
        # Rotary tables for every position of the context (no further: rope types whose tables
        # change with the length see the length they serve), computed by the model's own rotary
        # module, then padded to the positions that prefill padding reaches.
        self.arange = torch.arange(_pow2(context_window), device=self.device)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        self.rotary = {}
        for key, (cos, sin) in rotary_tables(model, self.arange[None, :context_window], probe).items():
            padded = cos.new_zeros(2, len(self.arange), cos.shape[-1])
            padded[0, :context_window], padded[1, :context_window] = cos[0], sin[0]
            self.rotary[key] = padded
        self.use_graphs = self.device.type == "cuda"
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_key = None
        self._graph_pool = None
        self._prefill_inputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.rows = 0
        self.columns = 0
        self.k = self.v = None
        self._grow(1, MIN_COLUMNS)

    def warm_up(self) -> None:
        """On CUDA: allocate the whole cache and capture the decode step for every batch bucket
        and short prefills, so that no request waits for a capture (or a cache growth)."""
        if not self.use_graphs:
            return
        self._grow(self.max_rows, self.context_window)
        batch = 1
        while batch <= self.max_rows:
            self.decode([0] * batch, [0] * batch, [0] * batch)
            for length in (16, 32, 64, 128):
                if batch * length <= PREFILL_GRAPH_TOKENS and length <= _pow2(self.context_window):
                    self.prefill(0, [[0] * length] * batch, [0] * batch)
            batch *= 2
        torch.cuda.synchronize()

    # --- cache ---

    def _grow(self, rows: int, columns: int) -> None:
        rows = max(self.rows, min(_pow2(rows), self.max_rows))
        columns = max(self.columns, min(_pow2(max(columns, MIN_COLUMNS)), _pow2(self.context_window)))
        if (rows, columns) == (self.rows, self.columns):
            return
        # One more row than the batch can use: the scratch row that prefill padding writes into.
        shape = (self.num_layers, rows + 1, self.num_kv_heads, columns, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k is not None:
            k[:, : self.rows, :, : self.columns] = self.k[:, : self.rows]
            v[:, : self.rows, :, : self.columns] = self.v[:, : self.rows]
        self.k, self.v, self.rows, self.columns = k, v, rows, columns
        self.tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.row_ids = torch.arange(rows, device=self.device)
        self.pool.rows.set([0] * rows)
        self._drop_graphs()

    def _drop_graphs(self) -> None:
        # A memory pool whose graphs are all gone cannot be captured into again: start a new one.
        self._graphs.clear()
        self._graph_pool = None

    def compact(self, keep: list[int], columns: int) -> None:
        """Rows `keep` (in order) become rows 0..len(keep)-1; only `columns` columns are in use."""
        if keep == list(range(len(keep))):
            return
        index = torch.tensor(keep, device=self.device)
        columns = min(columns, self.columns)
        self.k[:, : len(keep), :, :columns] = self.k[:, index, :, :columns]
        self.v[:, : len(keep), :, :columns] = self.v[:, index, :, :columns]

    # --- forward ---

    def _forward(self, tokens, positions, rows, columns: int | None) -> torch.Tensor:
        """Hidden states (batch, tokens, hidden). tokens/positions: (batch, tokens); rows: (batch,)
        cache rows. columns None: prefill (causal attention among `tokens`); else a decode step
        (one token per row) attending to the row's cache columns [0, position]."""
        batch, length = tokens.shape
        x = self.body.embed_tokens(tokens)
        rotary = {key: table[:, positions].unsqueeze(2) for key, table in self.rotary.items()}
        masks = self._masks(positions, columns)
        for i, (layer, plan) in enumerate(zip(self.body.layers, self.plans, strict=True)):
            attn = layer.self_attn
            q, k, v = self._qkv(attn, layer.input_layernorm(x))
            cos, sin = rotary[plan.rope]
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            self.k[i][rows[:, None], :, positions] = k.transpose(1, 2)
            self.v[i][rows[:, None], :, positions] = v.transpose(1, 2)
            mask = masks.get(plan.window)
            if columns is None:
                k = k[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(q.shape)
                v = v[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(q.shape)
                o = _attend(q, k, v, mask, self.scaling, plan.softcap)
                o = o.transpose(1, 2).reshape(batch, length, -1)
            else:
                # One query per row: the query heads of one KV head stand in for query positions.
                q = q.reshape(batch, self.num_kv_heads, self.groups, self.head_dim)
                k, v = self.k[i][:batch, :, :columns], self.v[i][:batch, :, :columns]
                o = _attend(q, k, v, mask, self.scaling, plan.softcap).reshape(batch, 1, -1)
            o = attn.o_proj(o)
            if self.sandwich_norms:
                x = x + layer.post_attention_layernorm(o)
                x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            else:
                x = x + o
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _qkv(self, attn, h):
        """Queries, keys and values of the normed hidden states h, (batch, heads, tokens, head_dim)."""
        batch, length = h.shape[:2]
        if self.fused_qkv:
            q, k, v = attn.qkv_proj(h).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(batch, length, self.num_heads, self.head_dim)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _masks(self, positions, columns: int | None) -> dict:
        """Which keys each query sees, (batch, 1, queries, keys), per window (None: causal only),
        for the layers that need a mask: all of them in a decode step (its keys are cache
        columns); in prefill (keys: the prompt's tokens) sliding or soft-capped ones, leaving
        plain causal layers SDPA's own causal kernel."""
        if columns is None:
            # Every prefill row sits at positions 0..length-1: one mask serves them all.
            positions, keys = positions[:1], self.arange[: positions.shape[1]]
            windows = {p.window for p in self.plans if p.window is not None or p.softcap is not None}
        else:
            keys = self.arange[:columns]
            windows = {p.window for p in self.plans}
        query = positions[:, None, :, None]
        masks = {}
        for window in windows:
            visible = keys <= query
            masks[window] = visible if window is None else visible & (keys > query - window)
        return masks

    def _head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.lm_head(self.body.norm(hidden))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits, logits.argmax(dim=-1)

    def prefill(self, first_row: int, prompts: list[list[int]], slots: list[int]):
        """Write the prompts' KV into rows first_row.. and return (logits, greedy tokens) of their
        last positions, one row per prompt. The batch is padded to a power of two (spare entries
        write into the scratch row) and the length to a power of two, at least 16."""
        n, longest = len(prompts), max(len(p) for p in prompts)
        batch, length = _pow2(n), max(16, _pow2(longest))
        self._grow(first_row + n, length)
        inputs = self._prefill_inputs.get((batch, length))
        if inputs is None:
            inputs = (
                torch.zeros(batch, length, dtype=torch.long, device=self.device),
                torch.zeros(batch, dtype=torch.long, device=self.device),
                torch.zeros(batch, dtype=torch.long, device=self.device),
            )
            self._prefill_inputs[(batch, length)] = inputs
        tokens = torch.zeros(batch, length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
        rows = list(range(first_row, first_row + n)) + [self.rows] * (batch - n)
        last = [len(p) - 1 for p in prompts] + [0] * (batch - n)
        inputs[0].copy_(tokens, non_blocking=True)
        inputs[1].copy_(torch.tensor(rows), non_blocking=True)
        inputs[2].copy_(torch.tensor(last), non_blocking=True)
        self.pool.rows.set(slots + [0] * (batch - n))
        graph = batch * length <= PREFILL_GRAPH_TOKENS
        logits, greedy = self._run(("prefill", batch, length), lambda: self._prefill_static(*inputs), graph)
        return logits[:n], greedy[:n]

    def _prefill_static(self, tokens, rows, last):
        batch, length = tokens.shape
        positions = self.arange[:length].expand(batch, -1)
        hidden = self._forward(tokens, positions, rows, None)
        return self._head(hidden[self.arange[:batch], last])

    def decode(self, tokens: list[int], positions: list[int], slots: list[int]):
        """One step for rows 0..n-1: token i sits at position positions[i] of row i. Returns
        (logits, greedy tokens) for the n rows."""
        n = len(tokens)
        self._grow(n, max(positions) + 1)
        batch = min(_pow2(n), self.rows)
        columns = min(max(_pow2(max(positions) + 1), MIN_COLUMNS), self.columns)
        pad = batch - n
        self.tokens[:batch].copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        self.positions[:batch].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.pool.rows.set(slots + [0] * pad)
        logits, greedy = self._run(("decode", batch, columns), lambda: self._decode_static(batch, columns))
        return logits[:n], greedy[:n]

    def _decode_static(self, batch: int, columns: int):
        hidden = self._forward(
            self.tokens[:batch, None], self.positions[:batch, None], self.row_ids[:batch], columns
        )
        return self._head(hidden[:, 0])

    # --- CUDA graphs ---

    def _run(self, key, step, graph: bool = True):
        """step() reads only static buffers; on CUDA it is captured once per key and replayed."""
        if not (self.use_graphs and graph):
            return step()
        version = (self.rows, self.columns, self.pool.version)
        if version != self._graph_key:
            self._drop_graphs()
            self._graph_key = version
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
        # cache entries as the replay that follows (or spare and scratch rows).
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
