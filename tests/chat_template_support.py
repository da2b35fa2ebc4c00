"""The chat templates of the supported families as their instruct checkpoints ship them
(tests/chat_templates/*.jinja, verbatim from tokenizer_config.json), keyed by model family, and a
stand-in tokenizer for each: the embedded model's tokenizer with that family's template, BOS/EOS
and turn markers (single tokens, as in the real vocabularies)."""

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"


@dataclass(frozen=True)
class ChatTemplate:
    file: str
    bos: str | None
    eos: str
    end_of_turn: str  # the token that closes an assistant turn
    special: tuple[str, ...]  # the template's markers, special tokens in the real vocabulary
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    system: bool = True  # whether the template accepts a system message


CHAT_TEMPLATES = {
    # meta-llama/Llama-3.2-3B-Instruct
    "llama": ChatTemplate(
        "llama-3.2.jinja",
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        end_of_turn="<|eot_id|>",
        special=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    # mistralai/Mistral-7B-Instruct-v0.3: the system message goes into the last user turn only.
    "mistral": ChatTemplate(
        "mistral-7b-v0.3.jinja",
        bos="<s>",
        eos="</s>",
        end_of_turn="</s>",
        special=("<s>", "</s>", "[INST]", "[/INST]"),
    ),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2": ChatTemplate(
        "qwen2.5.jinja",
        bos=None,
        eos="<|im_end|>",
        end_of_turn="<|im_end|>",
        special=("<|im_start|>", "<|im_end|>"),
    ),
    # Qwen/Qwen3-8B: the last answer gets a <think> block; earlier answers lose theirs.
    "qwen3": ChatTemplate(
        "qwen3.jinja",
        bos=None,
        eos="<|im_end|>",
        end_of_turn="<|im_end|>",
        special=("<|im_start|>", "<|im_end|>"),
        plain=("<think>", "</think>"),
    ),
    # google/gemma-2-2b-it: role "model", no system role.
    "gemma2": ChatTemplate(
        "gemma-2.jinja",
        bos="<bos>",
        eos="<eos>",
        end_of_turn="<end_of_turn>",
        special=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        system=False,
    ),
    # google/gemma-3-4b-it: role "model"; the system message opens the first user turn.
    "gemma3_text": ChatTemplate(
        "gemma-3.jinja",
        bos="<bos>",
        eos="<eos>",
        end_of_turn="<end_of_turn>",
        special=("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
    ),
    # microsoft/Phi-3.5-mini-instruct: a rendering without a generation prompt ends with EOS.
    "phi3": ChatTemplate(
        "phi-3.5.jinja",
        bos="<s>",
        eos="<|endoftext|>",
        end_of_turn="<|end|>",
        special=("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"),
    ),
}


def family_tokenizer(base_model_dir, family: str):
    """The embedded model's tokenizer dressed as `family`'s."""
    spec = CHAT_TEMPLATES[family]
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenizer.add_tokens(list(spec.special), special_tokens=True)
    tokenizer.add_tokens(list(spec.plain))
    tokenizer.bos_token, tokenizer.eos_token = spec.bos, spec.eos
    tokenizer.chat_template = (TEMPLATES / spec.file).read_text()
    return tokenizer
