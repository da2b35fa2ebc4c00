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

Built from the model's own modules (norms, projections with their pooled LoRA, MLP, rotary
tables, head), so any Llama-style decoder (llama, mistral, qwen2) is served."""

import logging

import torch
import torch.nn.functional as F
from torch import nn

from app.inference.lora import AdapterPool

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Prefill batches hold at most this many (padded) tokens; more newcomers go in further batches.
PREFILL_TOKENS = 8192
MIN_COLUMNS = 128
# Prefill batches up to this many (padded) tokens run as CUDA graphs; larger ones eagerly.
PREFILL_GRAPH_TOKENS = 4096


class UnsupportedModel(ValueError):
    pass


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_supported(model: nn.Module, context_window: int) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"serving supports Llama-style base models ({', '.join(SUPPORTED_MODEL_TYPES)}), "
            f"not {config.model_type}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        raise UnsupportedModel(f"rope type {rope['rope_type']} is not supported for serving")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < context_window:
        raise UnsupportedModel("sliding-window attention shorter than the context is not supported")
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "q_norm"):
            raise UnsupportedModel("attention with q/k norms is not supported for serving")


class BatchDecoder:
    def __init__(self, model: nn.Module, pool: AdapterPool, max_rows: int, context_window: int):
        check_supported(model, context_window)
        self.model = model
        self.pool = pool
        self.body = model.model
        config = model.config
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.num_layers = len(self.body.layers)
        attn = self.body.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.scaling = attn.scaling
        self.max_rows = _pow2(max_rows)
        self.context_window = context_window
        # Rotary tables for every position, computed by the model's own rotary module.
        self.arange = torch.arange(_pow2(context_window), device=self.device)
        positions = self.arange[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.body.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]
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
                if batch * length <= PREFILL_GRAPH_TOKENS:
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
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        if columns is not None:
            visible = torch.arange(columns, device=self.device)[None] <= positions
            visible = visible[:, None, None, :]  # (batch, 1, 1, columns)
        for i, layer in enumerate(self.body.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i][rows[:, None], :, positions] = k.transpose(1, 2)
            self.v[i][rows[:, None], :, positions] = v.transpose(1, 2)
            if columns is None:
                k = k[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(q.shape)
                v = v[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(q.shape)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
                o = o.transpose(1, 2).reshape(batch, length, -1)
            else:
                # One query per row: the query heads of one KV head stand in for query positions.
                q = q.reshape(batch, self.num_kv_heads, self.groups, self.head_dim)
                o = F.scaled_dot_product_attention(
                    q,
                    self.k[i][:batch, :, :columns],
                    self.v[i][:batch, :, :columns],
                    attn_mask=visible,
                    scale=self.scaling,
                )
                o = o.reshape(batch, 1, -1)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.lm_head(self.body.norm(hidden))
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
