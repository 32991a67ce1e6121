"""LoRA training speed: our trainer (the TrainJob the CLI runs) against a plain PEFT + torch loop.

    python benchmarks/train.py [--threads 2] [--steps 10] [--rounds 2] [--dtype bfloat16] [--json]

Random bf16 weights with the real Qwen2.5-0.5B architecture (no download), trained in bf16 where the
CPU has native bf16 (AVX512-BF16/AMX) and in fp32 elsewhere (bf16 matmuls fall back to a scalar
kernel on AVX2: seconds per matmul). LoRA r=16 on q,k,v,o,
batch 4 x 128 tokens, AdamW, gradient clipping, same data for both. The two alternate in rounds
(ours, reference, ours, ...) so that a busy machine slows both alike; ours resumes its run each
round from the checkpoint it committed, as `lora train start` would.

Reported: seconds per step (median and mean over steps after the first of each round), the time
of one checkpoint (write adapter + optimizer + metrics, commit to git with the adapter in LFS),
and our overhead with a checkpoint every 50 steps: (our mean step + checkpoint / 50) / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA, BATCH, SEQ, LR = 16, 32.0, 4, 128, 2e-4


def build_model(dest: Path, dtype: str) -> None:
    import shutil

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hyprstream_tui.engine.tiny import TOKENIZER_FILES, tokenizer_dir

    config = Qwen2Config(**QWEN25_05B)
    config.architectures = ["Qwen2ForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    dest.mkdir(parents=True, exist_ok=True)
    save_model(model, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, dest / name)


def samples(n: int = 16) -> list[dict]:
    """Rows whose chat rendering is longer than SEQ tokens, so every one is cut to exactly SEQ."""
    text = ("The people there fished in the morning and told stories in the evening. Every child knew the "
            "names of the boats and the colours of their sails. ") * 8
    return [{"input": f"Tell me story number {i}.", "output": text} for i in range(n)]


def reference_batches(model_dir: Path, rows: list[dict]):
    """The same rows as plain tensors: chat template, cut to SEQ, loss on the answer only."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids, labels = [], []
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["input"]}], tokenize=False,
                                         add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": r["input"]},
                                        {"role": "assistant", "content": r["output"]}], tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        f = tok(full, add_special_tokens=False)["input_ids"][:SEQ]
        ids.append(f)
        labels.append([-100] * len(p) + f[len(p):])
    ids_t, labels_t = torch.tensor(ids), torch.tensor(labels)
    return [(ids_t[i:i + BATCH], labels_t[i:i + BATCH]) for i in range(0, len(rows), BATCH)]


