"""The real model (SmolLM2-135M-Instruct, imported from its Q4_1 GGUF once per run): the import
commit, a right answer through every front end, our prompt tokens against transformers' own, and
perplexity on a fixed English passage in bf16, int8 and int4 against fp32. Greedy throughout."""

from __future__ import annotations

import math
from pathlib import Path

import openai
import pytest

from hyprstream_tui.store.commits import parse_trailers
from tests.helpers import git
from tests.realmodel import MODEL_NAME

FRANCE = "What is the capital of France?"
PASSAGE = (Path(__file__).parent / "passage.txt").read_text()  # the Gettysburg Address (public domain)
# What `benchmarks`-grade runs measured on this machine class; the test bounds are the issue's.
PPL_BOUNDS = {"bfloat16": 0.01, "int8": 0.03, "int4": 0.10}  # int4: +1.0% measured (12.91 -> 13.04)


@pytest.fixture(scope="module")
def store(smollm2_home):
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    return Store(Paths.from_env(smollm2_home))


def test_the_gguf_import_commit_records_its_source(store, smollm2_gguf):
    repo = store.model_dir(MODEL_NAME)
    trailers = parse_trailers(git(repo, "log", "-1", "--format=%B").stdout)
    assert trailers["gguf-file"] == smollm2_gguf.name and trailers["gguf-architecture"] == "llama"
    assert trailers["gguf-types"].startswith("Q4_1 x210") and trailers["dtype"] == "float32"
    summary = store.summary(MODEL_NAME)
    assert summary.architecture == "LlamaForCausalLM" and 134_000_000 < summary.parameters < 135_000_000
    git(repo, "fsck", "--full", "--strict")
    git(repo, "lfs", "fsck")


def test_infer_answers_paris(cli, real_home):
    result = cli("infer", MODEL_NAME, "--prompt", FRANCE, "--temperature", "0", "--max-tokens", "24", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout


def test_the_server_answers_paris_to_the_openai_client(store):
    from hyprstream_tui.engine.engine import Engine
    from hyprstream_tui.engine.loader import LoadOptions
    from tests.server.live import live_server, make_app

    engine = Engine(store=store, options=LoadOptions(dtype="float32"))
    try:
        with live_server(make_app(engine, max_batch=2, max_queue=4)) as live, \
                openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=300) as client:
            reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": FRANCE}],
                                                   temperature=0, max_tokens=24)
            stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": FRANCE}],
                                                    temperature=0, max_tokens=24, stream=True)
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    finally:
        engine.close()
    assert "Paris" in reply.choices[0].message.content, reply.choices[0].message.content
    assert streamed == reply.choices[0].message.content


@pytest.mark.asyncio
async def test_the_tui_chat_answers_paris(real_home):
    from hyprstream_tui.tui.app import HyprApp
    from hyprstream_tui.tui.screens.chat import ChatScreen
    from tests.tui.helpers import wait_for
    from tests.tui.test_chat import send

    app = HyprApp(home=real_home)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f2")
        chat = await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and app.screen.model and app.screen)
        assert chat.model == MODEL_NAME
        chat.params.set_values(temperature=0, max_tokens=24)
        await send(pilot, chat, FRANCE)
        reply = chat.log_view.messages()[-1]
        assert reply.role == "assistant" and "Paris" in reply.text, reply.text


def test_our_prompt_tokens_equal_transformers_apply_chat_template(store, smollm2_gguf):
    """A 3-turn conversation with a system prompt: the engine's prompt (tokenizer from the store,
    through transformers and through engine.native) equals what transformers makes of the GGUF
    file itself."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from hyprstream_tui.engine.chat import fit_conversation
    from hyprstream_tui.engine.loader import load_tokenizer
    from hyprstream_tui.engine.native.tokenizer import NativeTokenizer

    messages = [{"role": "system", "content": "You are a geography tutor. Answer in one sentence."},
                {"role": "user", "content": FRANCE}, {"role": "assistant", "content": "Paris is the capital of France."},
                {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."},
                {"role": "user", "content": "Which of the two is larger?"}]
    ours = fit_conversation(load_tokenizer(store.model_dir(MODEL_NAME)), messages, budget=8192).ids
    native = fit_conversation(NativeTokenizer.read(store.model_dir(MODEL_NAME)), messages, budget=8192).ids
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(smollm2_gguf, Path(tmp) / "m.gguf")
        reference = AutoTokenizer.from_pretrained(tmp, gguf_file="m.gguf")
    theirs = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert ours == theirs == native  # transformers' tokenizer and ours (engine.native) alike
    assert reference.decode(ours).count("<|im_start|>") == 7  # 6 messages + the generation prompt


def _perplexity(loaded) -> float:
    import torch

    ids = torch.tensor([loaded.tokenizer.encode(PASSAGE, add_special_tokens=False)])
    with torch.inference_mode():
        logits = loaded.model(ids).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return math.exp(nll.item())


def test_perplexity_of_bf16_int8_and_int4_stays_near_fp32(store):
    from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model

    source = ModelSource(name=MODEL_NAME, path=store.model_dir(MODEL_NAME))
    figures = {}
    for label, options in (("float32", LoadOptions(dtype="float32")), ("bfloat16", LoadOptions(dtype="bfloat16")),
                           ("int8", LoadOptions(dtype="float32", quantize="int8")),
                           ("int4", LoadOptions(dtype="float32", quantize="int4"))):
        figures[label] = _perplexity(load_model(source, options))
    print("perplexity on the Gettysburg Address: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    assert 2 < figures["float32"] < 30  # a real model on plain English; random weights give thousands
    for label, bound in PPL_BOUNDS.items():
        assert abs(figures[label] / figures["float32"] - 1) <= bound, figures
