"""The QLoRA recipe, one readable file: setup → train → save.

setup: load the base model in 4-bit NF4 with double quantization, `prepare_model_for_kbit_training`
(gradient checkpointing, use_reentrant=False), attach LoRA. The worker keeps the prepared base
resident: the next job on the same base attaches its LoRA to it, and every job's LoRA is taken off
again when the job ends (`ResidentBase`). train: AdamW with linear warmup/decay, loss on
completion/assistant tokens only, optional packing, validation loss, metrics and checkpoints through
`TrainingHooks`. One step is `batch_size` examples; they are laid out as rows of `max_seq_length`
tokens (bin-packed, position ids restarting per example so attention is block-diagonal), rows are
grouped into micro-batches of at most `micro_batch_tokens` (on CUDA sized to the model and the
memory the run may use, worker/memory.py, up to `MICRO_BATCH_TOKENS`), and the loss is a chunked
cross-entropy over the target positions only, so the vocabulary-wide logits never exist for a whole
micro-batch. On CUDA the frozen weights run in bf16 under bf16 autocast, AdamW is fused, and
Llama-family bases run Liger's RMSNorm, SwiGLU and rotary kernels and varlen flash attention over
the packed examples (worker/fused_kernels.py); the NF4 weights' block scales are dequantized once at
load (`expand_double_quantization`). save: the adapter as safetensors; the training state
(optimizer, scheduler, RNG, data position) as safetensors + JSON, never pickle, so a new attempt or
a resumed job continues from the same step. Data-parallel (worker/distributed.py: the ranks of a
process group, which worker/ranks.py or torchrun starts), every rank trains its share of each step's
examples and the gradients are summed over the ranks, so that together they take the step one
process would take; rank 0's hooks are the ones that report and save.

The worker loop owns the database and the artifact store; this file owns the model and the math.
"""

import gc
import json
import math
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    get_linear_schedule_with_warmup,
)

from app.core.artifacts import WEIGHTS_FILE
from app.core.errors import validation_message
from app.core.hyperparameters import Hyperparameters, TrainingHyperparameters
from app.core.settings import Settings
from worker.data import IGNORE_INDEX, Example, TokenizedExamples, collate, epoch_order, load_examples
from worker.distributed import DataParallel
from worker.errors import UserError
from worker.fused_kernels import ATTENTION, fused_training, use_fused_kernels
from worker.hooks import ResidentBase, TrainingHooks, TrainResult
from worker.lora_forward import use_fused_lora_forward
from worker.memory import GIB, LOSS_CHUNK_TOKENS, TrainShape, micro_batch_tokens

LOG_EVERY_STEPS = 5
WARMUP_FRACTION = 0.03
MAX_GRAD_NORM = 1.0
# The most tokens per forward/backward on CUDA; less where the memory does not fit it
# (`fit_micro_batches`). 24 rows of 1024 keep TinyLlama-1.1B (NF4, r=16 all-linear, gradient
# checkpointing) at 6.9 GiB peak on an H100 (bench/train_matrix.py), and a step of 128 chat-length
# examples (~18 rows) runs as one micro-batch: 16k split it in two and ran ~30 % slower, and 32k
# with steps of 256 was no faster than 24k. A step bigger than a micro-batch accumulates gradients.
MICRO_BATCH_TOKENS = 24576


class RunInputs(BaseModel):
    """Where a run's inputs are and what it runs on."""

    model_config = ConfigDict(frozen=True)

    base_model_dir: Path
    training_file: Path
    validation_file: Path | None
    seed: int
    device: str
    checkpoint_every_steps: int
    # TUNEFORGE_TRAIN_MEMORY_GIB: the peak GPU memory the run may reach; None for what is free.
    train_memory_gib: float | None = None
    # Where the run's temporary files go (the job's dir, whose temps the next attempt removes);
    # None: next to the training file.
    work_dir: Path | None = None


