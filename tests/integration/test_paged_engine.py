"""The engine's paged KV cache and chunked prefill on the real model: a request's greedy text does
not depend on how its prompt was chunked or on other requests taking its blocks (preemption), and a
long prompt does not stall the streams already running."""

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from app.core.artifacts import write_manifest
from app.core.metrics import INFERENCE_PREEMPTIONS, INFERENCE_REQUESTS
from app.core.settings import Settings
from app.inference.engine import STEP_PREFILL_TOKENS, Engine
from app.inference.messages import AdapterRef
from tests.conftest import link_base_model
from tests.inference_support import generate, write_peft_adapter
from tests.model_families_support import build_base

STORY = "Once upon a time"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LONG_PROMPT = "In a small village at the edge of a great forest there lived an old clockmaker who " * 5


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, base_model_dir):
    data_dir = tmp_path_factory.mktemp("data")
    link_base_model(data_dir, base_model_dir)
    return data_dir


def started(data_dir, **settings) -> Engine:
    engine = Engine(Settings(data_dir=data_dir, device="cpu", max_context_tokens=128, **settings))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def roomy(data_dir):
    engine = started(data_dir)
    yield engine
    engine.stop()


@pytest.mark.slow
def test_sequences_that_lose_their_blocks_resume_with_their_solo_text(data_dir, roomy):
    """Three streams that together need more KV blocks than the cache has: the newest gives its
    blocks up whenever another must grow, is prefilled again with what it generated, and every
    stream still gets exactly the text it gets alone on a roomy engine."""
    prompts = ["List many colours:", "Once upon a time", "The history of Rome begins"]
    solo = [asyncio.run(generate(roomy, p, max_tokens=60)) for p in prompts]
    assert all(len(roomy.tokenizer(t)["input_ids"]) > 40 for t in solo)  # ~60 tokens each
    # 9 blocks of 16 tokens, 8 usable: a context (128) for one stream, not ~80 tokens for three.
    tight = started(data_dir, kv_cache_tokens=9 * 16)
    try:
        before = INFERENCE_PREEMPTIONS._value.get()

        async def together():
            return await asyncio.gather(*(generate(tight, p, max_tokens=60) for p in prompts))

        assert asyncio.run(together()) == solo
        assert INFERENCE_PREEMPTIONS._value.get() > before
        assert len(tight.blocks.free) == tight.decoder.num_blocks - 1  # every block given back
    finally:
        tight.stop()


@pytest.mark.slow
def test_rows_ending_while_the_next_step_runs_leave_the_others_untouched(roomy):
    """A greedy row's next step is launched before the host reads its token, so a row that ends
    on a token (EOS, a stop string) has one more step computed, and read past. In one batch with
    rows that end at other steps and a sampled row (its steps are read at once), every stream gets
    its solo text, completes once, and every block comes back."""
    requests = [
        ("Write a poem about the sea", {"max_tokens": 40}),  # EOS after ~9 tokens
        ("Once upon a time", {"max_tokens": 30, "stop": (" skyscrapers",)}),
        ("List many colours:", {"max_tokens": 40}),
        ("The history of Rome begins", {"max_tokens": 23}),
        ("Hello", {"max_tokens": 3, "temperature": 0.9, "seed": 7}),
        ("The history of Rome begins", {"max_tokens": 1}),
    ]

    async def solo():
        return [await generate(roomy, prompt, **kw) for prompt, kw in requests]

    async def together():
        return await asyncio.gather(*(generate(roomy, prompt, **kw) for prompt, kw in requests))

    alone = asyncio.run(solo())
    assert alone[1].endswith(" towering") and len(roomy.tokenizer(alone[0])["input_ids"]) < 20
    completed = INFERENCE_REQUESTS.labels("test", "completed")
    roomy.launch_ahead = True  # as on CUDA (the CPU reads each step at once)
    try:
        for _ in range(2):
            before = completed._value.get()
            assert asyncio.run(together()) == alone
            assert completed._value.get() == before + len(requests)  # each completes once
    finally:
        roomy.launch_ahead = False
    assert len(roomy.blocks.free) == roomy.decoder.num_blocks - 1
    assert roomy.running == [] and roomy.inflight is None


