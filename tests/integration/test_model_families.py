"""Every served model family against transformers: a tiny random model of each family, built here
(no hub), is served by the engine in one mixed batch (the base model and adapters of different
ranks and targets), and each request's greedy tokens must equal transformers' `generate` with its
PEFT adapter. The Mistral, Qwen2 and Gemma configs slide windows shorter than prompt + generation;
the Gemma ones set soft-capping."""

import gc
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from app.core.adapter_files import AdapterFileError, check_adapter_dir
from app.core.artifacts import write_manifest
from app.inference.decoder import BatchDecoder
from app.inference.families import UnsupportedModel, check_supported
from app.inference.lora import AdapterPool
from app.inference.messages import AdapterRef
from tests.inference_support import prefill_rows
from tests.model_families_support import (
    CONTEXT,
    FAMILIES,
    NEW_TOKENS,
    SHAPE,
    WINDOW,
    build_base,
    engine_texts,
    tiny_config,
    transformers_greedy,
)

# A whole context for each of the 4 rows, and the scratch block.
KV_BLOCKS = 4 * CONTEXT // 16 + 1

PROMPTS = [
    "The weather today is",
    "In a small village at the edge of a great forest there lived an old clockmaker who",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module", params=list(FAMILIES))
def base_dir(request, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bases") / f"tiny-{request.param}"
    build_base(request.param, directory, tokenizer)
    return directory


def linear_names(model: nn.Module, block: str) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and block in n}
    )


def write_adapters(base_dir, root) -> list[AdapterRef]:
    """Three PEFT adapters of different ranks and targets, as peft saves them (random, nonzero B)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    specs = [
        dict(r=8, lora_alpha=16, target_modules="all-linear"),
        dict(r=4, lora_alpha=8, target_modules=linear_names(model, ".self_attn.")),
        dict(r=16, lora_alpha=16, target_modules=linear_names(model, ".mlp."), use_rslora=True),
    ]
    refs = []
    for i, spec in enumerate(specs):
        torch.manual_seed(10 + i)
        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base_dir),
            LoraConfig(**spec, init_lora_weights=False, task_type="CAUSAL_LM"),
        )
        directory = root / f"adapter{i}"
        peft.save_pretrained(directory, safe_serialization=True)
        refs.append(AdapterRef(write_manifest(directory, base_model=base_dir.name), directory))
    return refs


@pytest.mark.slow
def test_engine_greedy_tokens_equal_transformers_with_peft(base_dir, tokenizer, tmp_path):
    refs = write_adapters(base_dir, tmp_path)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert max(len(ids) for ids in prompts) + NEW_TOKENS > 2 * WINDOW
    # The first two share a prompt: the adapter must change the output.
    requests = list(zip([prompts[0], *prompts[:3]], [None, *refs], strict=True))

    expected = [tokenizer.decode(transformers_greedy(base_dir, ids, ref)) for ids, ref in requests]
    assert expected[0] != expected[1]
    assert engine_texts(base_dir, tmp_path / "data", requests) == expected


def test_prefill_logits_equal_transformers(base_dir, tokenizer):
    """The logits themselves, not only their argmax: final soft-capping shows here."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    with torch.inference_mode():
        last = [model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0] for ids in prompts]
        expected = torch.cat(last)
        decoder = BatchDecoder(model, AdapterPool(model, 1, torch.device("cpu")), 4, CONTEXT, KV_BLOCKS)
        logits, _, _ = prefill_rows(decoder, prompts, [0] * len(prompts))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def greedy_run(decoder: BatchDecoder, prompts: list[list[int]], slots: list[int], ahead: bool = False):
    """Prefill, then decode NEW_TOKENS - 1 steps, as the engine does: tokens per row and logits per
    step. `ahead`: each step is launched before the last one is read, its tokens fed back on the
    device (the engine's greedy rows)."""
    # Logits are copied: on CUDA they sit in a graph's output buffer, which its next replay overwrites.
    logits, greedy, blocks = prefill_rows(decoder, prompts, slots)
    tokens, steps = [[t] for t in greedy.tolist()], [logits.clone()]
    lengths = [len(p) for p in prompts]
    previous = None
    for i in range(NEW_TOKENS - 1):
        sources = list(range(len(prompts))) if ahead and i else None
        step = decoder.decode([row[-1] for row in tokens], lengths, slots, blocks, sources)
        logits = step.logits.clone()
        if previous is not None:
            for row, token in zip(tokens, previous.tokens(), strict=True):
                row.append(token)
        previous = step if ahead else None
        if not ahead:
            for row, token in zip(tokens, step.tokens(), strict=True):
                row.append(token)
        lengths = [n + 1 for n in lengths]
        steps.append(logits)
    if previous is not None:
        for row, token in zip(tokens, previous.tokens(), strict=True):
            row.append(token)
    return tokens, torch.stack(steps)