class TrainConfig(TrainingHyperparameters, RunInputs):
    """One run: resolved hyperparameters (the API's model and limits) and where its inputs are."""

    model_config = ConfigDict(frozen=True)

    # Tokens per micro-batch on CUDA; `fit_micro_batches` sets it for the loaded model.
    micro_batch_tokens: int = MICRO_BATCH_TOKENS


class JobConfig(RunInputs):
    """A claimed job: its recorded hyperparameters, with "auto" in them until an attempt has tokenized
    the training file and recorded what they resolve to (`train`), and where its inputs are."""

    hyperparameters: Hyperparameters

    @classmethod
    def from_job(cls, hyperparameters: dict, **job_fields) -> "JobConfig":
        record = {k: v for k, v in hyperparameters.items() if k != "learning_rate"}
        try:
            recorded = Hyperparameters.model_validate(record)
        except ValidationError as exc:
            errors = [{**error, "loc": ("hyperparameters", *error["loc"])} for error in exc.errors()]
            raise UserError("invalid_hyperparameters", *validation_message(errors)) from None
        return cls(hyperparameters=recorded, **job_fields)

    def train_config(self, resolved: TrainingHyperparameters) -> TrainConfig:
        return TrainConfig(**dict(resolved), **self.model_dump(exclude={"hyperparameters"}))


def resolve_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


# ---------------------------------------------------------------- setup


def load_base_model(base_model_dir: Path, device: str):
    # NF4 + double quantization on CPU too: bitsandbytes 0.50 runs 4-bit on CPU, measured here at
    # ~1.0 s per step against ~0.7 s for fp32 (2 cores, SmolLM2-135M, 2x48 tokens, gradient
    # checkpointing included), so the CPU path runs the same recipe as the GPU one.
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_model_dir,
        quantization_config=quantization,
        dtype=compute_dtype,
        device_map={"": torch.cuda.current_device() if device == "cuda" else "cpu"},
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    if device == "cuda":
        # Not on CPU: there bitsandbytes repacks the weights for its AVX-512 kernels in eval mode
        # (validation), expanding the scales itself, and training on after that went wrong with
        # scales expanded beforehand (the fact-learning test's loss rose to 13).
        expand_double_quantization(model)
        # prepare_model_for_kbit_training upcasts every non-quantized weight (embeddings, norms,
        # lm_head) to fp32, which is there for fp16 training; with bf16 it only makes the residual
        # stream, the checkpointed activations and the lm_head matmul fp32. Frozen, so back to bf16.
        for param in model.parameters():
            if param.dtype == torch.float32 and not param.requires_grad:
                param.data = param.data.to(compute_dtype)
        use_fused_kernels(model)
    return model


def expand_double_quantization(model) -> int:
    """Dequantize each NF4 weight's double-quantized block scales once, here, rather than in every
    forward, recompute and backward of the weight: the scales (absmax) are themselves 8-bit
    blockwise-quantized, and bitsandbytes dequantizes them (two more ops and kernels) each time it
    dequantizes the weight. The NF4 codes stay as loaded and every dequantized weight is bit for bit
    the same; the price is the memory double quantization saved, 4 bytes per 64 weights (60 MB for
    1.1B parameters, 0.44 GB for 7B). Returns how many weights it expanded."""
    from bitsandbytes.functional import dequantize_blockwise

    count = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or not state.nested:
            continue
        absmax = (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
        state.absmax, state.state2, state.offset, state.nested = absmax, None, None, False
        count += 1
    return count


def fit_micro_batches(model, config: TrainConfig) -> TrainConfig:
    """`config` with micro_batch_tokens sized to the loaded model (with its adapter) and the GPU
    memory the run may use (worker/memory.py); on CPU, where a step is one micro-batch, unchanged."""
    if config.device != "cuda":
        return config
    text = model.get_base_model().config.get_text_config()
    shape = TrainShape(
        layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        resident_bytes=torch.cuda.memory_allocated(),
        trainable_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
    )
    cap = None if config.train_memory_gib is None else int(config.train_memory_gib * GIB)
    tokens = micro_batch_tokens(shape, torch.cuda.mem_get_info()[0], cap, MICRO_BATCH_TOKENS)
    return config.model_copy(update={"micro_batch_tokens": tokens})


def attach_lora(model, config: TrainConfig):
    if isinstance(config.target_modules, list):
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = sorted(set(config.target_modules) - present)
        if missing:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__}
                - {"lm_head"}
            )
            raise UserError(
                "invalid_hyperparameters",
                f"target_modules names {missing}, which this base model does not have; "
                f'its linear modules are {linear} (or use "all-linear").',
                "hyperparameters.target_modules",
            )
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    use_fused_lora_forward(model)
    return model


