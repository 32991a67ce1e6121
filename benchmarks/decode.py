"""Decode speed on a random-weight model with the real Qwen2.5-0.5B-Instruct architecture.

    python benchmarks/decode.py [--threads 2] [--prompt 512] [--new 128] [--only pair-bfloat16]

No download: the config is written below and the weights are random (seeded), saved once as
safetensors in a temp folder. Cases, each in fp32 and bf16:
  generate    transformers' `generate` (greedy) on the model as `from_pretrained` builds it
  ours        hyprstream's engine loop (engine.generate.generate_tokens) on the same weights,
              loaded by the engine's loader (bf16 prefill through fp32 on CPUs without bf16),
              decode steps through engine.tuned.lean.LeanDecoder
  ours-plain  ours with decode steps through model(...) instead of the lean decoder
  ours-torch-gemv  ours (bf16) with torch's one-row kernel rather than engine.tuned.gemv's C kernel
  ours-exact  ours with the plain bf16 prefill kernel (bf16 only, where the two differ): the
              same prefill as generate, so its greedy tokens must equal generate's (decode
              steps as ours: the lean decoder, engine.tuned.gemv's one-row kernel)
  ours-int8   ours with `--quantize int8`
Prefill: one whole run (prompt to tokens) of each case. Decode: rounds in which each case decodes
in turn from its own copy of one prefilled prefix (the prompt but its last token), so the cases
start from the same state and run next to each other in time: the ratio within a round holds on a
shared machine whose speed moves, and it is reported as the median over rounds. generate and ours
share one process per dtype; int8 runs in its own process with generate bf16 beside it (peak RSS
taken before that reference loads). It prints prefill time for the prompt, decode tokens/s, peak
RSS, whether greedy tokens match `generate`, the int8 quality cost against fp32 (logits,
perplexity on a text) and the memory-bandwidth roofline (weight bytes read per token / measured
bandwidth).

`--real`: the real model (SmolLM2-135M-Instruct) against llama.cpp instead; `--real --shape
qwen2.5-0.5b`: this random model against llama.cpp on our GGUF export of it; see decode_real.py.
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


def time_generate(model, ids: list[int], new: int, cache=None) -> tuple[float, float, list[int]]:
    """(prefill s, decode s for new-1 tokens, tokens) of one greedy `generate` call; `cache`
    holds a prefix of the prompt already (generate runs only the rest)."""
    import torch

    x = torch.tensor([ids])
    clock = _Clock()
    with torch.inference_mode():
        started = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             eos_token_id=None, pad_token_id=0, max_new_tokens=new,
                             min_new_tokens=new, streamer=clock, past_key_values=cache)
    # clock.times: [prompt, token 1 (after prefill), ..., token new]
    return clock.times[1] - started, clock.times[-1] - clock.times[1], out[0, len(ids):].tolist()


def time_ours(model, ids: list[int], new: int, lean: bool = True,
              cache=None) -> tuple[float, float, list[int]]:
    from hyprstream_tui.engine import generate
    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.engine.sequence import SequenceState

    seq = SequenceState(ids, SamplingParams(temperature=0, max_tokens=new), eos_ids=frozenset(),
                        generator=None)
    tokens = list(generate.generate_tokens(model, seq, cache=cache, tuned=lean))
    return seq.prefill_s, seq.decode_s, tokens


def load(folder: Path, dtype: str, quantize: str | None = None):
    """The engine's loader; returns (model, plain, prefill_differs): plain(True) switches the
    layers it gave a faster prefill kernel back to `nn.Linear`, as transformers loads them, and
    prefill_differs says whether any of those kernels computes differently (bf16 through fp32)."""
    import torch

    from hyprstream_tui.engine.tuned.kernels import GemvLinear, RowsFirstLinear, UpcastPrefillLinear
    from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model

    lm = load_model(ModelSource(name="qwen2.5-0.5b-random", path=folder),
                    LoadOptions(dtype=dtype, quantize=quantize))
    swapped = [(m, type(m)) for m in lm.model.modules()
               if isinstance(m, (GemvLinear, RowsFirstLinear))]

    def plain(on: bool, cls: type | None = None) -> None:
        """on: every swapped layer a plain `nn.Linear` (or `cls`); off: the loader's classes."""
        for module, ours in swapped:
            module.__class__ = (cls or torch.nn.Linear) if on else ours

    return lm.model, plain, any(cls is UpcastPrefillLinear for _, cls in swapped)


