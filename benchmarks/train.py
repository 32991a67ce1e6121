"""LoRA training speed: our trainer (the TrainJob the CLI runs) against a plain PEFT + torch loop.

    python benchmarks/train.py [--model qwen-shape|smollm2] [--threads 2] [--steps 12] [--checkpoint-every 50]
                               [--dtype float32] [--json] [--nproc 2]

`--model qwen-shape` (the default): random bf16 weights with the real Qwen2.5-0.5B architecture (no
download). `--model smollm2`: the real SmolLM2-135M-Instruct, imported from its GGUF (fp32) through
`hyprstream model import`'s own path (tests/realmodel.py fetches it). Trained in bf16 where the
CPU has native bf16 (AVX512-BF16/AMX) and in fp32 elsewhere (on AVX2, bf16 matmuls fall back to a
scalar kernel: seconds per matmul). LoRA r=16 on q,k,v,o, batch 4 x 128 tokens, AdamW, gradient
clipping, the same data for both. Steps are paired: the reference runs one step inside each of
our step events, so load from other processes slows both alike.

Reported: seconds per step (mean, median, median of per-pair ratios), the time of a checkpoint
(adapter + optimizer state + metrics written, committed to git with the weights in LFS; the run's
stop commits one), and our overhead with a checkpoint every 50 steps:
(our mean step + checkpoint / 50) / reference mean step.

`--nproc N` (N > 1) measures the group instead (engine/train/distributed.py), one run after the
other: our trainer in one process with batch 4 on all threads; N processes under torchrun (gloo on
CPU) with batch 4/N each (the same global batch) and threads/N each; and one process doing one
rank's share alone (batch 4/N on threads/N). Reported: start-up (command to first step), seconds
per step and tokens/s of each; the group against one process, and against one rank's work alone
(what the group adds: the gradient all-reduce, the per-step collectives, sharing the cores).
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

from benchmarks.decode import QWEN25_05B  # noqa: E402  (the one copy of the config)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK, ALPHA, BATCH, SEQ, LR = 16, 32.0, 4, 128, 2e-4


def build_model(dest: Path, dtype: str, layers: int = 24) -> None:
    import shutil

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hyprstream_tui.engine.tiny import TOKENIZER_FILES, tokenizer_dir

    config = Qwen2Config(**dict(QWEN25_05B, num_hidden_layers=layers))
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


def paired_run(store, model: str, reference: "Reference", steps: int, dtype: str,
               checkpoint_every: int) -> dict[str, Any]:
    """Our job for `steps` steps, with one reference step run inside each of our TrainStep events
    (the job waits meanwhile): every step of ours sits next to one of the reference in time, so a
    busy machine slows both alike. Our step time is from the callback's return to the next
    TrainStep event (data, forward, backward, optimizer, heartbeat, events); a checkpoint is timed
    from the TrainStep event's return to its CheckpointCommitted event."""
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.job import CheckpointCommitted, TrainJob, TrainStarted, TrainStep

    cancel = threading.Event()
    out: dict[str, Any] = {"ours": [], "ref": [], "commits": []}
    marks: dict[str, Any] = {"start": time.perf_counter()}

    def on_event(e) -> None:
        now = time.perf_counter()
        if isinstance(e, TrainStarted):
            out["load_s"] = now - marks["start"]
            return
        if isinstance(e, CheckpointCommitted):
            out["commits"].append(now - marks["back"])  # the job emits TrainStep, then commits
        elif isinstance(e, TrainStep):
            if "back" in marks:  # the first step warms up: left out, as the reference's first
                out["ours"].append(now - marks["back"])
                out["ref"].append(reference.step())
            else:
                reference.step()
            if e.step >= steps:
                cancel.set()
        marks["back"] = time.perf_counter()

    config = TrainConfig(steps=steps + 1000, learning_rate=LR, batch_size=BATCH, max_seq_len=SEQ,
                         checkpoint_every=checkpoint_every, dtype=dtype)
    TrainJob(store, model, "bench", config, on_event=on_event, cancel=cancel).run()
    return out


def timed_run(store, model: str, steps: int, dtype: str, checkpoint_every: int, nproc: int,
              batch: int = BATCH) -> dict[str, Any]:
    """`steps` steps of our job (a group when nproc > 1); step times between TrainStep events,
    the first left out (warm-up)."""
    from hyprstream_tui.engine.train.config import TrainConfig
    from hyprstream_tui.engine.train.distributed import make_job
    from hyprstream_tui.engine.train.job import TrainStarted, TrainStep

    cancel = threading.Event()
    marks: dict[str, Any] = {"start": time.perf_counter(), "steps": []}

    def on_event(e) -> None:
        now = time.perf_counter()
        if isinstance(e, TrainStarted):
            marks["load_s"], marks["first"] = now - marks["start"], e.step
        elif isinstance(e, TrainStep):
            if "last" in marks:
                marks["steps"].append(now - marks["last"])
            marks["last"] = now
            if e.step - marks["first"] >= steps:
                cancel.set()

    config = TrainConfig(steps=steps + 1000, learning_rate=LR, batch_size=batch // nproc, max_seq_len=SEQ,
                         checkpoint_every=checkpoint_every, dtype=dtype, nproc=nproc, new_run=True)
    make_job(store, model, "bench", config, on_event=on_event, cancel=cancel).run()
    return {"load_s": round(marks.get("load_s", 0.0), 1), "s_per_step": summary(marks["steps"]),
            "tokens_per_s": round(batch * SEQ / statistics.fmean(marks["steps"]), 1)}