def detach_lora(model) -> None:
    """Take the LoRA off a model that attach_lora wrapped: PEFT's `unload` puts the original
    modules back (no LoRA layers or weights stay) and drops its config from the base; the base's
    own parameters are frozen, so they hold no gradients. Eval mode, as from_pretrained left it."""
    model.unload().eval()


def base_source(base_model_dir: Path, device: str) -> tuple:
    """What a loaded base came from: its directory, its files as they are now (a base replaced in
    place is loaded again) and the device."""
    directory = base_model_dir.resolve()
    files = tuple(
        (path.name, stat.st_size, stat.st_mtime_ns)
        for path in sorted(directory.iterdir())
        if path.is_file()
        for stat in [path.stat()]
    )
    return directory, files, device


def resident_base_model(resident: ResidentBase, config: TrainConfig, hooks: TrainingHooks):
    """The job's base: the worker's resident one if it came from the same files on the same device,
    else loaded now, once the old one is freed (two bases need not fit at once)."""
    source = base_source(config.base_model_dir, config.device)
    if resident.model is not None and resident.source == source:
        hooks.log("Base model already resident", {"base_model_resident": True})
        return resident.model
    resident.forget()
    gc.collect()
    release_memory()
    start = time.monotonic()
    model = load_base_model(config.base_model_dir, config.device)
    seconds = time.monotonic() - start
    resident.model, resident.source = model, source  # before the event, which raises if the job is lost
    hooks.log(
        f"Base model loaded in {seconds:.1f} s",
        {"base_model_resident": False, "load_seconds": round(seconds, 3)},
    )
    return model


# ---------------------------------------------------------------- training state, pickle-free


def write_training_state(directory: Path, model, optimizer, scheduler, state: dict) -> None:
    """`adapter/` (what serving loads) and `state/` (what resuming needs), safetensors + JSON."""
    model.save_pretrained(directory / "adapter", safe_serialization=True)
    (directory / "state").mkdir()
    optimizer_state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().clone().contiguous().cpu()
        for index, slot in optimizer_state["state"].items()
        for name, value in slot.items()
    }
    save_file(tensors, directory / "state" / "optimizer.safetensors")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, directory / "state" / "rng.safetensors")
    trainer_state = {
        **state,
        "optimizer_param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
    }
    (directory / "state" / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))


