"""The engine in-process on the real model: the pooled LoRA math against PEFT's mixed-adapter
batches, continuous batching against solo runs, and the adapter tiers (LRU, pins, unload)."""

import asyncio
import json
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.core.adapter_files import AdapterFileError
from app.core.artifacts import sha256_file
from app.core.settings import Settings
from app.inference.decoder import BatchDecoder
from app.inference.engine import Engine
from app.inference.lora import AdapterPool
from app.inference.messages import AdapterRef
from tests.conftest import link_base_model
from tests.inference_support import (
    generate,
    load_adapter_weights,
    prefill_rows,
    publish_adapter_files,
    write_peft_adapter,
)

LONG_PROMPT = "In a small village at the edge of a great forest there lived an old clockmaker who " * 3


@pytest.fixture(scope="module")
def settings(tmp_path_factory, base_model_dir) -> Settings:
    data_dir = tmp_path_factory.mktemp("data")
    link_base_model(data_dir, base_model_dir)
    return Settings(data_dir=data_dir, device="cpu", gpu_adapter_slots=2, cpu_adapter_cache=2)


@pytest.fixture(scope="module")
def engine(settings):
    engine = Engine(settings)
    engine.start()
    yield engine
    engine.stop()


def adapter(settings, seed, **kw) -> AdapterRef:
    directory = publish_adapter_files(settings, seed, **kw)
    return AdapterRef(directory.name, directory)


@pytest.mark.slow
def test_pooled_lora_equals_peft_mixed_adapter_batch(base_model_dir, tmp_path):
    """PEFT's adapter_names= mixed batch is the reference for the per-row pooled LoRA math: the
    last position's logits of a prefill over the base and two adapters in one batch."""
    # One adapter as peft itself saves it (all linear layers, rsLoRA), one from the test writer.
    torch.manual_seed(5)
    saved = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model_dir),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            use_rslora=True,
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    first = tmp_path / "first"
    saved.save_pretrained(first, safe_serialization=True)
    second = write_peft_adapter(
        tmp_path / "second",
        base_model_dir,
        seed=6,
        rank=8,
        alpha=8,
        targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"),
    )
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    ids = tokenizer(["The weather today is"] * 3, return_tensors="pt").input_ids

    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model_dir), first, adapter_name="first"
    )
    peft.load_adapter(second, adapter_name="second")
    with torch.inference_mode():
        expected = peft(input_ids=ids, adapter_names=["__base__", "first", "second"]).logits

    model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    pool = AdapterPool(model, num_slots=2, device=torch.device("cpu"))
    for slot, directory in ((1, first), (2, second)):
        version = sha256_file(directory / "adapter_model.safetensors")
        (directory / "manifest.json").write_text(json.dumps({"sha256": version}))
        pool.write(slot, load_adapter_weights(AdapterRef(version, directory), base_model_dir))
    decoder = BatchDecoder(model, pool, 4, 64, kv_blocks=17)
    with torch.inference_mode():
        actual, _, _ = prefill_rows(decoder, ids.tolist(), [0, 1, 2])
    expected = expected[:, -1]
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(actual[0], actual[1], atol=1e-3)
    assert not torch.allclose(actual[1], actual[2], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "running_prompt, joining_prompt",
    [
        ("Hi", LONG_PROMPT),  # the joiner is wider than the batch: the batch gets padded
        (LONG_PROMPT, "Hi"),  # the joiner is narrower: it gets padded
    ],
)
def test_a_request_joining_a_running_batch_gets_its_solo_output(
    engine, settings, running_prompt, joining_prompt
):
    ref = adapter(settings, 21)

    async def scenario():
        solo_running = await generate(engine, running_prompt, ref, max_tokens=14)
        solo_joining = await generate(engine, joining_prompt, None, max_tokens=8)
        joined = asyncio.Event()
        running = asyncio.create_task(
            generate(engine, running_prompt, ref, max_tokens=14, on_token=lambda t: joined.set())
        )
        await joined.wait()
        together = await asyncio.gather(running, generate(engine, joining_prompt, None, max_tokens=8))
        assert together == [solo_running, solo_joining]

    asyncio.run(scenario())