def group_report(store, name: str, args: argparse.Namespace) -> dict[str, Any]:
    if BATCH % args.nproc:
        raise SystemExit(f"--nproc must divide the batch ({BATCH})")
    import torch

    share = max(1, args.threads // args.nproc)
    os.environ["OMP_NUM_THREADS"] = str(share)  # each rank's share of the threads
    one = timed_run(store, name, args.steps, args.dtype, args.checkpoint_every, 1)
    group = timed_run(store, name, args.steps, args.dtype, args.checkpoint_every, args.nproc)
    torch.set_num_threads(share)  # one rank's work alone: its batch on its threads, no peers
    rank_alone = timed_run(store, name, args.steps, args.dtype, args.checkpoint_every, 1, batch=BATCH // args.nproc)
    return {"model": args.model, "threads": args.threads, "dtype": args.dtype, "batch": f"{BATCH}x{SEQ}",
            "lora": f"r={RANK} {','.join(TARGETS)}", "one_process": one, f"{args.nproc}_processes": group,
            "one_rank_alone": rank_alone,
            "group_vs_one_process_pct": round(100 * (group["s_per_step"]["mean"] / one["s_per_step"]["mean"] - 1), 1),
            # what the group adds to a rank's own work: collectives, sharing the cores, DDP
            "group_vs_rank_alone_pct": round(100 * (group["s_per_step"]["mean"] / rank_alone["s_per_step"]["mean"] - 1), 1)}


def summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 3), "mean": round(statistics.fmean(xs), 3), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen-shape", choices=("qwen-shape", "smollm2"),
                    help="random Qwen2.5-0.5B-shaped weights, or the real SmolLM2-135M-Instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12, help="paired steps (ours + reference each)")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="training dtype of both loops (default: bf16 where the CPU has native bf16, else fp32)")
    ap.add_argument("--layers", type=int, default=24, help="fewer layers for a quick check of this script")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--nproc", type=int, default=1, help="N > 1: one process against a group of N (same global batch)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from hyprstream_tui.engine.loader import cpu_has_bf16
    from hyprstream_tui.engine.train.samples import add_samples
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    args.dtype = args.dtype or ("bfloat16" if cpu_has_bf16() else "float32")
    with tempfile.TemporaryDirectory(prefix="hs-train-bench-") as tmp:
        store = Store(Paths.from_env(Path(tmp) / "home"))
        t = time.perf_counter()
        if args.model == "smollm2":
            from hyprstream_tui.engine.gguf import import_gguf
            from tests.realmodel import MODEL_NAME, gguf_path

            name = MODEL_NAME
            import_gguf(store, gguf_path(), name=name)
            print(f"imported SmolLM2-135M-Instruct from its GGUF in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        else:
            name = "qwen-05b"
            src = Path(tmp) / name
            build_model(src, "bfloat16", args.layers)  # bf16, as the hub checkpoint is
            print(f"built the random Qwen2.5-0.5B-shaped model in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            store.import_model(src, name=name, link=True)
        src = store.model_dir(name)
        store.create_adapter(name, "bench", rank=RANK, alpha=ALPHA, target_modules=TARGETS)
        rows = samples()
        add_samples(store, name, "bench", rows)
        if args.nproc > 1:
            report = group_report(store, name, args)
            print(json.dumps(report) if args.json else json.dumps(report, indent=2))
            return
        run = paired_run(store, name, Reference(src, args.dtype, rows), args.steps, args.dtype, args.checkpoint_every)
        adapter_bytes = len(store.read_file(name, store.resolve_adapter(name, "bench").tip,
                                            "adapter/adapter_model.safetensors"))
    ours, ref = run["ours"], run["ref"][: len(run["ours"])]
    ckpt_s = statistics.fmean(run["commits"])
    effective = statistics.fmean(ours) + ckpt_s / 50
    pairs = [o / r for o, r in zip(ours, ref)]
    result = {
        "model": args.model, "threads": args.threads, "dtype": args.dtype,
        "reference_tokens_per_s": round(BATCH * SEQ / statistics.fmean(ref), 1),
        "ours_tokens_per_s": round(BATCH * SEQ / effective, 1), "batch": f"{BATCH}x{SEQ}", "lora": f"r={RANK} {','.join(TARGETS)}",
        "reference_s_per_step": summary(ref), "ours_s_per_step": summary(ours),
        "pair_ratio_median": round(statistics.median(pairs), 3),
        "checkpoint_s": round(ckpt_s, 3), "checkpoints": len(run["commits"]),
        "adapter_mb": round(adapter_bytes / 1e6, 1), "ours_load_s": round(run.get("load_s", 0.0), 1),
        "ours_with_checkpoint_every_50_s_per_step": round(effective, 3),
        "overhead_pct": round(100 * (effective / statistics.fmean(ref) - 1), 1),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model}: LoRA {result['lora']}, batch {result['batch']}, {args.dtype}, {args.threads} threads, "
          f"{len(ours)} paired steps")
    print(f"  reference (PEFT + torch): {result['reference_s_per_step']['mean']:.2f} s/step "
          f"(median {result['reference_s_per_step']['median']:.2f})")
    print(f"  ours (TrainJob):          {result['ours_s_per_step']['mean']:.2f} s/step "
          f"(median {result['ours_s_per_step']['median']:.2f}); median of per-pair ratios {result['pair_ratio_median']:.3f}")
    print(f"  checkpoint commit:        {ckpt_s:.2f} s (adapter {result['adapter_mb']} MB + optimizer state, "
          f"{result['checkpoints']} measured)")
    print(f"  ours with a checkpoint every 50 steps: {effective:.2f} s/step, overhead {result['overhead_pct']:+.1f}%")
    print(f"  tokens/s: reference {result['reference_tokens_per_s']}, ours {result['ours_tokens_per_s']} "
          f"(checkpoints included)")

if __name__ == "__main__":
    main()