def read_training_state(directory: Path, model, optimizer, scheduler) -> dict:
    weights = load_file(directory / "adapter" / WEIGHTS_FILE)
    set_peft_model_state_dict(model, weights)
    trainer_state = json.loads((directory / "state" / "trainer_state.json").read_text())
    slots: dict[int, dict] = {}
    for key, value in load_file(directory / "state" / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    groups = trainer_state.pop("optimizer_param_groups")
    for group in groups:
        group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": slots, "param_groups": groups})
    scheduler.load_state_dict(trainer_state.pop("scheduler"))
    rng = load_file(directory / "state" / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return trainer_state


# ---------------------------------------------------------------- train


def _forward_loss(model, batch: dict, device: str) -> torch.Tensor:
    """The plain path: transformers' own loss over a `collate` batch (the reference the fast path
    is tested against)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(**batch, use_cache=False).loss


def pack_rows(examples: list[Example], row_length: int, packing: bool) -> list[list[Example]]:
    """Examples into rows of at most row_length tokens: first-fit decreasing when packing, one
    example per row otherwise."""
    if not packing:
        return [[ex] for ex in examples]
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(ex.input_ids)
        for i, free in enumerate(room):
            if n <= free:
                rows[i].append(ex)
                room[i] -= n
                break
        else:
            rows.append([ex])
            room.append(row_length - n)
    return rows


def micro_batches(examples: list[Example], pad_id: int, config: TrainConfig) -> list[dict]:
    """One step's examples as micro-batches {input_ids, position_ids, target_index, targets,
    cu_seqlens, max_seqlen}. Each row holds whole examples with position ids restarting at 0
    (transformers turns that into a block-diagonal causal mask; the padding at a row's end is one more
    such block); cu_seqlens are the same blocks' bounds in the flattened batch, for varlen attention.
    Targets are shifted inside each example, so no example learns to predict its neighbour's start;
    target_index lists the flat positions that have a target (computed here, on the host)."""
    rows = pack_rows(examples, config.max_seq_length, config.packing)
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    if config.device == "cuda":
        # Few distinct shapes: cuDNN attention builds an execution plan per new shape, and fixed
        # shapes are what CUDA graphs / torch.compile would need next.
        width = (
            config.max_seq_length if config.packing else min(config.max_seq_length, -(-width // 128) * 128)
        )
    rows_per_batch = max(1, config.micro_batch_tokens // width) if config.device == "cuda" else len(rows)
    # numpy, per example rather than per token: a Python loop over the ~20k tokens of a step at
    # batch 128 took ~28 ms of the host's time per step, and the step is host-bound.
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        chunk = rows[start : start + rows_per_batch]
        ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
        positions = np.empty((len(chunk), width), dtype=np.int64)  # every row written below
        index, targets, bounds = [], [], [0]
        for r, row in enumerate(chunk):
            used = 0
            for ex in row:
                n = len(ex.input_ids)
                ids[r, used : used + n] = ex.input_ids
                positions[r, used : used + n] = np.arange(n)
                labels = np.asarray(ex.labels[1:], dtype=np.int64)
                hit = np.flatnonzero(labels != IGNORE_INDEX)
                index.append(r * width + used + hit)
                targets.append(labels[hit])
                used += n
                bounds.append(r * width + used)
            if used < width:  # the padding: position ids 0.. again, its own block
                positions[r, used:] = np.arange(width - used)
                bounds.append((r + 1) * width)
        batches.append(
            {
                "input_ids": torch.from_numpy(ids),
                "position_ids": torch.from_numpy(positions),
                "target_index": torch.from_numpy(np.concatenate(index)),
                "targets": torch.from_numpy(np.concatenate(targets)),
                "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
                "max_seqlen": max(b - a for a, b in pairwise(bounds)),
            }
        )
    return batches


def _ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def _uses_plain_logits(model) -> bool:
    config = model.get_base_model().config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def micro_batch_loss_sum(model, batch: dict, device: str) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's targets. The decoder's last hidden state is taken
    at the target positions only, and lm_head + cross-entropy run in checkpointed chunks, so at
    most LOSS_CHUNK_TOKENS x vocab logits exist at a time (in forward and in backward)."""
    base = model.get_base_model()
    max_seqlen = batch["max_seqlen"]
    # From pinned memory the copy to the GPU is asynchronous: no wait for the GPU here.
    batch = {
        k: (v.pin_memory() if device == "cuda" else v).to(device, non_blocking=True)
        for k, v in batch.items()
        if isinstance(v, torch.Tensor)
    }
    packed = {}
    if base.config._attn_implementation == ATTENTION:  # inside fused_training
        packed = {"tuneforge_cu_seqlens": batch["cu_seqlens"], "tuneforge_max_seqlen": max_seqlen}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        hidden = base.get_decoder()(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **packed
        ).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["target_index"])
        weight = base.get_output_embeddings().weight
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], LOSS_CHUNK_TOKENS):
            end = start + LOSS_CHUNK_TOKENS
            total = total + torch.utils.checkpoint.checkpoint(
                _ce_sum, hidden[start:end], weight, batch["targets"][start:end], use_reentrant=False
            )
    return total


