"""`benchmarks/decode.py --real`: decode speed on the real model against llama.cpp (issue 15).

    python benchmarks/decode.py --real [--rounds 3] [--threads 2] [--new 128] [--home H]
                                       [--llama-python PATH] [--json]

SmolLM2-135M-Instruct with its real weights (the GGUF of tests/realmodel.py, imported into `--home`
as `smollm2`; without `--home`, into a temporary home), a 43-token chat prompt (the template's
system line and one user message), `--new` greedy tokens, end-of-sequence ignored.
Cases, each a process of its own that loads once and then runs when told:
  ours fp32 / bf16 / int8 / int4   the engine's loader and loop (`generate_tokens`), `--dtype` /
                                   `--quantize` as the CLI passes them (int8 and int4: fp32
                                   activations, the loader's default)
  llama.cpp F16 / BF16 / Q8_0 / Q4_K_M   llama-cpp-python (`--llama-python`, a venv where
                                   `import llama_cpp` works) on the same GGUF requantized by
                                   llama.cpp's own `llama_model_quantize`, once, into
                                   ~/.cache/hyprstream-bench/coldstart (shared with coldstart.py;
                                   Q8_0 and Q4_K_M from the F16 file, as llama.cpp's users make them)
Both get the same prompt token ids (ours), `--threads` threads, greedy sampling. Each round runs
every case once, pairs side by side (ours fp32, llama.cpp F16, ours bf16, ...), after one warm-up
run each. Per case: decode tok/s (tokens 2..N over the time from the 1st to the Nth) and time to
first token (prompt in, first token out), medians over rounds; per pair: the median over rounds of
ours / llama.cpp in the same round, [lowest-highest]. The pairs: fp32/F16, bf16/BF16, int8/Q8_0,
int4/Q4_K_M. "same tokens": how many of the greedy tokens equal those of llama.cpp's pair.

`--shape qwen2.5-0.5b`: the same cases, rounds and report on the Qwen2.5-0.5B-Instruct architecture
with random weights (issue 15's second shape): decode.py's `build_model` (seeded, bf16, the tiny test
tokenizer with 151936 embedding rows), imported into the home as `qwen2.5-0.5b-random` by the store's
import, then exported by our own exporter (`hyprstream model export ... --outtype f16`). llama.cpp's
F16 case is that export as written; BF16, Q8_0 and Q4_K_M are llama.cpp's requantizations of it,
cached as `qwen2.5-0.5b-shape-seed0-<sha256 of the export>.<kind>.gguf` (older digests are removed).
The tiny tokenizer has 1024 tokens; llama.cpp wants a token list as long as the embedding, and the
exporter pads it with unused `[PADn]` entries itself (as convert_hf_to_gguf does), so the benchmark
pads nothing. The prompt is the tiny tokenizer's chat rendering of the message plus " Keep it short
and kind.": 43 tokens, as SmolLM2's. Random weights make meaningless text: only the speed counts,
and "same tokens" is shown for information (greedy choices between near-equal logits tip either way).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.llama_ref import llama_files, prune  # noqa: E402

MODEL = "smollm2"
MESSAGE = "Write a short story about a little robot who learns to paint."  # 43 tokens with the template
QWEN = "qwen2.5-0.5b-random"
QWEN_KEY = "qwen2.5-0.5b-shape-seed0"  # llama.cpp's cached files: this, the export's digest, the kind
# --shape: (the model's name in the home, the user message, the report's title)
SHAPES = {
    "smollm2": (MODEL, MESSAGE, "SmolLM2-135M-Instruct, real weights"),
    "qwen2.5-0.5b": (QWEN, MESSAGE + " Keep it short and kind.",  # 43 tokens with the tiny tokenizer
                     "Qwen2.5-0.5B-Instruct shape, random bf16 weights (seed 0), llama.cpp on our F16 export"),
}
OURS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"},
        "int4": {"quantize": "int4"}}
# kind: (llama.cpp's ftype, made from: None is the Q4_1 GGUF itself); the names are coldstart.py's
LLAMA = ["F16", "BF16", "Q8_0", "Q4_K_M"]  # llama.cpp's files (benchmarks/llama_ref.py)
PAIRS = {"fp32": "F16", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}
# One llama.cpp case: load, say READY, then one greedy run per line read. reset() first: generate()
# would otherwise keep the KV cache of the prompt it saw last time and skip the prefill.
LLAMA_WORKER = """import json, sys, time
from llama_cpp import Llama
path, threads, new, ids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
print("READY", flush=True)
for _ in sys.stdin:
    llm.reset()
    tokens, times = [], []
    started = time.perf_counter()
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        tokens.append(int(token))
        if len(tokens) == new:
            break
    print(json.dumps({"ttft": times[0] - started, "rate": (new - 1) / (times[-1] - times[0]), "tokens": tokens}),
          flush=True)
