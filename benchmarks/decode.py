"""Decode speed on a random-weight model with the real Qwen2.5-0.5B-Instruct architecture.

    python benchmarks/decode.py [--threads 2] [--prompt 512] [--new 128] [--only pair-bfloat16]

No download: the config is written below and the weights are random (seeded), saved once as
safetensors in a temp folder. Cases, each in fp32 and bf16:
  generate    transformers' `generate` (greedy) on the model as `from_pretrained` builds it
  ours        hyprstream's engine loop (engine.generate.generate_tokens) on the same weights,
              loaded by the engine's loader (bf16 prefill through fp32 on CPUs without bf16),
              decode steps through engine.lean.LeanDecoder
  ours-plain  ours with decode steps through model(...) instead of the lean decoder
  ours-exact  ours with the plain bf16 prefill kernel (bf16 only, where the two differ): the
              same prefill as generate, so its greedy tokens must equal generate's
  ours-int8   ours with `--quantize int8`
generate and ours alternate in one process per dtype (fair on a shared machine); int8 runs in its
own process, so its peak RSS is its own. It prints prefill time for the prompt, decode tokens/s, peak RSS, whether
greedy tokens match `generate`, the int8 quality cost against fp32 (logits, perplexity on a text)
and the memory-bandwidth roofline (weight bytes read per token / measured bandwidth).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
    "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "max_window_layers": 21, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
    "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
}
CASES = [("pair", "float32"), ("int8", "float32"), ("pair", "bfloat16"), ("int8", "bfloat16")]
TEXT = (
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a small village by "
    "the sea. The people there fished in the morning and told stories in the evening. "
) * 4


def build_model(dest: Path) -> None:
    """Random bf16 weights (seeded) + the tiny tokenizer's files, as a loadable folder."""
    import shutil

    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from hyprstream_tui.engine.tiny import TOKENIZER_FILES, tokenizer_dir

    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in QWEN25_05B.items() if k != "architectures"})
    config.architectures = QWEN25_05B["architectures"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    dest.mkdir(parents=True, exist_ok=True)
    save_model(model, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(dest)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir() / name, dest / name)


def prompt_ids(n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(1000, 150000, (n,), generator=g).tolist()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Clock:
    """A `generate` streamer that only notes when each put happens (the prompt, then tokens)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_generate(model, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(prefill s, decode s for new-1 tokens, tokens) of one greedy `generate` call."""
    import torch

    x = torch.tensor([ids])
    clock = _Clock()
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             eos_token_id=None, pad_token_id=0, max_new_tokens=new,
                             min_new_tokens=new, streamer=clock)
    # clock.times: [prompt, token 1 (after prefill), ..., token new]
    return clock.times[1] - started, clock.times[-1] - clock.times[1], out[0, len(ids):].tolist()


def time_ours(model, ids: list[int], new: int, lean: bool = True) -> tuple[float, float, list[int]]:
    from hyprstream_tui.engine import generate
    from hyprstream_tui.engine.params import SamplingParams

    stats = generate.GenerationStats()
    generate.LEAN = lean
    try:
        tokens = list(generate.generate_tokens(
            model, ids, SamplingParams(temperature=0, max_tokens=new), eos_ids=frozenset(),
            generator=None, stats=stats))
    finally:
        generate.LEAN = True
    return stats.prefill_s, stats.decode_s, tokens


def run_pair(folder: Path, dtype: str, ids: list[int], new: int, rounds: int) -> dict:
    """generate and ours on the same loaded weights, alternating, best of `rounds` each.

    Alternating makes both see the same machine: on a shared CPU the ratio stays meaningful
    when absolute figures move. For `generate`, layers our loader swapped for a faster prefill
    kernel are switched back to plain `nn.Linear`, so it runs exactly as transformers loads it.
    """
    import torch

    from hyprstream_tui.engine.kernels import RowsFirstLinear, UpcastPrefillLinear
    from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model

    lm = load_model(ModelSource(name="qwen2.5-0.5b-random", path=folder), LoadOptions(dtype=dtype))
    swapped = [(m, type(m)) for m in lm.model.modules()
               if isinstance(m, (UpcastPrefillLinear, RowsFirstLinear))]

    def plain(on: bool) -> None:
        for module, ours in swapped:
            module.__class__ = torch.nn.Linear if on else ours

    runs = {"generate": (lambda: time_generate(lm.model, ids, new), True),
            "ours": (lambda: time_ours(lm.model, ids, new), False),
            "ours-plain": (lambda: time_ours(lm.model, ids, new, lean=False), False)}
    if any(cls is UpcastPrefillLinear for _, cls in swapped):  # ours with the bf16 prefill too
        runs["ours-exact"] = (lambda: time_ours(lm.model, ids, new), True)
    best = {name: [float("inf"), float("inf"), None] for name in runs}
    for _ in range(rounds):
        for name, (run, use_plain) in runs.items():
            plain(use_plain)
            prefill, decode, tokens = run()
            b = best[name]
            b[0], b[1], b[2] = min(b[0], prefill), min(b[1], decode), tokens
    nbytes = weight_bytes(lm.model)
    return {name: {"prefill_s": p, "decode_tok_s": (new - 1) / d, "tokens": t,
                   "weight_bytes": nbytes} for name, (p, d, t) in best.items()}


def run_int8(folder: Path, dtype: str, ids: list[int], new: int, rounds: int) -> dict:
    from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model

    lm = load_model(ModelSource(name="qwen2.5-0.5b-random", path=folder),
                    LoadOptions(dtype=dtype, quantize="int8"))
    best = [float("inf"), float("inf"), None]
    for _ in range(rounds):
        prefill, decode, tokens = time_ours(lm.model, ids, new)
        best = [min(best[0], prefill), min(best[1], decode), tokens]
    return {"ours-int8": {"prefill_s": best[0], "decode_tok_s": (new - 1) / best[1],
                          "tokens": best[2], "weight_bytes": weight_bytes(lm.model)}}


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight once, except the embedding table when it is not
    also the output layer (a lookup reads one row)."""
    from hyprstream_tui.engine.quantize import weight_bytes as count

    total = count(model)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is not embed:
        total -= embed.numel() * embed.element_size()
    return total


def quality(folder: Path, dtype: str) -> dict:
    """int8 against fp32 on a text: logit differences, top-1 agreement, perplexity."""
    import torch

    from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model

    source = ModelSource(name="q", path=folder)
    ref = load_model(source, LoadOptions(dtype="float32"))
    q8 = load_model(source, LoadOptions(dtype=dtype, quantize="int8"))
    ids = torch.tensor([ref.tokenizer.encode(TEXT)])
    with torch.inference_mode():
        a = ref.model(ids).logits[0].float()
        b = q8.model(ids).logits[0].float()
    nll = lambda logits: torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])  # noqa: E731
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "mean_abs_logit_diff": float((a - b).abs().mean()),
        "logit_std": float(a.std()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "ppl_fp32": float(nll(a).exp()), "ppl_int8": float(nll(b).exp()),
        "tokens": ids.shape[1],
    }


def bandwidth_gbs() -> dict:
    """Streaming read (sum) and copy over 1 GB, best of 3."""
    import torch

    a = torch.randn(256 * 1024 * 1024)  # 1 GiB fp32
    b = torch.empty_like(a)
    best_sum = best_copy = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best_sum = min(best_sum, time.perf_counter() - t)
        t = time.perf_counter()
        b.copy_(a)
        best_copy = min(best_copy, time.perf_counter() - t)
    nbytes = a.numel() * 4
    return {"read_gbs": nbytes / best_sum / 1e9, "copy_gbs": 2 * nbytes / best_copy / 1e9}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    folder = Path(args.folder)
    if args.case == "bandwidth":
        result = bandwidth_gbs()
    elif args.case == "quality":
        result = quality(folder, args.dtype)
    elif args.case == "pair":
        result = run_pair(folder, args.dtype, prompt_ids(args.prompt), args.new, args.rounds)
    else:
        result = run_int8(folder, args.dtype, prompt_ids(args.prompt), args.new, args.rounds)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))


def spawn(args: argparse.Namespace, folder: Path, case: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--dtype", dtype, "--folder", str(folder),
           "--threads", str(args.threads), "--prompt", str(args.prompt), "--new", str(args.new),
           "--rounds", str(args.rounds)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise SystemExit(f"{case} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(args: argparse.Namespace, rows: dict, bw: dict, quality_rows: dict) -> None:
    """rows: {(name, dtype): result}; every result has prefill_s, decode_tok_s, tokens, ..."""
    bandwidth = max(bw["read_gbs"], bw["copy_gbs"])
    print(f"\nQwen2.5-0.5B-Instruct architecture, random weights; {args.threads} threads; "
          f"prompt {args.prompt} tokens, decode {args.new}; best of {args.rounds} (alternating)")
    print(f"measured bandwidth: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s\n")
    head = (f"{'case':<22}{'prefill s':>10}{'decode tok/s':>14}{'x generate':>12}"
            f"{'x gen bf16':>12}{'peak RSS MB':>13}{'GB/token':>10}{'roofline':>10}"
            f"{'same tokens':>13}")
    print(head)
    print("-" * len(head))
    bf16 = rows.get(("generate", "bfloat16"))
    for (name, dtype), r in rows.items():
        base = rows.get(("generate", dtype))
        gb = r["weight_bytes"] / 1e9
        speedup = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        vs_bf16 = r["decode_tok_s"] / bf16["decode_tok_s"] if bf16 else float("nan")
        same = "-" if not base else ("yes" if r["tokens"] == base["tokens"] else
                                     f"{_prefix(r['tokens'], base['tokens'])}/{len(r['tokens'])}")
        print(f"{name + ' ' + dtype:<22}{r['prefill_s']:>10.2f}{r['decode_tok_s']:>14.2f}"
              f"{speedup:>12.2f}{vs_bf16:>12.2f}{r['peak_rss_mb']:>13.0f}{gb:>10.3f}"
              f"{bandwidth / gb:>10.1f}{same:>13}")
    for dtype, q in quality_rows.items():
        print(f"\nint8 ({dtype} activations) vs fp32 on a {q['tokens']}-token text: "
              f"max |dlogit| {q['max_abs_logit_diff']:.3f}, mean |dlogit| "
              f"{q['mean_abs_logit_diff']:.4f} (logit std {q['logit_std']:.3f}), top-1 agreement "
              f"{q['top1_agreement']:.1%}, perplexity {q['ppl_fp32']:.1f} -> {q['ppl_int8']:.1f}")
    print("\nroofline: decode tok/s if every weight byte were read once per token at the measured "
          "bandwidth.\nsame tokens: greedy tokens equal generate's in the same dtype (n/128: "
          "equal for the first n).\ngenerate and ours share one process per dtype (same peak RSS); "
          "ours-exact is ours with\nthe bf16 prefill kernel instead of the fp32 one.")


def _prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", action="append", default=[],
                   help="pair-float32, int8-float32, pair-bfloat16 or int8-bfloat16 (repeatable)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.case = args.child
        return child(args)
    with tempfile.TemporaryDirectory(prefix="hyprstream-bench-") as tmp:
        folder = Path(tmp) / "qwen2.5-0.5b-random"
        print("building the random model...", flush=True)
        build_model(folder)
        bw = spawn(args, folder, "bandwidth", "float32")
        rows: dict = {}
        for case, dtype in CASES:
            if args.only and f"{case}-{dtype}" not in args.only:
                continue
            print(f"running {case} {dtype}...", flush=True)
            result = spawn(args, folder, case, dtype)
            rss = result.pop("peak_rss_mb")
            for name, row in result.items():
                rows[(name, dtype)] = {**row, "peak_rss_mb": rss}
        quality_rows = {}
        if not args.only or any("int8" in o for o in args.only):
            for dtype in ("float32", "bfloat16"):
                quality_rows[dtype] = spawn(args, folder, "quality", dtype)
        report(args, rows, bw, quality_rows)


if __name__ == "__main__":
    main()