def target_count(examples: list[Example]) -> int:
    """The positions of `examples` that have a target (every label but an example's first)."""
    return sum(sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in examples)


def fast_step(
    model, examples: list[Example], pad_id: int, config: TrainConfig, n_targets: int | None = None
) -> torch.Tensor:
    """Forward + backward of one step: mean loss per target token over all its examples
    (what `_forward_loss` gives on a `collate` batch of the same examples), or the loss summed
    over `examples` divided by `n_targets`. Returns the loss, detached."""
    batches = micro_batches(examples, pad_id, config)
    if n_targets is None:
        n_targets = sum(len(b["targets"]) for b in batches)
    total = None
    with fused_training(model.get_base_model()):
        for batch in batches:
            loss = micro_batch_loss_sum(model, batch, config.device) / max(n_targets, 1)
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
    return total


def plain_step(
    model, examples: list[Example], pad_id: int, config: TrainConfig, n_targets: int | None = None
) -> torch.Tensor:
    """The same step through transformers' own forward and loss on a padded batch."""
    loss = _forward_loss(model, collate(examples, pad_id), config.device)
    if n_targets is not None:
        loss = loss * (target_count(examples) / n_targets)
    loss.backward()
    return loss.detach()


def train_step(
    model, examples: list[Example], pad_id: int, config: TrainConfig, n_targets: int | None = None
) -> torch.Tensor:
    """What `train` runs per step: the fast path, unless the model post-processes its logits.
    `n_targets`: the whole step's, when `examples` are one rank's share of it."""
    if not examples:  # a rank's share of a step of fewer examples than ranks
        return torch.zeros((), device=config.device)
    if _uses_plain_logits(model):
        return fast_step(model, examples, pad_id, config, n_targets)
    return plain_step(model, examples, pad_id, config, n_targets)