class Reference:
    """A plain PEFT + torch training loop: the yardstick."""

    def __init__(self, model_dir: Path, dtype: str, rows: list[dict]) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        torch.manual_seed(0)
        self.model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR)
        self.batches = reference_batches(model_dir, rows)
        self.i = 0

    def step(self) -> float:
        import torch

        started = time.perf_counter()
        ids, labels = self.batches[self.i % len(self.batches)]
        self.i += 1
        loss = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def our_round(store, upto: int, total: int, dtype: str) -> tuple[list[float], list[float], float]:
    """Run (or resume) our job until step `upto`; returns per-step wall intervals (event to event,
    so heartbeat, events and any checkpoint in between count), checkpoint times, load time."""
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.job import CheckpointCommitted, TrainJob, TrainStarted, TrainStep

    cancel = threading.Event()
    marks: dict[str, Any] = {}
    steps: list[float] = []
    commits: list[float] = []
    started = time.perf_counter()

    def on_event(e) -> None:
        now = time.perf_counter()
        if isinstance(e, TrainStarted):
            marks["load"] = now - started
        elif isinstance(e, TrainStep):
            if marks.get("prev") == "step":  # the first step of a round warms up: left out, as for the reference
                steps.append(now - marks["last"])
            if e.step >= upto:
                cancel.set()
        elif isinstance(e, CheckpointCommitted):
            commits.append(now - marks["last"])
        marks["last"] = now
        marks["prev"] = "step" if isinstance(e, TrainStep) else "other"

    config = TrainConfig(steps=total, learning_rate=LR, batch_size=BATCH, max_seq_len=SEQ, checkpoint_every=50, dtype=dtype)
    TrainJob(store, "qwen-05b", "bench", config, on_event=on_event, cancel=cancel).run()
    return steps, commits, marks.get("load", 0.0)


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "mean": round(statistics.fmean(xs), 3), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="steps per round for each loop")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="training dtype of both loops (default: bf16 where the CPU has native bf16, else fp32)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from hyprstream_tui.engine.loader import cpu_has_bf16

    args.dtype = args.dtype or ("bfloat16" if cpu_has_bf16() else "float32")
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    with tempfile.TemporaryDirectory(prefix="hs-train-bench-") as tmp:
        src = Path(tmp) / "qwen-05b"
        t = time.perf_counter()
        build_model(src, "bfloat16")  # as the hub checkpoint is
        print(f"built the random Qwen2.5-0.5B-shaped model in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        store = Store(Paths.from_env(Path(tmp) / "home"))
        store.import_model(src, name="qwen-05b", link=True)
        store.create_adapter("qwen-05b", "bench", rank=RANK, alpha=ALPHA, target_modules=TARGETS)
        rows = samples()
        add_samples(store, "qwen-05b", "bench", rows)
        reference = Reference(src, args.dtype, rows)
        total = args.steps * args.rounds + 1000  # one run, never finished: each round resumes it
        ours, ref, commits, loads = [], [], [], []
        for r in range(args.rounds):
            s, c, load = our_round(store, (r + 1) * args.steps, total, args.dtype)
            ours += s
            commits += c
            loads.append(load)
            times = [reference.step() for _ in range(args.steps)]
            ref += times[1:]
            print(f"round {r + 1}: ours {statistics.fmean(s):.2f} s/step, reference {statistics.fmean(times[1:]):.2f}"
                  f" s/step, checkpoint {statistics.fmean(c):.2f} s", file=sys.stderr)
        adapter_bytes = len(store.read_file("qwen-05b", store.resolve_adapter("qwen-05b", "bench").tip,
                                            "adapter/adapter_model.safetensors"))
    ckpt_s = statistics.fmean(commits)
    effective = statistics.fmean(ours) + ckpt_s / 50
    result = {
        "threads": args.threads, "dtype": args.dtype, "batch": f"{BATCH}x{SEQ}", "lora": f"r={RANK} {','.join(TARGETS)}",
        "reference_s_per_step": summary(ref), "ours_s_per_step": summary(ours),
        "checkpoint_s": round(ckpt_s, 3), "adapter_mb": round(adapter_bytes / 1e6, 1),
        "ours_load_s": round(statistics.fmean(loads), 1),
        "ours_with_checkpoint_every_50_s_per_step": round(effective, 3),
        "overhead_pct": round(100 * (effective / statistics.fmean(ref) - 1), 1),
        "overhead_median_pct": round(100 * ((statistics.median(ours) + ckpt_s / 50) / statistics.median(ref) - 1), 1),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"LoRA {result['lora']}, batch {result['batch']}, {args.dtype}, {args.threads} threads")
    print(f"  reference (PEFT + torch): {result['reference_s_per_step']['mean']:.2f} s/step "
          f"(median {result['reference_s_per_step']['median']:.2f}, n={result['reference_s_per_step']['n']})")
    print(f"  ours (TrainJob):          {result['ours_s_per_step']['mean']:.2f} s/step "
          f"(median {result['ours_s_per_step']['median']:.2f}, n={result['ours_s_per_step']['n']})")
    print(f"  checkpoint commit:        {ckpt_s:.2f} s (adapter {result['adapter_mb']} MB + optimizer state)")
    print(f"  ours with a checkpoint every 50 steps: {effective:.2f} s/step, overhead {result['overhead_pct']:+.1f}% "
          f"(medians: {result['overhead_median_pct']:+.1f}%)")


if __name__ == "__main__":
    main()
