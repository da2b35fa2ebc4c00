"""Tokens per micro-batch on a GPU, from the model's shape and the memory a run may use: pure
arithmetic (no torch), so that it is tested without a GPU. worker/pipeline.py measures the inputs.

Estimated peak of a micro-batch of T tokens (gradient checkpointing per decoder layer, bf16):

    resident + 3 x trainable + LOSS_CHUNK_TOKENS x vocab x LOGIT_BYTES
        + T x ACTIVATION_BYTES x layers x hidden

- resident: what the loaded model and its adapter hold (NF4 weights, bf16 embeddings, fp32 LoRA);
- 3 x trainable: the adapter's gradients and AdamW's two moments, fp32 like the adapter;
- the loss: lm_head + cross-entropy run in checkpointed chunks of LOSS_CHUNK_TOKENS target positions,
  whose logits are live as bf16, their fp32 copy, the fp32 log-softmax and its gradient at once;
- the activations: ACTIVATION_BYTES per token, decoder layer and hidden unit, calibrated rather than
  derived: bench/train.py's peaks on an H200 (batch 128 of ~161-token examples, taken as ~22 rows of
  1024; TinyLlama-1.1B shape 7.0 GiB, Mistral-7B shape 20.7 GiB) less the terms above (estimated from
  the shapes) leave 4.9 and 5.4 bytes; 6 keeps a margin. With worker/fused_kernels.py the same runs
  peak lower (5.4 and 15.5 GiB at 24k-token micro-batches, H200, 2026-12-02); the estimate keeps the
  unfused figure, which the families those kernels do not cover still need.
"""

import os
from dataclasses import dataclass

GIB = 2**30
# Target positions per cross-entropy chunk: 4096 x 32k-vocab fp32 logits = 0.5 GiB at a time.
LOSS_CHUNK_TOKENS = 4096
LOGIT_BYTES = 2 + 4 + 4 + 4
ACTIVATION_BYTES = 6
# Device memory that PyTorch's count of allocated bytes leaves out and a run still needs: the caching
# allocator's fragmentation, cuBLAS and cuDNN workspaces.
DEVICE_RESERVE_BYTES = 1 * GIB
# PyTorch's allocator setting for a training process. With fixed-size segments a step's activations
# (hundreds of MB each, their sizes changing with the step's tokens) kept missing the cached blocks:
# ~27 cudaFree calls in 30 steps of batch 128 on the TinyLlama-1.1B shape, each waiting for the whole
# device, where expandable segments grow and reuse one mapping (none after the first step). Measured
# 45,547 / 45,613 tokens/s without, 46,699 / 48,007 with (bench/profile_train.py, one H200, 2026-12-02).
CUDA_ALLOCATOR = "expandable_segments:True"


def cuda_allocator_environment() -> dict[str, str]:
    """The environment that gives a training process CUDA_ALLOCATOR, unless the user set PyTorch's
    allocator themselves (PYTORCH_ALLOC_CONF="" keeps PyTorch's defaults). PyTorch reads it when it
    is imported: the worker sets it as it starts, before any job imports torch."""
    if "PYTORCH_ALLOC_CONF" in os.environ or "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return {}
    return {"PYTORCH_ALLOC_CONF": CUDA_ALLOCATOR}


@dataclass(frozen=True)
class TrainShape:
    layers: int
    hidden_size: int
    vocab_size: int
    resident_bytes: int
    trainable_bytes: int

    def fixed_bytes(self) -> int:
        """What a step holds whatever its tokens."""
        loss = LOSS_CHUNK_TOKENS * self.vocab_size * LOGIT_BYTES
        return self.resident_bytes + 3 * self.trainable_bytes + loss

    def bytes_per_token(self) -> int:
        return ACTIVATION_BYTES * self.layers * self.hidden_size

    def estimated_peak_bytes(self, tokens: int) -> int:
        return self.fixed_bytes() + tokens * self.bytes_per_token()


def micro_batch_tokens(shape: TrainShape, free_bytes: int, cap_bytes: int | None, ceiling: int) -> int:
    """The most tokens per micro-batch whose estimated peak fits both the device (`free_bytes` free
    with the model loaded, less DEVICE_RESERVE_BYTES) and `cap_bytes` (TUNEFORGE_TRAIN_MEMORY_GIB,
    None for no cap), and at most `ceiling` (the most that was measured to help). 0 when not even
    the fixed part fits: the caller then runs one row at a time."""
    limit = shape.resident_bytes + free_bytes - DEVICE_RESERVE_BYTES
    if cap_bytes is not None:
        limit = min(limit, cap_bytes)
    return max(0, min(ceiling, (limit - shape.fixed_bytes()) // shape.bytes_per_token()))