@torch.no_grad()
def validation_loss(model, examples: list[Example], config: TrainConfig, pad_id: int) -> float:
    """Mean loss per target token over the whole validation set (each rank takes its share)."""
    data_parallel = DataParallel.current()
    examples = data_parallel.shard(examples)
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), config.batch_size):
        if not _uses_plain_logits(model):
            batch = collate(examples[start : start + config.batch_size], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(_forward_loss(model, batch, config.device)) * n
            tokens += n
            continue
        for batch in micro_batches(examples[start : start + config.batch_size], pad_id, config):
            total += float(micro_batch_loss_sum(model, batch, config.device))
            tokens += len(batch["targets"])
    model.train()
    total, tokens = data_parallel.sum_values(total, tokens)
    return total / max(tokens, 1)


def make_optimizer(trainable: list, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=0.0, fused=config.device == "cuda"
    )


def optimizer_step(trainable: list, optimizer, scheduler) -> None:
    torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def resolve_hyperparameters(
    job: JobConfig, train_set: TokenizedExamples, hooks: TrainingHooks
) -> TrainConfig:
    """The job's hyperparameters with "auto" resolved from the tokenized training file; what "auto"
    became is recorded in the job, with an event, the first time."""
    requested = job.hyperparameters
    tokens = int(train_set.lengths.sum())
    resolved = requested.resolve(len(train_set), tokens)
    auto = [name for name, value in requested if value == "auto"]
    if auto:
        chosen = {name: getattr(resolved, name) for name in auto}
        hooks.record_hyperparameters(
            resolved.model_dump(),
            f"Hyperparameters: {', '.join(f'{k}={v}' for k, v in chosen.items())} "
            f"(auto, for {len(train_set)} examples of {tokens} tokens)",
            {**chosen, "examples": len(train_set), "tokens": tokens},
        )
    return job.train_config(resolved)


def train(
    job: JobConfig, hooks: TrainingHooks, resident: ResidentBase, resume_from: Path | None = None
) -> TrainResult:
    """Train on the resident base (loaded first if it is another one); the LoRA stays attached for
    the caller to publish through `save_adapter`, then `resident.end_job()` takes it off."""
    tokenizer = AutoTokenizer.from_pretrained(job.base_model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_seq_length = job.hyperparameters.max_seq_length
    train_set = load_examples(job.training_file, tokenizer, max_seq_length, "training_file", job.work_dir)
    valid_set = (
        load_examples(job.validation_file, tokenizer, max_seq_length, "validation_file", job.work_dir)
        if job.validation_file
        else []
    )
    config = resolve_hyperparameters(job, train_set, hooks)

    base = resident_base_model(resident, config, hooks)
    # Seeded once the base is there, so that the LoRA's initial weights cannot depend on whether
    # the base was loaded or already resident.
    torch.manual_seed(config.seed)
    try:
        model = attach_lora(base, config)
    except Exception as exc:
        if not isinstance(exc, UserError):  # attach_lora raises those before it touches the base
            resident.forget()  # a LoRA injected in part cannot be taken off: the next job reloads
        raise
    resident.detach = lambda: detach_lora(model)
    config = fit_micro_batches(model, config)
    if config.device == "cuda":
        hooks.log(
            f"Micro-batches of at most {config.micro_batch_tokens} tokens",
            {"micro_batch_tokens": config.micro_batch_tokens},
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config)
    data_parallel = DataParallel.current()
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.n_epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(WARMUP_FRACTION * total_steps), total_steps
    )

    step, trained_tokens = 0, 0
    if resume_from is not None:
        state = read_training_state(resume_from, model, optimizer, scheduler)
        step, trained_tokens = state["step"], state["trained_tokens"]
        hooks.log(f"Resumed from the checkpoint at step {step}", {"step": step, "resumed_from_step": step})

    def save_adapter(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)

    def checkpoint(metrics: dict) -> None:
        state = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "trained_tokens": trained_tokens,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        }
        hooks.save_checkpoint(
            step, lambda d: write_training_state(d, model, optimizer, scheduler, state), metrics
        )

    model.train()
    last_saved, window_losses, window_tokens, window_start = step, [], 0, time.monotonic()
    first_step = step + 1  # this attempt's: its metrics event says how long the start took
    while step < total_steps:
        action = hooks.control()
        if action != "continue":
            if step > last_saved:
                checkpoint({"step": step})
            return TrainResult(action, step, trained_tokens, save_adapter)

        epoch, index = divmod(step, steps_per_epoch)
        order = epoch_order(len(train_set), config.seed, epoch)
        chunk = [train_set[i] for i in order[index * config.batch_size : (index + 1) * config.batch_size]]
        # This rank's share of the step, then what one process would hold for the whole step.
        loss = train_step(model, data_parallel.shard(chunk), pad_id, config, target_count(chunk))
        loss = data_parallel.sum_gradients(trainable, loss)
        optimizer_step(trainable, optimizer, scheduler)

        step += 1
        real_tokens = sum(len(ex.input_ids) for ex in chunk)
        trained_tokens += real_tokens
        window_tokens += real_tokens
        window_losses.append(float(loss.detach()))  # waits for the step's kernels on CUDA

        save_now = step % config.checkpoint_every_steps == 0 or step % steps_per_epoch == 0
        if save_now or step % LOG_EVERY_STEPS == 0 or step == first_step:
            elapsed = max(time.monotonic() - window_start, 1e-9)
            metrics = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "train_loss": sum(window_losses) / len(window_losses),
                "learning_rate": scheduler.get_last_lr()[0],
                "tokens_per_second": window_tokens / elapsed,
            }
            if step == first_step:
                metrics["since_claim_s"] = round(time.monotonic() - hooks.claimed_at, 3)
            message = f"Step {step}/{total_steps}: training loss={metrics['train_loss']:.4f}"
            if valid_set and save_now:
                metrics["valid_loss"] = validation_loss(model, valid_set, config, pad_id)
                message += f", validation loss={metrics['valid_loss']:.4f}"
            hooks.log(message, metrics)
            if save_now:
                checkpoint(metrics)
                last_saved = step
            window_losses, window_tokens, window_start = [], 0, time.monotonic()

    return TrainResult("continue", step, trained_tokens, save_adapter)


