"""Token choice and the final-text tracker (stop strings, held-back partial text)."""

import torch

from app.inference.messages import SamplingParams
from app.inference.sampling import TextTracker, make_generator, sample_token


def feed(tracker: TextTracker, pieces: list[str]) -> list[str]:
    text, out = "", []
    for i, piece in enumerate(pieces):
        text += piece
        out.append(tracker.advance(text, finished=i == len(pieces) - 1))
        if tracker.stopped:
            break
    return out


def test_greedy_takes_the_argmax_and_needs_no_generator():
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    assert make_generator(params) is None
    assert sample_token(torch.tensor([0.1, 3.0, 2.9]), params, None) == 1


def test_seeded_sampling_repeats_and_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=0.5, seed=3)
    g1, g2 = make_generator(params), make_generator(params)
    runs = (
        [sample_token(logits, params, g1) for _ in range(20)],
        [sample_token(logits, params, g2) for _ in range(20)],
    )
    assert runs[0] == runs[1]
    # top_p=0.5: the top token alone holds ~0.52 of the mass, so only it can be drawn.
    assert set(runs[0]) == {0}
    wide = SamplingParams(max_new_tokens=4, temperature=2.0, top_p=1.0, seed=1)
    g = make_generator(wide)
    assert {sample_token(logits, wide, g) for _ in range(200)} >= {0, 1}


def test_text_without_stops_is_emitted_as_it_comes():
    assert feed(TextTracker(()), ["Hel", "lo", " world"]) == ["Hel", "lo", " world"]


def test_a_stop_string_across_pieces_is_held_back_then_cut():
    tracker = TextTracker(("END",))
    out = feed(tracker, ["abc E", "N", "D more"])
    assert out == ["abc ", "", ""] and tracker.stopped
    assert "".join(out) == "abc "


def test_a_partial_stop_that_turns_out_not_to_be_one_is_released():
    out = feed(TextTracker(("END",)), ["abc E", "x", " y"])
    assert "".join(out) == "abc Ex y"


def test_half_decoded_characters_are_held_until_complete():
    tracker = TextTracker(())
    assert tracker.advance("caf\ufffd", finished=False) == "caf"
    assert tracker.advance("café", finished=False) == "é"


def test_earliest_of_several_stops_wins():
    tracker = TextTracker(("b", "cd"))
    assert tracker.advance("a cd b", finished=False) == "a " and tracker.stopped


def test_incremental_detokenizer_gives_the_full_decode_at_every_step(base_model_dir):
    """Text with multi-byte characters, emoji (several byte tokens each), code and special tokens:
    after every token the incremental text is a prefix of what decoding all tokens at once shows,
    and all of it unless that ends in half a character; after finish() it is exactly the full
    decode."""
    from transformers import AutoTokenizer

    from app.inference.sampling import Detokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    text = "Grüße aus Köln — 東京の天気は☀️ 🤖🚀 def f(x):\n    return x**2  # ok\n\n  Done."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[:20] + [tokenizer.eos_token_id] + ids[20:]
    assert len(ids) > 30
    detokenizer = Detokenizer(tokenizer)
    for n, token in enumerate(ids, start=1):
        detokenizer.add(token)
        full = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(detokenizer.text)
        if not full.endswith("\ufffd"):
            assert detokenizer.text == full
    detokenizer.finish()
    assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert "東京" in detokenizer.text and "🚀" in detokenizer.text


def test_any_temperature_and_top_p_the_api_accepts_gives_a_token():
    # Found by the OpenAPI fuzz: tiny temperatures overflowed to nan, a tiny top_p dropped every token.
    logits = torch.tensor([5.0, 4.9, -10.0, float("-inf")])
    for temperature in (1e-300, 1e-45, 1e-10, 2.0):
        for top_p in (1e-300, 0.5, 1.0):
            params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, seed=0)
            token = sample_token(logits, params, make_generator(params))
            assert token in ({0} if temperature < 1 or top_p < 0.5 else {0, 1, 2})


def test_any_integer_is_a_seed():
    for seed in (-(2**70), -1, 2**64, 10**30):
        params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=seed)
        assert make_generator(params).initial_seed() == seed % 2**64