def prefix_cache(model, ids: list[int]):
    """The KV cache of the prompt but its last token, through `model(...)` as loaded."""
    import torch

    from hyprstream_tui.engine.generate import new_cache

    cache = new_cache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids[:-1]]), cache=cache, use_cache=True, logits_to_keep=1)
    return cache


def decode_rounds(runs: dict, rounds: int, new: int) -> dict:
    """Each run decodes from its own copy of a prefilled prefix, in turn, `rounds` times:
    {name: {"rates": [tok/s per round], "tokens": tokens}}. Runs next to each other see the same
    machine, so the ratio of two runs within a round holds when the machine's speed moves."""
    import copy

    out = {name: {"rates": [], "tokens": None} for name in runs}
    for _ in range(rounds):
        for name, (run, prefix, setup) in runs.items():
            setup()
            _prefill, decode, tokens = run(copy.deepcopy(prefix))
            out[name]["rates"].append((new - 1) / decode)
            out[name]["tokens"] = tokens
    return out


def run_pair(folder: Path, dtype: str, ids: list[int], new: int, rounds: int) -> dict:
    """generate and ours on the same loaded weights.

    Prefill: one whole run of each (prompt to `new` tokens). Decode: `rounds` rounds, each case
    in turn, all from one prefix (the prompt but its last token) prefilled once with generate's
    kernels, so the decode loops start from the same state bit for bit. For `generate`, layers
    our loader swapped for a faster prefill kernel are switched back to plain `nn.Linear`, so it
    runs exactly as transformers loads it.
    """
    from hyprstream_tui.engine.tuned import gemv
    from hyprstream_tui.engine.tuned.kernels import GemvLinear

    model, plain, prefill_differs = load(folder, dtype)
    native = dtype == "bfloat16" and gemv.kernel() is not None

    def ours_setup(use_gemv: bool):
        def setup() -> None:
            plain(False)
            gemv.set_enabled(use_gemv)
        return setup

    cases = [("generate", True, lambda: time_generate(model, ids, new)),
             ("ours", False, lambda: time_ours(model, ids, new))]
    if prefill_differs:  # ours with generate's prefill kernel too (and ours's one-row kernel)
        cases.append(("ours-exact", True, lambda: time_ours(model, ids, new)))
    whole = {}
    for name, use_plain, run in cases:
        plain(use_plain, GemvLinear if name == "ours-exact" else None)
        whole[name] = run()
    plain(True)
    prefix = prefix_cache(model, ids)
    runs = {
        "generate": (lambda c: time_generate(model, ids, new, c), prefix, lambda: plain(True)),
        "ours": (lambda c: time_ours(model, ids, new, cache=c), prefix, ours_setup(True)),
        "ours-plain": (lambda c: time_ours(model, ids, new, lean=False, cache=c), prefix,
                       ours_setup(True)),
    }
    if native:  # the same loop with torch's one-row kernel: what the C kernel adds
        runs["ours-torch-gemv"] = (lambda c: time_ours(model, ids, new, cache=c), prefix,
                                   ours_setup(False))
    decoded = decode_rounds(runs, rounds, new)
    gemv.set_enabled(True)
    nbytes = weight_bytes(model)
    rows = {}
    for name, (prefill_s, decode_s, tokens) in whole.items():
        rows[name] = {"prefill_s": prefill_s, "whole_tokens": tokens, "weight_bytes": nbytes,
                      "whole_rate": (new - 1) / decode_s}
        if name in decoded:
            rows[name].update(decoded[name])
    for name in ("ours-plain", "ours-torch-gemv"):
        if name in decoded:
            rows[name] = {**decoded[name], "weight_bytes": nbytes}
    for name in ("ours", "ours-plain", "ours-torch-gemv"):
        if name in decoded:
            rows[name]["ratio_to"] = {"generate": _ratios(decoded[name], decoded["generate"])}
    if dtype == "bfloat16":
        rows["gemv"] = gemv.status()
    return rows