"""


def ours_worker(home: str, kind: str, threads: int, new: int, ids: list[int], model: str = MODEL) -> None:
    """One of our cases (a child process): load, say READY, then one greedy run per line read."""
    from hyprstream_tui.engine.generate import generate_tokens
    from hyprstream_tui.engine.loader import LoadOptions, load_model, set_threads
    from hyprstream_tui.engine.params import SamplingParams
    from hyprstream_tui.engine.sequence import SequenceState
    from hyprstream_tui.engine.sources import resolve_source
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    set_threads(threads)
    lm = load_model(resolve_source(model, Store(Paths.from_env(Path(home)))), LoadOptions(**OURS[kind]))
    print(f"READY {json.dumps({'load_s': lm.load_s, 'quant_cache': lm.quant_cache})}", flush=True)
    for _ in sys.stdin:
        seq = SequenceState(list(ids), SamplingParams(temperature=0, max_tokens=new), eos_ids=frozenset(),
                            generator=None)
        tokens, times = [], []
        started = time.perf_counter()
        for token in generate_tokens(lm.model, seq):
            times.append(time.perf_counter())
            tokens.append(int(token))
        print(json.dumps({"ttft": times[0] - started, "rate": (new - 1) / (times[-1] - times[0]),
                          "tokens": tokens}), flush=True)


class Worker:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._line()
        self.runs: list[dict] = []

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name} exited ({self.proc.wait()}) before answering: see its stderr above")
        return line.strip()

    def run(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prepare_home(home: Path, gguf: Path) -> None:
    """Import the GGUF as `smollm2` unless the home holds it."""
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    if not any(m.name == MODEL for m in store.list_models()):
        print(f"importing {gguf.name} into {home}...", flush=True)
        subprocess.run([sys.executable, "-m", "hyprstream_tui", "--home", str(home), "model", "import", str(gguf),
                        "--name", MODEL], check=True, capture_output=True)


def _hyprstream(home: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "hyprstream_tui", "--home", str(home), *args],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"hyprstream {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def prepare_qwen(home: Path, tmp: Path) -> Path:
    """The Qwen2.5-0.5B-shape model (decode.py's `build_model`, in a child process so that this one
    stays small while the cases run) imported into `home` as QWEN unless the home holds it, then
    exported by our exporter to GGUF F16; returns the export (in `tmp`)."""
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    if not any(m.name == QWEN for m in Store(Paths.from_env(home)).list_models()):
        folder = tmp / QWEN
        print("building the random Qwen2.5-0.5B-shape model...", flush=True)
        root = str(Path(__file__).resolve().parents[1])
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                        "from benchmarks.decode import build_model; build_model(Path(sys.argv[2]))", root, str(folder)],
                       check=True)
        print(f"importing it into {home}...", flush=True)
        _hyprstream(home, "model", "import", str(folder), "--name", QWEN)
        shutil.rmtree(folder)
    export = tmp / f"{QWEN}.F16.gguf"
    print(f"exporting {export.name} (hyprstream model export --outtype f16)...", flush=True)
    _hyprstream(home, "model", "export", QWEN, "--outtype", "f16", "-o", str(export))
    return export


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()[:12]


def prompt_ids(home: Path, model: str = MODEL, message: str = MESSAGE) -> list[int]:
    from hyprstream_tui.engine.chat import render
    from hyprstream_tui.engine.loader import load_tokenizer
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    tokenizer = load_tokenizer(Store(Paths.from_env(home)).model_dir(model))
    return render(tokenizer, [{"role": "user", "content": message}])


def _same(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main_real(args) -> None:
    model, message, _title = SHAPES[args.shape]
    has_llama = Path(args.llama_python).is_file()
    if not has_llama:
        print(f"llama.cpp: no {args.llama_python} (build it as benchmarks/coldstart.py says): ours alone")
    with tempfile.TemporaryDirectory(prefix="hyprstream-decode-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        files: dict[str, Path] = {}
        if args.shape == "smollm2":
            from tests.realmodel import gguf_path

            gguf = gguf_path()
            files = llama_files(args.llama_python, gguf, LLAMA) if has_llama else {}
            prepare_home(home, gguf)
        else:
            export = prepare_qwen(home, Path(tmp))
            if has_llama:
                stem = f"{QWEN_KEY}-{digest(export)}"
                prune(QWEN_KEY, stem)
                files = llama_files(args.llama_python, export, LLAMA, stem=stem, given={"F16": export})
        ids = prompt_ids(home, model, message)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        workers: dict[str, Worker] = {}
        try:
            for ours, theirs in PAIRS.items():  # loaded one at a time: no load competes with another
                workers[f"ours {ours}"] = Worker(f"ours {ours}", [
                    sys.executable, str(Path(__file__).with_name("decode.py")), "--real", "--worker", ours,
                    "--home", str(home), "--shape", args.shape, "--threads", str(args.threads),
                    "--new", str(args.new), "--ids", json.dumps(ids)], env)
                if has_llama:
                    workers[f"llama.cpp {theirs}"] = Worker(f"llama.cpp {theirs}", [
                        args.llama_python, "-c", LLAMA_WORKER, str(files[theirs]), str(args.threads),
                        str(args.new), json.dumps(ids)], env)
            for w in workers.values():
                w.run()  # warm-up: lazy set-up (kernel checks, the lean decoder) out of the figures
            for r in range(args.rounds):
                for w in workers.values():
                    w.runs.append(w.run())
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{w.name} {w.runs[-1]['rate']:.1f}" for w in workers.values()), flush=True)
        finally:
            for w in workers.values():
                w.close()
    report(args, workers, ids)


def report(args, workers: dict, ids: list[int]) -> None:
    med = statistics.median
    rows = {}
    for name, w in workers.items():
        rows[name] = {"rate": med(r["rate"] for r in w.runs), "ttft_ms": 1000 * med(r["ttft"] for r in w.runs),
                      "rates": [r["rate"] for r in w.runs], "ttfts": [r["ttft"] for r in w.runs],
                      "tokens": w.runs[-1]["tokens"], "ready": w.ready}
    pairs = {}
    for ours, theirs in PAIRS.items():
        a, b = rows.get(f"ours {ours}"), rows.get(f"llama.cpp {theirs}")
        if a and b:
            decode = [x / y for x, y in zip(a["rates"], b["rates"])]
            ttft = [x / y for x, y in zip(a["ttfts"], b["ttfts"])]
            pairs[f"{ours}/{theirs}"] = {"decode": decode, "ttft": ttft, "same": _same(a["tokens"], b["tokens"])}
    if args.json:
        print(json.dumps({"rows": rows, "pairs": pairs, "prompt_tokens": len(ids), "shape": args.shape}))
        return
    print(f"\n{SHAPES[args.shape][2]}; {args.threads} threads; {len(ids)}-token chat prompt, "
          f"{args.new} greedy tokens; median of {args.rounds} rounds, cases in turn, each its own process\n")
    head = f"{'case':<20}{'decode tok/s':>14}{'1st token ms':>14}   load"
    print(head + "\n" + "-" * (len(head) + 24))
    for name, r in rows.items():
        ready = json.loads(r["ready"].removeprefix("READY") or "{}")
        load = f"{ready['load_s']:.2f} s" if "load_s" in ready else ""
        load += f", quantized cache {ready['quant_cache']}" if ready.get("quant_cache") else ""
        print(f"{name:<20}{r['rate']:>14.1f}{r['ttft_ms']:>14.0f}   {load}")
    if pairs:
        print(f"\n{'ours / llama.cpp':<20}{'decode':>22}{'1st token time':>22}{'same tokens':>14}")
        for label, p in pairs.items():
            d, t = p["decode"], p["ttft"]
            print(f"{label:<20}{f'{med(d):.2f} [{min(d):.2f}-{max(d):.2f}]':>22}"
                  f"{f'{med(t):.2f} [{min(t):.2f}-{max(t):.2f}]':>22}{p['same']:>10}/{args.new}")
    print("\ndecode: the median over rounds of ours' rate / llama.cpp's in the same round (above 1: ours faster);"
          "\n1st token time: the same for the time to the first token (below 1: ours sooner).")
    if args.shape != "smollm2":
        print("same tokens: random weights, for information only (near-equal logits tip either way).")
