"""Triton kernels that fuse the small elementwise steps of a decoder layer on CUDA.

A decode step is one CUDA graph of a few dozen kernels per layer, and at decode sizes each kernel
costs its launch, not its bytes: replaying (and launching) the graph takes time in proportion to its
nodes. These kernels turn the steps eager PyTorch runs as several kernels into one each:
- `add_rms_norm`: the residual add and the RMSNorm that follows it (Llama's rounding: the sum in
  the model's dtype, the norm in fp32, the weight applied after casting back; Gemma's `1 + weight`
  in fp32 with `unit_offset`);
- `rotary_write_kv`: rotary embedding of the queries and keys (rotate-half, partial rotary) and the
  write of the keys and values into the paged cache;
- `act_and_mul`: the gated MLP's act(gate) * up over the fused gate/up output (SiLU or tanh GELU).
Each rounds where the eager code rounds, so that the results differ from it only by the order of
fp32 sums. The CPU runs the models' own modules instead (decoder.py)."""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the decoder never calls these there
    triton = None

# Gated activations these kernels compute, by the class name transformers gives the module.
ACTIVATIONS = {"SiLUActivation": 0, "SiLU": 0, "GELUTanh": 1, "PytorchGELUTanh": 1, "GELUTanhActivation": 1}


def activation_kind(module) -> int | None:
    return ACTIVATIONS.get(type(module).__name__)


def add_rms_norm(x, add, weight, eps: float, unit_offset: bool):
    """(x + add, rms_norm(x + add)) for x, add (tokens, hidden); add may be None (x is returned as
    is, with its norm)."""
    tokens, hidden = x.shape
    out = torch.empty_like(x)
    summed = x if add is None else torch.empty_like(x)
    _add_rms_norm_kernel[(tokens,)](
        x, x if add is None else add, summed, out, weight, eps, hidden,
        HAS_ADD=add is not None, UNIT_OFFSET=unit_offset, BLOCK=triton.next_power_of_2(hidden),
        num_warps=8 if hidden >= 4096 else 4,
    )  # fmt: skip
    return summed, out


def rotary_write_kv(q, k, v, table, positions, k_cache, v_cache, slot_mapping):
    """Queries (tokens, heads, dim) rotated (returned, new tensor) and keys (tokens, kv_heads, dim)
    rotated and written with the values at their flat cache slots. `table` (2, positions, rot):
    cos then sin rows, as the decoder keeps them; dims past `rot` pass unrotated."""
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    rot = table.shape[-1]
    q_out = torch.empty_like(q)
    _rotary_write_kv_kernel[(tokens, heads + kv_heads)](
        q, k, v, q_out, table, positions, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), table.stride(0), table.stride(1),
        k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
        heads, dim, rot // 2,
        HALF=triton.next_power_of_2(rot // 2), REST=triton.next_power_of_2(max(dim - rot, 1)),
        HAS_REST=dim > rot, num_warps=1,
    )  # fmt: skip
    return q_out


def act_and_mul(gate_up, kind: int):
    """act(gate) * up for gate_up (tokens, 2 * inter), gate first."""
    tokens, double = gate_up.shape
    inter = double // 2
    out = gate_up.new_empty(tokens, inter)
    block = 1024
    _act_and_mul_kernel[(tokens, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0), KIND=kind, BLOCK=block, num_warps=4
    )
    return out


