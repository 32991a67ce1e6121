"""Serving throughput with continuous batching: 1, 4 and 8 concurrent streaming clients.

    python benchmarks/serve.py [--threads 2] [--new 128] [--clients 1,4,8] [--rounds 2]
                               [--dtype bfloat16|float32|auto] [--quantize int8]

A random-weight model with the real Qwen2.5-0.5B architecture (config in benchmarks/decode.py, no download), stored
in bf16 and served (default `--dtype bfloat16`) by `hyprstream serve` in its own process on
127.0.0.1 with `--threads 2`. Its tokenizer is byte-level with one visible word (` t<id>`) for every
id of the 151936-token vocabulary beyond the 256 byte symbols, so every token the random model
picks is real text; there is no EOS, so each request produces exactly `--new` tokens.

Each round launches N clients at once (asyncio + httpx, streaming /v1/completions, greedy, a
different 32-token prompt each). Reported per N: aggregate tokens/s (all tokens / wall time of the
round), per-client tokens/s (a client's tokens / its own request time) and decode tokens/s (after
its first token), and time to first token p50/p99 over all requests of all rounds. The target:
8 clients reach at least 4x the aggregate throughput of 1 client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode import QWEN25_05B  # noqa: E402  (the one copy of the config)

PROMPT_TOKENS = 32


def build_model(dest: Path) -> Path:
    """Random bf16 weights (seeded), the config, and a byte-level tokenizer covering the vocab."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    if (dest / "model.safetensors").is_file():
        return dest
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in QWEN25_05B.items() if k != "architectures"})
    config.architectures = QWEN25_05B["architectures"]
    config.bos_token_id = config.eos_token_id = config.pad_token_id = None  # no EOS: N tokens each
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = dest.with_name(dest.name + ".incomplete")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    save_tokenizer(tmp, config.vocab_size)
    tmp.rename(dest)
    return dest


def save_tokenizer(dest: Path, vocab_size: int) -> None:
    """Byte-level BPE: the 256 byte symbols, then ` t<id>` for every other id, no merges.

    Qwen2's tokenizer class (which transformers picks for model_type qwen2) keeps this vocabulary,
    so prompts encode byte by byte and every generated id decodes to a visible word.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({f"\u0120t{i}": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(dest)


def make_store(home: Path, folder: Path) -> None:
    from hyprstream_tui.settings import Paths
    from hyprstream_tui.store import Store

    store = Store(Paths.from_env(home))
    if "qwen-shaped" not in [m.name for m in store.list_models()]:
        store.import_model(folder, name="qwen-shaped")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "hyprstream_tui", "--home", str(home), "serve", "--port", str(port),
           "--threads", str(args.threads), "--dtype", args.dtype, "--max-batch", str(max(args.clients)),
           "--max-queue", "64", *(["--quantize", args.quantize] if args.quantize else [])]
    return subprocess.Popen(cmd, cwd=ROOT, env=env)


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)


def prompt(i: int) -> str:
    """PROMPT_TOKENS tokens (the tokenizer is byte-level without merges: one letter, one token)."""
    return "".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(PROMPT_TOKENS))


async def one_client(client, url: str, i: int, new: int) -> dict:
    """One streaming completion: when it started, its first token came, it ended; its tokens."""
    body = {"model": "qwen-shaped", "prompt": prompt(i), "max_tokens": new, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
    return {"start": started, "first": first or time.perf_counter(), "end": time.perf_counter(),
            "tokens": tokens}


async def one_round(url: str, n: int, new: int, offset: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, offset + i, new) for i in range(n)))
        wall = time.perf_counter() - started
    return {"wall": wall, "clients": results}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(n: int, rounds: list[dict]) -> dict:
    clients = [c for r in rounds for c in r["clients"]]
    ttft = [c["first"] - c["start"] for c in clients]
    return {
        "clients": n,
        "aggregate_tok_s": statistics.mean(sum(c["tokens"] for c in r["clients"]) / r["wall"] for r in rounds),
        "per_client_tok_s": statistics.mean(c["tokens"] / (c["end"] - c["start"]) for c in clients),
        "per_client_decode_tok_s": statistics.mean(
            (c["tokens"] - 1) / (c["end"] - c["first"]) for c in clients if c["end"] > c["first"]),
        "ttft_p50_s": percentile(ttft, 0.5),
        "ttft_p99_s": percentile(ttft, 0.99),
        "tokens": sum(c["tokens"] for c in clients),
        "requests": len(clients),
    }


async def bench(args: argparse.Namespace, url: str) -> list[dict]:
    await one_round(url, 1, 8, offset=1000)  # warm-up: the model loads on the first request
    rows, offset = [], 0
    for n in args.clients:
        rounds = []
        for _ in range(args.rounds):
            rounds.append(await one_round(url, n, args.new, offset))
            offset += n
        rows.append(summarize(n, rounds))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"\nQwen2.5-0.5B architecture, random weights served in {args.dtype}{' int8' if args.quantize else ''}; server --threads {args.threads}; "
          f"{args.new} new tokens per request, {PROMPT_TOKENS}-token prompts, greedy, "
          f"{args.rounds} round(s) per row; {os.cpu_count()} CPUs, load average at the end "
          f"{os.getloadavg()[0]:.1f} (other processes share these cores)")
    print(f"{'clients':>7} {'aggregate tok/s':>16} {'per-client tok/s':>17} {'decode tok/s':>13} "
          f"{'TTFT p50 s':>11} {'TTFT p99 s':>11}")
    for r in rows:
        print(f"{r['clients']:>7} {r['aggregate_tok_s']:>16.2f} {r['per_client_tok_s']:>17.2f} "
              f"{r['per_client_decode_tok_s']:>13.2f} {r['ttft_p50_s']:>11.2f} {r['ttft_p99_s']:>11.2f}")
    base = next((r for r in rows if r["clients"] == 1), None)
    top = max(rows, key=lambda r: r["clients"])
    if base and top is not base:
        ratio = top["aggregate_tok_s"] / base["aggregate_tok_s"]
        verdict = "meets" if ratio >= 4 else "misses"
        print(f"\n{top['clients']} clients: {ratio:.2f}x the aggregate throughput of 1 client "
              f"({verdict} the 4x target)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new", type=int, default=128, help="tokens per request")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"],
                   help="the server's --dtype (weights are stored in bf16)")
    p.add_argument("--quantize", default=None, choices=["int8"], help="the server's --quantize")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--rounds", type=int, default=2, help="rounds per client count")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "hyprstream-bench-serve")
    args = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = build_model(args.workdir / "model")
    home = args.workdir / "home"
    make_store(home, folder)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(home, port, args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server
    try:
        asyncio.run(wait_ready(url, proc))
        rows = asyncio.run(bench(args, url))
    finally:
        proc.terminate()
        proc.wait(30)
    report(args, rows)


if __name__ == "__main__":
    main()