@pytest.mark.gpu
def test_cuda_graph_replay_equals_the_eager_forward_and_transformers(base_dir, tokenizer):
    """On CUDA each prefill and decode step is a captured graph, replayed: its tokens must be the
    eager forward's (logits up to rounding: cuBLAS may pick other kernels under capture), for a
    mixed batch over pooled adapters, and a base row's tokens transformers' (float32, no EOS stop:
    the decoder runs on past it)."""
    device = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(base_dir).to(device).eval()
    model.generation_config.eos_token_id = None
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    slots = [0, 1, 2]
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        ids = torch.tensor([prompts[0]], device=device)
        out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        pool = AdapterPool(model, 2, device)
        for slot, rank in ((1, 8), (2, 4)):
            pool.write(
                slot,
                {
                    name: (
                        torch.randn(rank, group.in_features, generator=generator) * 0.1,
                        torch.randn(group.out_starts[j + 1] - group.out_starts[j], rank, generator=generator)
                        * 0.1,
                        2.0,
                    )
                    for name, (group, j) in pool.targets.items()
                },
            )
        runs = []
        for graphs, ahead in ((True, False), (False, False), (True, True)):
            decoder = BatchDecoder(model, pool, 4, CONTEXT, KV_BLOCKS)
            decoder.use_graphs = graphs
            decoder.warm_up()
            runs.append(greedy_run(decoder, prompts, slots, ahead))
    (graph_tokens, graph_logits), (eager_tokens, eager_logits), (ahead_tokens, ahead_logits) = runs
    assert graph_tokens == eager_tokens == ahead_tokens
    torch.testing.assert_close(graph_logits, eager_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ahead_logits, graph_logits, atol=0, rtol=0)
    assert graph_tokens[0] == out[0, len(prompts[0]) :].tolist()


def test_a_dropped_decoder_frees_its_host_buffers_at_once(base_dir):
    """Nothing of a decoder waits for the cyclic garbage collector: it may run in the middle of a
    CUDA graph capture, and freeing pinned host memory there invalidates the capture."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    decoder = BatchDecoder(model, AdapterPool(model, 1, torch.device("cpu")), 4, CONTEXT, KV_BLOCKS)
    staging = weakref.ref(decoder._staging[0].inputs)
    gc.disable()
    try:
        del decoder
        assert staging() is None
    finally:
        gc.enable()


def test_fused_phi3_targets_are_checked_against_the_fused_base_layers(tokenizer, tmp_path):
    base_dir = tmp_path / "tiny-phi3"
    build_base("phi3", base_dir, tokenizer)
    ref = write_adapters(base_dir, tmp_path)[0]
    specs = check_adapter_dir(ref.adapter_dir, base_dir)
    assert {name.rsplit(".", 1)[-1] for name in specs} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}

    # B of the query part only, as if the adapter were trained on a model with a separate q_proj.
    weights = ref.adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
    tensors[name] = tensors[name][: SHAPE["num_attention_heads"] * SHAPE["head_dim"]].contiguous()
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match="qkv_proj: LoRA shapes"):
        check_adapter_dir(ref.adapter_dir, base_dir)


def test_unsupported_models_are_refused_saying_what_is_supported(tokenizer):
    with pytest.raises(UnsupportedModel, match=r"the gpt2 model family; supported: llama, mistral.*phi3"):
        check_supported(AutoConfig.for_model("gpt2"), CONTEXT)
    longrope = tiny_config("phi3_longrope", tokenizer)
    check_supported(longrope, CONTEXT)
    with pytest.raises(UnsupportedModel, match="longrope is served only up to 64 tokens"):
        check_supported(longrope, 2 * CONTEXT)
