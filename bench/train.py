"""Training benchmark: seed recipe (DESIGN.md §5) vs Tuneforge's own recipe (worker/pipeline.py).

python3 bench/train.py [--model-shape tinyllama|mistral7b|qwen3] [--steps 25] [--only seed|tuneforge]
Builds a model of that shape with random weights on the device (bench/shapes.py), synthetic chat-length
data (lognormal lengths, median ~134, max 512). Measures real (non-pad) tokens/s after warm-up, peak GPU
memory, and loss vs tokens. Results merged into docs/benchmarks/latest.json under "train" (the 1.1B
shape) or "train" -> "train_7b" / "train_qwen3".

--gpus N (N > 1): Tuneforge's recipe on one GPU, then the same steps at the same global batch
data-parallel on N GPUs (worker/distributed.py), whose ranks torchrun starts; the scaling (N-GPU
tokens/s over one GPU's, same run) goes to "train" -> "train_Ngpu" / "train_7b_Ngpu". --device cpu
runs the tiny shape instead (gloo ranks with --gpus): a smoke run that prints and merges nothing.
"""

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._results import merge
from bench.shapes import RESULT_KEYS, SHAPES, build_checkpoint
from worker.memory import cuda_allocator_environment

WARM = 3


def synthetic_examples(n, seed=0, vocab=32000):
    """n lists of token ids, lognormal lengths (median ~134, clipped to [24, 512])."""
    rnd = random.Random(seed)
    lens = [min(512, max(24, int(rnd.lognormvariate(4.9, 0.6)))) for _ in range(n)]
    return [[rnd.randrange(3, vocab) for _ in range(L)] for L in lens]


def loss_at_tokens(traj, marks=(10_000, 20_000, 40_000, 80_000)):
    """traj: list of (cumulative real tokens, loss). Returns loss at the first point >= each mark."""
    out = {}
    for m in marks:
        hit = next((loss for t, loss in traj if t >= m), None)
        if hit is not None:
            out[str(m)] = round(hit, 4)
    return out


