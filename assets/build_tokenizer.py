"""Regenerate assets/tokenizer/ (the tiny models' tokenizer) deterministically.

    python assets/build_tokenizer.py

A byte-level BPE (vocab 1024) trained on the small English corpus below. It uses Qwen2's
pre-tokenizer split regex and an NFC normalizer, because `AutoTokenizer` on a qwen2 folder swaps
those in regardless of tokenizer.json (see PITFALLS.md): with them built in, every architecture's
AutoTokenizer produces the same ids as `tokenizers.Tokenizer.from_file`. Byte-level BPE covers
every Unicode string (unknown characters fall back to their UTF-8 bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's split regex, verbatim (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small village by the sea. The people there fished in the morning and
told stories in the evening. Every child knew the names of the boats and the colours of their sails.
You are a helpful assistant. Answer the question as clearly as you can, and say when you do not know.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Hello! How are you today? I am fine, thank you. Can you help me write a short poem about the rain?
Machine learning models learn patterns from data. A language model predicts the next token given the
previous ones. Training adjusts the weights to reduce the loss, step by step, until it stops improving.
Git stores every version of a file as a commit. A branch is a name for a line of commits, and a tag
marks a milestone that should never move. You can always roll back to an earlier checkpoint.
The terminal is a quiet place to work: no windows, no mouse, just text and the keys under your hands.
Please summarise the following paragraph in one sentence. Translate this sentence into French.
Write a function that returns the sum of a list of numbers. def add(a, b): return a + b
for i in range(10): print(i * i)  # squares from 0 to 81
{"role": "user", "content": "Tell me a joke about computers."}
Why did the computer go to the doctor? Because it had a virus! That's funny, isn't it? I'd say so.
They're here, we've seen them, you'll like them, she's ready and I'm sure it'll work out fine.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000 -7 +12 50% $19.99 #1 @home
The weather today is sunny with a light breeze from the west. Tomorrow it may rain in the afternoon.
In the garden there were roses, tulips and daisies; the bees moved slowly from one flower to another.
She opened the old book and read aloud: "It was the best of times, it was the worst of times."
Good morning, good afternoon, good evening and good night. Thank you very much, you are welcome.
Scientists measure temperature, pressure and humidity to forecast storms several days in advance.
The library closes at six o'clock on weekdays and at noon on Saturdays; it is closed on holidays.
Our recipe needs flour, butter, sugar, two eggs, a pinch of salt and a cup of warm milk. Bake it slowly.
Mountains rise above the valley, rivers wind through forests, and the clouds drift over distant hills.
Engineers design bridges, roads, engines and electrical networks that millions of people depend upon.
Musicians practise scales every day; the orchestra rehearsed the symphony until midnight.
A healthy breakfast might include oatmeal, fruit, yoghurt, coffee or tea, and a glass of water.
History teaches us about kings, queens, empires, revolutions, inventions and ordinary families.
The doctor examined the patient carefully and recommended rest, fluids and a short walk each morning.
Students solved equations, wrote essays, painted pictures and built a robot for the science fair.
Remember to save your work often, keep backups, and write clear messages that explain why you changed it.
The market was crowded: merchants sold vegetables, cheese, bread, fish, spices, honey and fresh flowers.
Winter brings snow and frost, spring brings blossoms, summer brings heat, and autumn brings falling leaves.
Travellers crossed the desert by camel, slept under the stars and reached the ancient city at dawn.
"""


def build(out_dir: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The corpus repeated with small variations so merges beyond single words get learnt.
    lines = CORPUS.splitlines(keepends=True)
    tok.train_from_iterator([line.lower() for line in lines] + lines * 3, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "TokenizersBackend",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "errors": "replace",
    }


if __name__ == "__main__":
    here = Path(__file__).resolve().parent / "tokenizer"
    t = build(here)
    print(f"wrote {here} (vocab {t.get_vocab_size()})")