def bench_config(
    base_model_dir, seed: int = 0, examples: int = 10**6, tokens: int = 156 * 10**6, **hyperparams
) -> TrainConfig:
    """The config the benchmarks train with: the API's hyperparameters unless given ("auto" as for
    `examples` examples of `tokens` tokens, by default a large file of chat-length examples), on CUDA
    unless `device` is given, TUNEFORGE_TRAIN_MEMORY_GIB from the environment, no files, no checkpoints."""
    device = hyperparams.pop("device", "cuda")
    return TrainConfig(
        **dict(Hyperparameters(**hyperparams).resolve(examples, tokens)),
        base_model_dir=Path(base_model_dir),
        training_file=Path("-"),
        validation_file=None,
        seed=seed,
        device=device,
        checkpoint_every_steps=10**9,
        train_memory_gib=Settings().train_memory_gib,
    )


def bench_train(
    examples: list[list[int]],
    base_model_dir: str,
    *,
    steps: int,
    warmup_steps: int = 3,
    seed: int = 0,
    **hyperparams,
) -> dict:
    """bench/train.py's entry: `steps` steps of the worker's recipe (load_base_model, attach_lora,
    make_optimizer, train_step, optimizer_step) on token-id lists trained on every token, with the
    API's default hyperparameters unless given. Times and counts real tokens after warm-up."""
    config = bench_config(base_model_dir, seed, len(examples), sum(map(len, examples)), **hyperparams)
    torch.manual_seed(seed)
    data = [Example(ids, list(ids)) for ids in examples]
    model = attach_lora(load_base_model(config.base_model_dir, config.device), config)
    config = fit_micro_batches(model, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config)
    data_parallel = DataParallel.current()
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(WARMUP_FRACTION * steps), steps)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    order = epoch_order(len(data), seed, 0)
    cuda = config.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, cumulative, tokens, t0 = [], 0, 0, time.perf_counter()
    for step in range(steps):
        if step == warmup_steps:
            if cuda:
                torch.cuda.synchronize()
            tokens, t0 = 0, time.perf_counter()
        picked = order[step * config.batch_size : (step + 1) * config.batch_size]
        if len(picked) < config.batch_size:
            raise ValueError(f"{len(data)} examples are too few for {steps} steps of {config.batch_size}")
        chunk = [data[i] for i in picked]
        loss = train_step(model, data_parallel.shard(chunk), pad_id, config, target_count(chunk))
        losses.append(data_parallel.sum_gradients(trainable, loss))
        optimizer_step(trainable, optimizer, scheduler)
        n = sum(len(ex.input_ids) for ex in chunk)
        cumulative += n
        tokens += n
        losses[-1] = (cumulative, losses[-1])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {
        "tokens": tokens,
        "seconds": seconds,
        "steps": steps,
        "batch_size": config.batch_size,
        "micro_batch_tokens": config.micro_batch_tokens,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "loss_trajectory": [[t, round(float(loss), 4)] for t, loss in losses],
    }
    del model, optimizer
    release_memory()
    return result


def release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