@pytest.mark.slow
def test_full_slots_evict_the_least_recently_used_idle_adapter_never_a_pinned_one(engine, settings):
    a, b, c, d = (adapter(settings, seed) for seed in (31, 32, 33, 34))

    async def scenario():
        started = asyncio.Event()
        # a is pinned by a long request and is also the least recently used slot.
        long_a = asyncio.create_task(
            generate(engine, "Tell me a story", a, max_tokens=40, on_token=lambda t: started.set())
        )
        await started.wait()
        await generate(engine, "Hello", b, max_tokens=2)  # b: resident, idle
        await generate(engine, "Hello", c, max_tokens=2)  # needs a slot: evicts b
        gpu = engine.resident_adapters()["gpu"]
        assert a.version in gpu and c.version in gpu and b.version not in gpu
        assert not long_a.done()
        # Both slots pinned: d waits (it neither evicts nor fails) until a slot is released.
        started_c = asyncio.Event()
        long_c = asyncio.create_task(
            generate(engine, "Tell me a story", c, max_tokens=30, on_token=lambda t: started_c.set())
        )
        await started_c.wait()
        waiting_d = asyncio.create_task(generate(engine, "Hello", d, max_tokens=2))
        await asyncio.sleep(0.3)
        assert not waiting_d.done() and not long_a.done()
        await asyncio.gather(long_a, long_c, waiting_d)
        gpu = engine.resident_adapters()["gpu"]
        assert d.version in gpu and len(gpu) == 2

    asyncio.run(scenario())


def test_unload_frees_both_tiers_and_a_failed_load_disturbs_nothing(engine, settings):
    ref = adapter(settings, 41)
    corrupt = adapter(settings, 42)
    weights = corrupt.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    async def scenario():
        before = await generate(engine, "Hello", ref, max_tokens=4)
        assert ref.version in engine.resident_adapters()["gpu"]
        assert ref.version in engine.resident_adapters()["cpu"]
        with pytest.raises(AdapterFileError, match="manifest"):
            await generate(engine, "Hello", corrupt, max_tokens=4)
        assert await generate(engine, "Hello", ref, max_tokens=4) == before
        engine.unload(ref.version)
        deadline = time.monotonic() + 5
        while ref.version in str(engine.resident_adapters()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # A later request loads the version again from disk.
        assert await generate(engine, "Hello", ref, max_tokens=4) == before

    asyncio.run(scenario())


def test_unload_during_a_request_lets_it_finish_then_frees_the_slot(engine, settings):
    ref = adapter(settings, 51)

    async def scenario():
        solo = await generate(engine, "Tell me a story", ref, max_tokens=16)
        started = asyncio.Event()
        running = asyncio.create_task(
            generate(engine, "Tell me a story", ref, max_tokens=16, on_token=lambda t: started.set())
        )
        await started.wait()
        engine.unload(ref.version)
        assert await running == solo
        await asyncio.sleep(0.1)
        assert ref.version not in str(engine.resident_adapters())

    asyncio.run(scenario())


@pytest.mark.slow
def test_engine_greedy_tokens_equal_peft_generate_for_every_adapter(engine, settings, base_model_dir):
    """The engine's own path (batched prefill, pooled LoRA, decode over the preallocated cache)
    against plain PEFT generate, one adapter at a time, while all run together in one batch."""
    refs = [
        None,
        adapter(
            settings,
            61,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
        adapter(settings, 62, rank=4, alpha=8),
    ]
    prompts = ["The weather today is", LONG_PROMPT, "Once upon a time"]
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    expected = []
    for ref, prompt in zip(refs, prompts, strict=False):
        model = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
        if ref is not None:
            model = PeftModel.from_pretrained(model, ref.adapter_dir)
        ids = torch.tensor([engine.encode_prompt(prompt)])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
            )
        expected.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    async def scenario():
        return await asyncio.gather(
            *(generate(engine, p, r, max_tokens=12) for r, p in zip(refs, prompts, strict=False))
        )

    assert asyncio.run(scenario()) == expected
    assert len(set(expected)) == 3