def run_int8(folder: Path, dtype: str, ids: list[int], new: int, rounds: int) -> dict:
    """ours --quantize int8, then, in rounds beside it, generate in bf16 on the same weights (the
    target's reference). Peak RSS is taken before the reference loads."""
    model, _, _ = load(folder, dtype, quantize="int8")
    prefill_s, _decode, tokens = time_ours(model, ids, new)
    rss = peak_rss_mb()
    prefix = prefix_cache(model, ids)
    ref, ref_plain, _ = load(folder, "bfloat16")
    ref_plain(True)
    ref_prefix = prefix_cache(ref, ids)
    decoded = decode_rounds({
        "ours-int8": (lambda c: time_ours(model, ids, new, cache=c), prefix, lambda: None),
        "generate-bf16": (lambda c: time_generate(ref, ids, new, c), ref_prefix, lambda: None),
    }, rounds, new)
    row = {"prefill_s": prefill_s, "whole_tokens": tokens, "weight_bytes": weight_bytes(model),
           "peak_rss_mb": rss, **decoded["ours-int8"],
           "ratio_to": {"generate bfloat16": _ratios(decoded["ours-int8"], decoded["generate-bf16"])}}
    return {"ours-int8": row}


def _ratios(a: dict, b: dict) -> list[float]:
    return [x / y for x, y in zip(a["rates"], b["rates"])]


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight once, except the embedding table when it is not
    also the output layer (a lookup reads one row)."""
    from hyprstream_tui.engine.tuned.quantize import weight_bytes as count

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
    """rows: {(name, dtype): result}; see run_pair and run_int8."""
    import statistics

    med = statistics.median
    bandwidth = max(bw["read_gbs"], bw["copy_gbs"])
    print(f"\nQwen2.5-0.5B-Instruct architecture, random weights; {args.threads} threads; "
          f"prompt {args.prompt} tokens, decode {args.new}; decode: median of {args.rounds} "
          "rounds, cases in turn")
    print(f"measured bandwidth: read {bw['read_gbs']:.1f} GB/s, copy {bw['copy_gbs']:.1f} GB/s\n")
    head = (f"{'case':<26}{'prefill s':>10}{'decode tok/s':>14}{'x generate':>18}"
            f"{'x gen bf16':>18}{'peak RSS MB':>13}{'GB/token':>10}{'roofline':>10}"
            f"{'same tokens':>13}{'whole run':>11}")
    print(head)
    print("-" * len(head))
    gen_bf16 = rows.get(("generate", "bfloat16"))

    def ratio(r: dict, key: str, base: dict | None) -> str:
        paired = r.get("ratio_to", {}).get(key)
        if paired:  # measured in rounds beside the reference: median [lowest-highest]
            return f"{med(paired):.2f} [{min(paired):.2f}-{max(paired):.2f}]"
        if base and "rates" in base and "rates" in r and r is not base:
            return f"~{med(r['rates']) / med(base['rates']):.2f}"  # another process, other times
        return "1.00" if r is base else "-"

    def same(mine: list | None, theirs: list | None) -> str:
        if mine is None or theirs is None:
            return "-"
        return "yes" if mine == theirs else f"{_prefix(mine, theirs)}/{len(mine)}"

    for (name, dtype), r in rows.items():
        base = rows.get(("generate", dtype))
        gb = r["weight_bytes"] / 1e9
        prefill = f"{r['prefill_s']:.2f}" if "prefill_s" in r else "-"
        rate = med(r["rates"]) if "rates" in r else r["whole_rate"]  # ours-exact: its one run
        decode_same = same(r.get("tokens"), base["tokens"]) if base and "int8" not in name else "-"
        whole_same = same(r.get("whole_tokens"), base.get("whole_tokens") if base else None) \
            if r is not base else "-"
        print(f"{name + ' ' + dtype:<26}{prefill:>10}{rate:>14.2f}"
              f"{ratio(r, 'generate', base):>18}{ratio(r, 'generate bfloat16', gen_bf16):>18}"
              f"{r['peak_rss_mb']:>13.0f}{gb:>10.3f}{bandwidth / gb:>10.1f}{decode_same:>13}"
              f"{whole_same:>11}")
    for dtype, q in quality_rows.items():
        print(f"\nint8 ({dtype} activations) vs fp32 on a {q['tokens']}-token text: "
              f"max |dlogit| {q['max_abs_logit_diff']:.3f}, mean |dlogit| "
              f"{q['mean_abs_logit_diff']:.4f} (logit std {q['logit_std']:.3f}), top-1 agreement "
              f"{q['top1_agreement']:.1%}, perplexity {q['ppl_fp32']:.1f} -> {q['ppl_int8']:.1f}")
    print(f"""