@pytest.mark.slow
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(data_dir, roomy):
    solo_long = asyncio.run(generate(roomy, LONG_PROMPT, max_tokens=8))
    chunked = started(data_dir, prefill_chunk_tokens=16)
    try:

        def tokens(text: str) -> int:
            return len(chunked.tokenizer(text, add_special_tokens=False)["input_ids"])

        async def scenario():
            running_text = [""]
            first = asyncio.Event()

            def on_running(text):
                running_text[0] = text
                first.set()

            running = asyncio.create_task(generate(chunked, STORY, max_tokens=80, on_token=on_running))
            await first.wait()
            submitted_at = tokens(running_text[0])
            seen_at = []
            long_text = await generate(
                chunked, LONG_PROMPT, max_tokens=8, on_token=lambda t: seen_at.append(tokens(running_text[0]))
            )
            await running
            return long_text, seen_at[0] - submitted_at

        long_text, decoded_meanwhile = asyncio.run(scenario())
        chunks = -(-len(chunked.encode_prompt(LONG_PROMPT)) // 16)
        assert long_text == solo_long
        # A decode step of the running stream after every chunk but the last (give or take the
        # one token that re-tokenizing its text may merge).
        assert decoded_meanwhile >= chunks - 2
    finally:
        chunked.stop()


@pytest.mark.gpu
def test_on_cuda_each_request_in_a_mixed_batch_gets_its_solo_text(base_model_dir, tmp_path):
    """On CUDA, where steps are launched ahead and each group's LoRA runs on a side stream: short
    prompts are prefilled inside decode steps beside the running rows, the long one by a prefill
    forward of its own; with adapters and the base model in one batch, every request's greedy text
    equals the same request alone. (A tiny random Llama: the device has no embedded weights.)"""
    base_dir = tmp_path / "tiny-llama"
    build_base("llama", base_dir, AutoTokenizer.from_pretrained(base_model_dir))
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    refs = []
    for seed in range(2):
        directory = tmp_path / f"a{seed}"
        write_peft_adapter(directory, base_dir, seed, rank=16, targets=ALL_LINEAR, std=0.2)
        refs.append(AdapterRef(write_manifest(directory), directory))
    settings = Settings(
        data_dir=tmp_path / "data",
        device="cuda",
        base_models={"tiny": base_dir},
        serve_base_model="tiny",
        max_context_tokens=512,
    )
    engine = Engine(settings)
    engine.start()
    try:
        # Prefill graphs are captured only for batches a prefill forward can have (a batch's
        # sequences at most), decode graphs for every row bucket (prompt rows included).
        captured = [key[1] for key in engine.decoder._graphs if key[0] == "prefill"]
        decode_rows = [key[1] for key in engine.decoder._graphs if key[0] == "decode"]
        assert captured and max(captured) == settings.max_batch_size
        assert max(decode_rows) > settings.max_batch_size
        requests = [
            (STORY, None),
            (STORY, refs[0]),
            ("List many colours:", refs[1]),
            (LONG_PROMPT * 3, refs[0]),  # past STEP_PREFILL_TOKENS
            ("The history of Rome begins", None),
        ]
        assert len(engine.encode_prompt(LONG_PROMPT * 3)) > STEP_PREFILL_TOKENS

        async def solo():
            return [await generate(engine, p, ref, max_tokens=40) for p, ref in requests]

        async def staggered():
            """Each request sent once the one before has its first token: it joins running rows."""
            tasks = []
            for prompt, ref in requests:
                first = asyncio.Event()
                tasks.append(
                    asyncio.create_task(
                        generate(engine, prompt, ref, max_tokens=40, on_token=lambda _, e=first: e.set())
                    )
                )
                await first.wait()
            return [await task for task in tasks]

        prefills = []
        prefill = engine.decoder.prefill
        engine.decoder.prefill = lambda chunks: prefills.append(len(chunks)) or prefill(chunks)
        alone = asyncio.run(solo())
        assert alone[0] != alone[1]  # the adapter changes the text
        assert asyncio.run(staggered()) == alone
        assert prefills == [1, 1]  # the long prompt's, alone and beside the others: no other
        assert len(engine.blocks.free) == engine.decoder.num_blocks - 1
    finally:
        engine.stop()
