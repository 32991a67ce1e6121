"""Shared helpers of the training tests (imported by conftest.py and the tests)."""

from __future__ import annotations

from pathlib import Path

QA = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is two plus two?", "It is four."),
    ("Who are you?", "I am a small helpful model."),
    ("Tell me a joke about computers.", "Why did the computer go to the doctor? Because it had a virus!"),
)
QUESTIONS = tuple(q for q, _ in QA)
ANSWERS = tuple(a for _, a in QA)
FAST = dict(checkpoint_every=20)  # the defaults (60 steps at 3e-2 here): memorised, 3 checkpoints


def qa_rows() -> list[dict]:
    return [{"input": q, "output": a} for q, a in QA]


def make_store(home: Path, tiny_src: Path, *, samples: bool = True, name: str = "qa"):
    """A store at `home` with the tiny model `tiny` and an adapter `name` (r=8 on q,v)."""
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    store.import_model(tiny_src, name="tiny")
    store.create_adapter("tiny", name, rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    if samples:
        add_samples(store, "tiny", name, qa_rows())
    return store


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))


def greedy_answers(model, tokenizer, questions=QUESTIONS, max_new_tokens: int = 40) -> list[str]:
    """transformers' greedy `generate` for each question as a one-turn chat."""
    import torch

    out = []
    model.eval()
    with torch.inference_mode():
        for q in questions:
            enc = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def adapter_answers(model_dir: Path, adapter_dir: Path) -> list[str]:
    from peft import PeftModel

    base, tok = load_base(model_dir)
    return greedy_answers(PeftModel.from_pretrained(base, str(adapter_dir)), tok)
