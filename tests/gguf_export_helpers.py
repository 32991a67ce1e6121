"""Helpers of the GGUF export tests (tests/engine/test_gguf_export.py, tests/real/test_real_gguf_export.py):
a real PEFT adapter committed into the store, and llama.cpp (llama-cpp-python) where installed."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

# The benchmark environment's Python, with llama-cpp-python built on this machine (benchmarks/).
LLAMA_CPP_PYTHON = Path.home() / ".cache" / "hyprstream-bench" / "venv" / "bin" / "python"
_GREEDY = """
import json, sys
from llama_cpp import Llama
args = json.loads(sys.argv[1])
extra = {"lora_path": args["lora"]} if args.get("lora") else {}
llm = Llama(model_path=args["model"], n_ctx=512, n_threads=2, verbose=False, seed=0, **extra)
ids = llm.tokenize(args["prompt"].encode(), add_bos=False, special=True)
out = []
for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
    if token == llm.token_eos() or len(out) >= args["n"]:
        break
    out.append(token)
print(json.dumps({"prompt_ids": ids, "ids": out, "text": llm.detokenize(out).decode("utf-8", "replace")}))
"""


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot run here, or None when it can."""
    if not LLAMA_CPP_PYTHON.exists():
        return f"llama-cpp-python is not installed ({LLAMA_CPP_PYTHON} is missing; the benchmark setup builds it)"
    probe = subprocess.run([str(LLAMA_CPP_PYTHON), "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{LLAMA_CPP_PYTHON} cannot import llama_cpp: {probe.stderr.strip().splitlines()[-1:]}"
    return None


def llama_cpp_greedy(model: Path, prompt: str, n: int, lora: Path | None = None) -> dict:
    """llama.cpp's greedy continuation of the raw `prompt`: {"prompt_ids", "ids", "text"}."""
    args = json.dumps({"model": str(model), "lora": str(lora) if lora else None, "prompt": prompt, "n": n})
    proc = subprocess.run([str(LLAMA_CPP_PYTHON), "-c", _GREEDY, args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def put_adapter(store, model: str, name: str, *, seed: int = 1, scale: float = 1.0, **lora) -> Path:
    """A real PEFT adapter with random nonzero A and B (init_lora_weights=False) committed as the
    adapter's checkpoint, as training would; returns the PEFT folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    targets = lora.setdefault("target_modules", ["q_proj", "k_proj", "v_proj"])
    store.create_adapter(model, name, rank=lora.get("r", 8), alpha=lora.get("lora_alpha", 16.0), target_modules=targets)
    base = AutoModelForCausalLM.from_pretrained(str(store.model_dir(model)), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation, called by PEFT
        torch.manual_seed(seed)
        peft = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora))
        with torch.no_grad():
            for key, param in peft.named_parameters():
                if "lora_B" in key:
                    param.mul_(scale)
    folder = store.paths.home.parent / f"peft-{model}-{name}"
    peft.save_pretrained(str(folder))
    store.write_files(model, name, {f"adapter/{f}": (folder / f).read_bytes()
                                    for f in ("adapter_model.safetensors", "adapter_config.json")},
                      "Checkpoint at step 1", {"step": 1})
    return folder