if triton is not None:

    @triton.jit
    def _add_rms_norm_kernel(
        x_ptr, add_ptr, sum_ptr, out_ptr, w_ptr, eps, hidden,
        HAS_ADD: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0)
        if HAS_ADD:
            a = tl.load(add_ptr + row * hidden + cols, mask=mask, other=0.0)
            # Rounded to the model's dtype, as the eager residual add is.
            x = (x.to(tl.float32) + a.to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row * hidden + cols, x, mask=mask)
        xf = x.to(tl.float32)
        variance = tl.sum(xf * xf, axis=0) / hidden
        normed = xf * tl.rsqrt(variance + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if UNIT_OFFSET:
            y = normed * (1.0 + w.to(tl.float32))
        else:
            y = normed.to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * hidden + cols, y.to(x.dtype), mask=mask)

    @triton.jit
    def _rotate(x1, x2, cos1, cos2, sin1, sin2):
        """Rotate-half rotary over the two halves, each product and sum rounded as eager bf16."""
        dt = x1.dtype
        a1 = (x1.to(tl.float32) * cos1).to(dt).to(tl.float32)
        a2 = (x2.to(tl.float32) * cos2).to(dt).to(tl.float32)
        b1 = (-x2.to(tl.float32) * sin1).to(dt).to(tl.float32)
        b2 = (x1.to(tl.float32) * sin2).to(dt).to(tl.float32)
        return (a1 + b1).to(dt), (a2 + b2).to(dt)

    @triton.jit
    def _rotary_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, qo_ptr, table_ptr, pos_ptr, kc_ptr, vc_ptr, slot_ptr,
        q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, qo_s0, qo_s1, t_s0, t_s1,
        c_s1, c_s2, page, heads, dim, half,
        HALF: tl.constexpr, REST: tl.constexpr, HAS_REST: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        i = tl.arange(0, HALF)
        m = i < half
        pos = tl.load(pos_ptr + token).to(tl.int64)
        cos1 = tl.load(table_ptr + pos * t_s1 + i, mask=m, other=0.0).to(tl.float32)
        cos2 = tl.load(table_ptr + pos * t_s1 + half + i, mask=m, other=0.0).to(tl.float32)
        sin1 = tl.load(table_ptr + t_s0 + pos * t_s1 + i, mask=m, other=0.0).to(tl.float32)
        sin2 = tl.load(table_ptr + t_s0 + pos * t_s1 + half + i, mask=m, other=0.0).to(tl.float32)
        r = tl.arange(0, REST)
        rm = r < dim - 2 * half
        if head < heads:
            src = q_ptr + token * q_s0 + head * q_s1
            dst = qo_ptr + token * qo_s0 + head * qo_s1
            o1, o2 = _rotate(
                tl.load(src + i, mask=m), tl.load(src + half + i, mask=m), cos1, cos2, sin1, sin2
            )
            tl.store(dst + i, o1, mask=m)
            tl.store(dst + half + i, o2, mask=m)
            if HAS_REST:
                tl.store(dst + 2 * half + r, tl.load(src + 2 * half + r, mask=rm), mask=rm)
        else:
            kv = head - heads
            slot = tl.load(slot_ptr + token)
            if slot >= 0:
                cache = (slot // page) * (page * c_s1) + (slot % page) * c_s1 + kv * c_s2
                src = k_ptr + token * k_s0 + kv * k_s1
                o1, o2 = _rotate(
                    tl.load(src + i, mask=m), tl.load(src + half + i, mask=m), cos1, cos2, sin1, sin2
                )
                tl.store(kc_ptr + cache + i, o1, mask=m)
                tl.store(kc_ptr + cache + half + i, o2, mask=m)
                if HAS_REST:
                    tl.store(kc_ptr + cache + 2 * half + r, tl.load(src + 2 * half + r, mask=rm), mask=rm)
                d = tl.arange(0, 2 * HALF)
                dm = d < 2 * half
                vsrc = v_ptr + token * v_s0 + kv * v_s1
                tl.store(vc_ptr + cache + d, tl.load(vsrc + d, mask=dm), mask=dm)
                if HAS_REST:
                    tl.store(vc_ptr + cache + 2 * half + r, tl.load(vsrc + 2 * half + r, mask=rm), mask=rm)

    @triton.jit
    def _act_and_mul_kernel(gu_ptr, out_ptr, inter, gu_s0, out_s0, KIND: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(gu_ptr + token * gu_s0 + cols, mask=mask, other=0.0)
        up = tl.load(gu_ptr + token * gu_s0 + inter + cols, mask=mask, other=0.0)
        g = gate.to(tl.float32)
        if KIND == 0:
            a = g / (1.0 + tl.exp(-g))
        else:
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = 0.5 * g * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
        # act(gate) is rounded to the dtype before the product, as eager computes it.
        y = a.to(gate.dtype).to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + token * out_s0 + cols, y.to(gate.dtype), mask=mask)