x generate, x gen bf16: the median over rounds of (this case's rate / the reference's rate in the
  same round), [lowest-highest]; ~ marks a ratio of medians measured in another process.
roofline: decode tok/s if every weight byte were read once per token at the measured bandwidth.
same tokens: the {args.new} greedy tokens decoded from one shared prefilled prefix equal generate's
  (n/{args.new}: equal for the first n); whole run: prompt to tokens, each case with its own prefill
  (ours prefills bf16 through fp32 kernels, ours-exact through generate's bf16 kernels).
ours-plain: ours with decode steps through model(...) instead of the lean decoder.
ours-torch-gemv: ours with torch's one-row bf16 kernel instead of engine.tuned.gemv's C kernel.
ours-exact: decodes as ours does; its decode rate is that of its one whole run.""")


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
    p.add_argument("--rounds", type=int, default=4, help="decode rounds (each case in turn)")
    p.add_argument("--only", action="append", default=[],
                   help="pair-float32, int8-float32, pair-bfloat16 or int8-bfloat16 (repeatable)")
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M-Instruct, real weights, against llama.cpp (decode_real.py)")
    p.add_argument("--shape", default="smollm2", choices=["smollm2", "qwen2.5-0.5b"],
                   help="--real: SmolLM2-135M-Instruct (real weights) or this random Qwen2.5-0.5B shape")
    p.add_argument("--home", default=None, help="--real: a home holding the model (default: a temporary one)")
    p.add_argument("--llama-python", default=None, help="--real: a python where `import llama_cpp` works")
    p.add_argument("--json", action="store_true", help="--real: one JSON object")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.real:
        import decode_real  # puts the repository on sys.path

        from benchmarks.llama_ref import LLAMA_PYTHON

        if args.worker:
            return decode_real.ours_worker(args.home, args.worker, args.threads, args.new, json.loads(args.ids),
                                           decode_real.SHAPES[args.shape][0])
        args.llama_python = args.llama_python or str(LLAMA_PYTHON)
        return decode_real.main_real(args)
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
            if "gemv" in result:
                print(f"  {result.pop('gemv')}")
            for name, row in result.items():
                rows[(name, dtype)] = {"peak_rss_mb": rss, **row}
        quality_rows = {}
        if not args.only or any("int8" in o for o in args.only):
            for dtype in ("float32", "bfloat16"):
                quality_rows[dtype] = spawn(args, folder, "quality", dtype)
        report(args, rows, bw, quality_rows)


if __name__ == "__main__":
    main()