def isolated(fn, *args):
    """fn(*args) in a fresh Python process, so that neither recipe runs in what the other left behind
    (its allocator cache, Python heap, threads). Tuneforge's step is host-bound: run after the seed in
    one process it measured 37,748 tokens/s, where bench/profile_train.py's run of the same recipe in
    a process of its own measured 44,972 (H200, 2026-12-02; docs/BENCHMARKS.md)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def run_seed(checkpoint, steps):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    bs, ga = 2, 4
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        quantization_config=bnb,
        device_map={"": 0},
        dtype=torch.float16,
        attn_implementation="sdpa",
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    )
    data = []
    for ids in synthetic_examples(bs * ga * steps):
        L = len(ids)
        pad = 512 - L
        data.append(
            {
                "input_ids": torch.tensor(ids + [2] * pad),
                "attention_mask": torch.tensor([1] * L + [0] * pad),
                "labels": torch.tensor(ids + [-100] * pad),
            }
        )
    st = {"t0": None, "t1": None, "tokens": 0, "all_tokens": 0, "step_tokens": 0, "traj": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == WARM:
                torch.cuda.synchronize()
                st["t0"] = time.time()

        def on_train_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            st["t1"] = time.time()

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *a, **k):
            n = int((inputs["labels"] != -100).sum())
            st["all_tokens"] += n
            if self.state.global_step >= WARM:
                st["tokens"] += n
            loss = super().training_step(model, inputs, *a, **k)
            st["traj_pending"] = float(loss.detach())  # micro-batch loss (already /ga)
            st["step_tokens"] += n
            st.setdefault("acc", 0.0)
            st["acc"] += st["traj_pending"]
            if st["step_tokens"] and (len(st["traj"]) < 10**6):
                pass
            return loss

    class LossLog(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            st["traj"].append((st["all_tokens"], st.get("acc", 0.0)))
            st["acc"] = 0.0

    args = TrainingArguments(
        output_dir="/tmp/run-seed",
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        max_steps=steps,
        learning_rate=2e-4,
        logging_steps=5,
        report_to="none",
        fp16=True,
        bf16=False,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        gradient_checkpointing=True,
    )
    tr = CountingTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=default_data_collator,
        callbacks=[Timer(), LossLog()],
    )
    tr.train()
    dt = st["t1"] - st["t0"]
    res = {
        "tokens_per_s": st["tokens"] / dt,
        "seconds": dt,
        "tokens": st["tokens"],
        "steps": steps,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss_trajectory": [[t, round(loss, 4)] for t, loss in st["traj"]],
    }
    del tr, model
    torch.cuda.empty_cache()
    return res


def run_tuneforge(checkpoint, steps, batch_size, device="cuda", vocab=32000):
    from worker.pipeline import bench_train

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    r = bench_train(
        synthetic_examples(4000, vocab=vocab),
        checkpoint,
        steps=steps,
        warmup_steps=WARM,
        seed=0,
        batch_size=batch_size,
        device=device,
    )
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    return r


def run_data_parallel(a, checkpoint, vocab):
    """One GPU in this process, then N GPUs through torchrun (this script, --rank-result); same steps."""
    one = run_tuneforge(checkpoint, a.steps, a.batch_size, a.device, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rank0.json"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.gpus}"]
        subprocess.run([*launch, __file__, *sys.argv[1:], "--rank-result", str(result)], check=True)
        many = json.loads(result.read_text())
    one_losses = [loss for _, loss in one["loss_trajectory"]]
    many_losses = [loss for _, loss in many["loss_trajectory"]]
    return {
        "gpus": a.gpus,
        "steps": a.steps,
        "batch_size": a.batch_size,
        "tokens_per_s": round(many["tokens_per_s"], 1),
        "one_gpu_tokens_per_s": round(one["tokens_per_s"], 1),
        "scaling": round(many["tokens_per_s"] / one["tokens_per_s"], 3),
        "peak_gib_per_gpu": [round(p, 3) for p in many["peak_gib_per_gpu"]],
        "one_gpu_peak_gib": round(one["peak_gib"], 3),
        "micro_batch_tokens": many["micro_batch_tokens"],
        "one_gpu_micro_batch_tokens": one["micro_batch_tokens"],
        # The same training: the largest relative difference between the two loss trajectories.
        "loss_max_rel_diff": max(abs(m - o) / abs(o) for m, o in zip(many_losses, one_losses, strict=True)),
    }


def run_rank(a, checkpoint, vocab):
    """One rank of run_data_parallel's torchrun launch; rank 0 writes the result."""
    from worker import distributed

    data_parallel = distributed.join(a.device)
    r = run_tuneforge(checkpoint, a.steps, a.batch_size, a.device, vocab)
    peaks = [None] * data_parallel.world
    torch.distributed.all_gather_object(peaks, r["peak_gib"])
    if data_parallel.rank == 0:
        Path(a.rank_result).write_text(json.dumps({**r, "peak_gib_per_gpu": peaks}))
    distributed.leave()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--only", choices=["seed", "tuneforge"], default=None)
    ap.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="Tuneforge examples per step (the API auto value is 16; see docs/BENCHMARKS.md)",
    )
    ap.add_argument("--gpus", type=int, default=1, help="N > 1: Tuneforge on 1 GPU, then on N (torchrun)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the tiny shape, no merge")
    ap.add_argument("--rank-result", help=argparse.SUPPRESS)  # set for the ranks that --gpus starts
    a = ap.parse_args()
    shape = "tiny" if a.device == "cpu" else a.model_shape
    checkpoint = build_checkpoint(shape)
    vocab = SHAPES[shape][1]["vocab_size"]
    if a.rank_result:
        return run_rank(a, checkpoint, vocab)
    if a.gpus > 1:
        out = run_data_parallel(a, checkpoint, vocab)
        print(f"tuneforge {a.gpus} ranks", json.dumps(out), flush=True)
        if a.device == "cuda":
            merge("train", {f"train{RESULT_KEYS[shape]}_{a.gpus}gpu": out})
        return
    out = {}
    if a.only in (None, "seed") and a.device == "cuda":
        s = isolated(run_seed, checkpoint, a.steps)
        print("seed", json.dumps({k: v for k, v in s.items() if k != "loss_trajectory"}), flush=True)
        out.update(
            seed_tokens_per_s=round(s["tokens_per_s"], 1),
            seed_peak_gib=round(s["peak_gib"], 3),
            seed_steps=a.steps,
            seed_loss_trajectory=s["loss_trajectory"],
            seed_loss_at_tokens=loss_at_tokens(s["loss_trajectory"]),
        )
    if a.only in (None, "tuneforge"):
        os.environ.update(cuda_allocator_environment())  # for the process isolated() starts next
        t = isolated(run_tuneforge, checkpoint, a.steps, a.batch_size, a.device, vocab)
        print("tuneforge", json.dumps({k: v for k, v in t.items() if k != "loss_trajectory"}), flush=True)
        out.update(
            tuneforge_batch_size=a.batch_size,
            tuneforge_steps=a.steps,
            tuneforge_tokens_per_s=round(t["tokens_per_s"], 1),
            tuneforge_peak_gib=round(t["peak_gib"], 3),
            tuneforge_loss_trajectory=t.get("loss_trajectory"),
            tuneforge_loss_at_tokens=loss_at_tokens(t.get("loss_trajectory") or []),
        )
        if "seed_tokens_per_s" in out:  # both halves measured in this run
            out["tuneforge_vs_seed"] = round(out["tuneforge_tokens_per_s"] / out["seed_tokens_per_s"], 1)
    suffix = RESULT_KEYS[a.model_shape]
    if a.device == "cuda":
        merge("train", {f"train{suffix}": out} if suffix else out)


if __name__ == "__main__":
    main()
