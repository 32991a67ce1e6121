"""Cold start: whole processes, from command to answer, on the real SmolLM2-135M-Instruct, against
llama.cpp (llama-cpp-python) answering the same question from the same GGUF.

    python benchmarks/coldstart.py [--rounds 5] [--threads 2] [--home H] [--llama-python PATH]
                                   [--only cold,warm,llama,floors,serve,tui] [--profile] [--json]

The model: tests/realmodel.py's Q4_1 GGUF (fetched on first use), imported once into a throwaway
home as `smollm2` (`hyprstream model import`, fp32), or taken from `--home` if it holds it.
Cases, each one whole process timed from start to exit, with Python's bytecode caches as a user has
them (PYTHONDONTWRITEBYTECODE is dropped and every command runs once before the rounds):
  ours fp32 / bf16 / int8   `hyprstream --home H infer smollm2 --prompt "What is the capital of
                            France?" --temperature 0 --max-tokens 16` with `--dtype float32`,
                            `--dtype bfloat16` or `--quantize int8` (auto is bf16 where the CPU has
                            native bf16), cold: HYPRSTREAM_KEEP_ALIVE=0, no engine running
  ours ... warm             the same command a second time with the keep-alive engine on, once the
                            engine holds the model (its first call, which starts the engine, is
                            shown too: an int8 or fp32 one answers without torch and does not
                            wait for it);
                            skipped, with a line that says so, while `hyprstream infer` knows no
                            `--no-keep-alive`
  llama.cpp F16 / BF16 / Q8_0  `Llama(model_path, n_threads).create_chat_completion(...)`, max_tokens
                            16, temperature 0, in a `python -c` process of the llama-cpp-python venv
                            (`--llama-python`), on the same GGUF requantized by llama.cpp's own
                            quantizer (once, into ~/.cache/hyprstream-bench/coldstart; Q8_0 from
                            the F16 file: see benchmarks/llama_ref.py)
  floors                    `hyprstream --help`, `hyprstream --home H model list`, `python -c pass`,
                            `python -c "import torch"`, `import llama_cpp`
  serve                     `hyprstream --home H serve --port P --threads T` (a free port) from its
                            launch to the first `GET /health` answering 200 (the server imports torch
                            on the first request, not before), and on to the answer of a first
                            `POST /v1/chat/completions` (the question, greedy, 16 tokens); the server
                            is ended after each round
  tui                       the app (benchmarks/coldstart_tui.py: one whole process, headless under
                            Textual's Pilot) on a throwaway home holding the demo model and `smollm2`
                            twice (`smollm2`, `smollm2-copy`: hard links of H's files): once its
                            warm-up is done (the engine process forked), the chat opens on the demo
                            model, is switched to smollm2 and asked the question (greedy, 16 tokens),
                            then switched to smollm2-copy and asked again (the engine has answered
                            once by then: what the first switch pays and the second does not);
                            and, in a second app process, the same first switch as soon as the app
                            is up (it waits for the rest of the warm-up: torch in the forkserver).
                            Timed inside the app: from the model picker's change to the reply's
                            first text in its chat message, and to the reply's end
After serve and tui, every process they started must be gone (checked with psutil; one left is
killed and named in the report). `--only` runs some case groups alone (comma-separated); llama.cpp
F16, the reference of serve and tui, runs with them, and all of llama.cpp with cold or warm.
Cases run interleaved, one of each per round, the order turned by one each round. Reported: the
median per case over the rounds, and the median over rounds of the per-round ratio ours / llama.cpp
for the pairs fp32/F16, bf16/BF16, int8/Q8_0 (issue 21's targets: cold <= 2x, warm <= 0.4x
llama.cpp's cold); serve and the TUI's first tokens against the cold target, 2x llama.cpp F16's cold
time in the same round (issue 21: serve ready <= 1.5x, a switch's first token <= 1x). Every answer
must contain "Paris". `--profile`: one cold `infer` under `python -X importtime` (the 25 slowest
imports) and under cProfile (main thread, top 30 by cumulative time).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.llama_ref import BUILD_HINT, LLAMA_PYTHON, llama_files  # noqa: E402

QUESTION = "What is the capital of France?"
MAX_TOKENS = 16
MODEL = "smollm2"
OURS = {"fp32": ["--dtype", "float32"], "bf16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"]}
LLAMA = ["F16", "BF16", "Q8_0"]  # llama.cpp's files (benchmarks/llama_ref.py: Q8_0 is made from F16)
PAIRS = {"fp32": "F16", "bf16": "BF16", "int8": "Q8_0"}
GROUPS = ("cold", "warm", "llama", "floors", "serve", "tui")
COPY = MODEL + "-copy"  # the TUI's second switch: the same weights under another name, not loaded yet
TUI_DRIVER = Path(__file__).with_name("coldstart_tui.py")
SERVE_ROW = "hyprstream serve: /health 200"
SERVE_REPLY = "ours serve: launch to 1st reply"
TUI_READY = "tui: app start to warm-up done"
TUI_SWITCHES = {"warm": ["ours tui 1st switch", "ours tui 2nd switch"], "at-once": ["ours tui switch at start"]}
# row: target, as a multiple of the cold target (2x llama.cpp F16's cold time in the same round)
VS_COLD_TARGET = {SERVE_ROW: 1.5, **{f"{row}: 1st token": 1.0 for rows in TUI_SWITCHES.values() for row in rows}}
LLAMA_ANSWER = """import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=int(sys.argv[2]), verbose=False)
out = llm.create_chat_completion(messages=[{"role": "user", "content": sys.argv[3]}],
                                 max_tokens=int(sys.argv[4]), temperature=0)
print(out["choices"][0]["message"]["content"])
"""
def child_env(**extra: str) -> dict[str, str]:
    """The environment of every timed process: bytecode caches on, as a user has them."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, **extra}


def entry() -> list[str]:
    """What runs `hyprstream` under a python: the installed script beside this interpreter, else -m."""
    script = Path(sys.executable).parent / "hyprstream"
    return [str(script)] if script.is_file() else ["-m", "hyprstream_tui"]


def hyprstream() -> list[str]:
    """The command as a user types it (the script itself: no pyenv shim in front of it)."""
    return entry() if entry()[0] != "-m" else [sys.executable, *entry()]


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> tuple[float, str]:
    """(wall seconds, stdout) of one whole process."""
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or child_env(), timeout=900)
    took = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return took, proc.stdout


def prepare_home(home: Path, gguf: Path) -> float | None:
    """Import the GGUF as `smollm2` unless the home holds it; seconds the import took (None: had it)."""
    _, listing = run(hyprstream() + ["--home", str(home), "model", "list", "--json"])
    if any(m["name"] == MODEL for m in json.loads(listing)):
        return None
    took, _ = run(hyprstream() + ["--home", str(home), "model", "import", str(gguf), "--name", MODEL])
    return took


def has_keep_alive() -> tuple[bool, bool]:
    """(`infer` knows --no-keep-alive, `hyprstream engine stop` exists)."""
    _, text = run(hyprstream() + ["infer", "--help"])
    stop = subprocess.run(hyprstream() + ["engine", "stop", "--help"], capture_output=True,
                          env=child_env()).returncode == 0
    return "--no-keep-alive" in text, stop


class Cases:
    """Each case a function that runs its process(es) and returns {row name: (seconds, answer)}."""

    def __init__(self, args: argparse.Namespace, home: Path, llama: dict[str, Path] | None,
                 keep_alive: bool, engine_stop: bool) -> None:
        self.args, self.home, self.llama = args, home, llama
        self.keep_alive, self.engine_stop = keep_alive, engine_stop
        self.tui_home: Path | None = None  # made by prepare_tui
        self.strays: list[str] = []  # processes serve or the TUI left behind (killed)

    def infer(self, extra: list[str]) -> list[str]:
        return hyprstream() + ["--home", str(self.home), "infer", MODEL, "--prompt", QUESTION, "--temperature",
                               "0", "--max-tokens", str(MAX_TOKENS), "--threads", str(self.args.threads), *extra]

    def stop_engine(self) -> None:
        if self.engine_stop:
            run(hyprstream() + ["--home", str(self.home), "engine", "stop"], check=False)

    def cold(self, dtype: str) -> dict[str, tuple[float, str]]:
        self.stop_engine()
        return {f"ours {dtype} cold": run(self.infer(OURS[dtype]), child_env(HYPRSTREAM_KEEP_ALIVE="0"))}

    def warm(self, dtype: str) -> dict[str, tuple[float, str]]:
        """The keep-alive engine's first call (it starts the engine), then the call it serves warm:
        once the engine holds the model (a first call answered without torch has not waited for
        the engine it started; every other first call has)."""
        self.stop_engine()
        env = child_env(HYPRSTREAM_KEEP_ALIVE="60")  # an engine left behind leaves within a minute
        first = run(self.infer(OURS[dtype]), env)
        self.wait_loaded()
        second = run(self.infer(OURS[dtype]), env)
        self.stop_engine()
        return {f"ours {dtype} keep-alive 1st call": first, f"ours {dtype} warm": second}

    def wait_loaded(self, timeout: float = 120.0) -> None:
        """Until the home's engine process holds a model and is ready (`hyprstream engine status --json`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, out = run(hyprstream() + ["--home", str(self.home), "engine", "status", "--json"], check=False)
            try:
                info = json.loads(out)
                if info.get("models") and info.get("ready", True):  # loaded, warm-up tokens run
                    return
            except ValueError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"the engine process held no model after {timeout:g} s")

    def llama_cpp(self, kind: str) -> dict[str, tuple[float, str]]:
        assert self.llama is not None
        cmd = [self.args.llama_python, "-c", LLAMA_ANSWER, str(self.llama[kind]), str(self.args.threads),
               QUESTION, str(MAX_TOKENS)]
        return {f"llama.cpp {kind} cold": run(cmd)}

    def floors(self) -> dict[str, tuple[float, str]]:
        rows = {"hyprstream --help": run(hyprstream() + ["--help"]),
                "hyprstream model list": run(hyprstream() + ["--home", str(self.home), "model", "list"]),
                "python -c pass": run([sys.executable, "-c", "pass"]),
                "python -c 'import torch'": run([sys.executable, "-c", "import torch"])}
        if self.llama is not None:
            rows["python -c 'import llama_cpp'"] = run([self.args.llama_python, "-c", "import llama_cpp"])
        return rows

    def serve(self) -> dict[str, tuple[float, str]]:
        """From launching `hyprstream serve` to its first /health 200; then the server is ended."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.perf_counter()
        proc = subprocess.Popen(hyprstream() + ["--home", str(self.home), "serve", "--port", str(port), "--threads",
                                                str(self.args.threads)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env())
        try:
            while not health_ok(port):
                if proc.poll() is not None or time.perf_counter() - started > 300:
                    proc.kill()
                    raise SystemExit(f"hyprstream serve never answered /health 200:\n{proc.communicate()[1][-2000:]}")
                time.sleep(0.01)
            ready = time.perf_counter() - started
            answer = ask(port)
            replied = time.perf_counter() - started
            children = [[p.pid, p.create_time()] for p in psutil.Process(proc.pid).children(recursive=True)]
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    self.strays.append(f"serve pid {proc.pid} ignored SIGTERM for 30 s (killed)")
        self.reap(children, "serve")
        return {SERVE_ROW: (ready, ""), SERVE_REPLY: (replied, answer)}

    def prepare_tui(self) -> None:
        """A throwaway home for the TUI: the demo model, and smollm2 twice (hard links of the home's files)."""
        from hyprstream_tui.settings import Paths

        self.tui_home = Path(tempfile.mkdtemp(prefix="hyprstream-coldstart-tui-"))
        source = Paths.from_env(self.home).models / MODEL
        for name in (MODEL, COPY):
            run(hyprstream() + ["--home", str(self.tui_home), "model", "import", str(source), "--name", name, "--link"])
        run([sys.executable, "-c", "import sys; from hyprstream_tui.tui.backend import Backend; "
             "Backend(home=sys.argv[1]).build_demo()", str(self.tui_home)])

    def tui(self, when: str) -> dict[str, tuple[float, str]]:
        """One app process (`warm`: switches to smollm2, then smollm2-copy; `at-once`: to smollm2)."""
        assert self.tui_home is not None
        names = TUI_SWITCHES[when]
        _, out = run([sys.executable, str(TUI_DRIVER), str(self.tui_home), QUESTION, str(MAX_TOKENS), when,
                      *[MODEL, COPY][:len(names)]])
        result = json.loads(out.splitlines()[-1])
        self.reap(result["pids"], "the TUI")
        rows = {TUI_READY: (result["ready"], "")} if result["ready"] is not None else {}
        for name, (first, end, reply) in zip(names, result["switches"]):
            rows.update({f"{name}: 1st token": (first, reply), f"{name}: reply end": (end, reply)})
        return rows

    def reap(self, pids: list[list[float]], what: str, wait: float = 10.0) -> None:
        """Wait up to `wait` s for the processes `what` started ([pid, create time]) to end; kill and
        record any left."""
        alive = []
        for pid, created in pids:
            try:
                proc = psutil.Process(int(pid))
                if abs(proc.create_time() - created) < 0.01:  # not another process under a reused pid
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(alive, timeout=wait)
        for proc in left:
            self.strays.append(f"{what}: pid {proc.pid} ({' '.join(proc.cmdline())[:80]}) still ran {wait:.0f} s "
                               "after it ended (killed)")
            proc.kill()

    def all(self, groups: set[str]) -> list:
        cases: list = [lambda d=d: self.cold(d) for d in OURS] if "cold" in groups else []
        if self.keep_alive and "warm" in groups:
            cases += [lambda d=d: self.warm(d) for d in OURS]
        if self.llama is not None:
            kinds = list(LLAMA) if groups & {"llama", "cold", "warm"} else ["F16"] if groups & {"serve", "tui"} else []
            cases += [lambda k=k: self.llama_cpp(k) for k in kinds]
        cases += [self.serve] if "serve" in groups else []
        cases += [lambda w=w: self.tui(w) for w in TUI_SWITCHES] if "tui" in groups else []
        return cases + ([self.floors] if "floors" in groups else [])


def ask(port: int) -> str:
    """The question to the server on `port`, greedy: its answer."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())["choices"][0]["message"]["content"]
    finally:
        conn.close()


def health_ok(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def measure(cases: list, rounds: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Every case once (bytecode caches and page cache warm), then `rounds` interleaved rounds."""
    answers: dict[str, str] = {}
    for case in cases:
        answers.update({name: out.strip() for name, (_, out) in case().items()})
    times: dict[str, list[float]] = {}
    for r in range(rounds):
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            for name, (took, out) in case().items():
                times.setdefault(name, []).append(took)
                if out.strip() != answers[name]:
                    answers[name] += f"  | round {r + 1}: {out.strip()!r}"
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return times, answers


def ratios(times: dict[str, list[float]], keep_alive: bool) -> list[tuple[str, float, float, float]]:
    """(label, median over rounds of ours/llama.cpp in the same round, target, ratio of medians)."""
    rows = []
    for dtype, kind in PAIRS.items():
        ref = times.get(f"llama.cpp {kind} cold")
        if ref is None:
            continue
        for how, target in (("cold", 2.0), ("warm", 0.4)):
            ours = times.get(f"ours {dtype} {how}")
            if ours is None:
                continue
            per_round = statistics.median(a / b for a, b in zip(ours, ref))
            rows.append((f"ours {dtype} {how} / llama.cpp {kind} cold", per_round, target,
                         statistics.median(ours) / statistics.median(ref)))
    ref = times.get("llama.cpp F16 cold")
    for name, target in VS_COLD_TARGET.items():
        if ref is not None and name in times:
            rows.append((f"{name.removeprefix('ours ').removeprefix('hyprstream ')} / (2x llama.cpp F16 cold)",
                         statistics.median(a / (2 * b) for a, b in zip(times[name], ref)), target,
                         statistics.median(times[name]) / (2 * statistics.median(ref))))
    return rows


def versions(llama: bool, llama_python: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}; {os.cpu_count()} CPUs; Python {platform.python_version()}; torch {torch.__version__}"
    if llama:
        _, version = run([llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"])
        text += f"; llama-cpp-python {version.strip()}"
    return text


def report(args: argparse.Namespace, times: dict[str, list[float]], answers: dict[str, str],
           keep_alive: bool, header: str, strays: list[str]) -> bool:
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF; ours imported as fp32), {QUESTION!r}, {MAX_TOKENS} tokens "
          f"greedy; {args.threads} threads; {args.rounds} rounds, cases interleaved; whole processes")
    print(header + "\n")
    print(f"{'case':<36}{'median s':>9}{'min s':>8}{'max s':>8}  answer")
    print("-" * 100)
    all_paris = True
    for name, values in times.items():
        answer = answers.get(name, "")
        shown = ""
        if name.startswith(("ours", "llama")):
            ok = "Paris" in answer
            all_paris &= ok
            shown = f"{answer[:48]!r}" + ("" if ok else "  NO 'Paris'")
        print(f"{name:<36}{statistics.median(values):>9.3f}{min(values):>8.3f}{max(values):>8.3f}  {shown}")
    rows = ratios(times, keep_alive)
    if rows:
        print("\nours / llama.cpp: median over rounds of the ratio within a round (ratio of medians)")
        for label, r, target, of_medians in rows:
            verdict = "met" if r <= target else "NOT met"
            print(f"  {label:<62}{r:>6.2f}x  ({of_medians:.2f}x)   target <= {target}x: {verdict}")
    print(f"\nevery answer contains 'Paris': {'yes' if all_paris else 'NO'}")
    if any(name in times for name in (SERVE_ROW, TUI_READY)):
        print("processes left behind by serve and the TUI: " + ("; ".join(strays) if strays else "none"))
    return all_paris and not strays


def slowest_imports(stderr: str, n: int) -> list[tuple[int, int, str, str]]:
    """(cumulative us, self us, module, its importer) of the n slowest imports in -X importtime's
    output, which lists a module after those it imported, one indent deeper."""
    rows: list[tuple[int, int, int, str]] = []  # (cumulative, self, depth, name), in the order printed
    for line in stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[0].strip().isdigit():
            name = parts[2].rstrip()
            rows.append((int(parts[1]), int(parts[0]), len(name) - len(name.lstrip()), name.strip()))
    found = []
    for i, (cumulative, own, depth, name) in enumerate(rows):
        parent = next((r[3] for r in rows[i + 1:] if r[2] < depth), "-")
        found.append((cumulative, own, name, parent))
    return sorted(found, reverse=True)[:n]


def profile(cases: Cases) -> None:
    """One cold `infer` under -X importtime (25 slowest imports), one under cProfile (top 30)."""
    import io
    import pstats

    args = cases.infer(OURS["fp32"])[len(hyprstream()):]
    env = child_env(HYPRSTREAM_KEEP_ALIVE="0")
    cases.stop_engine()
    proc = subprocess.run([sys.executable, "-X", "importtime", *entry(), *args], capture_output=True,
                          text=True, env=env)
    rows = slowest_imports(proc.stderr, 25)
    print("\n-X importtime, one cold `infer` fp32: the 25 slowest imports by cumulative time")
    print(f"{'cumulative ms':>14}{'self ms':>9}  module  (imported by)")
    for cumulative, own, name, parent in rows:
        print(f"{cumulative / 1000:>14.1f}{own / 1000:>9.1f}  {name}  ({parent})")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "infer.prof"
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), *entry(), *args], capture_output=True,
                       env=env, check=True)
        text = io.StringIO()
        pstats.Stats(str(out), stream=text).sort_stats("cumulative").print_stats(30)
    print("\ncProfile, one cold `infer` fp32 (main thread only: the decode runs in the engine's worker "
          "thread), top 30 by cumulative time")
    print(text.getvalue().strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="ours --threads, llama.cpp n_threads")
    ap.add_argument("--home", type=Path, default=None, help="a home with smollm2 (else a temp home, imported once)")
    ap.add_argument("--llama-python", default=str(LLAMA_PYTHON), help="a python where `import llama_cpp` works")
    ap.add_argument("--only", default=",".join(GROUPS), type=lambda text: set(text.split(",")),
                    help=f"case groups to run, comma-separated: {','.join(GROUPS)} (default: all)")
    ap.add_argument("--profile", action="store_true", help="then profile one cold infer (imports, cProfile)")
    ap.add_argument("--json", action="store_true", help="also print the times as one JSON line")
    args = ap.parse_args()
    if args.only - set(GROUPS):
        ap.error(f"--only: no case group {', '.join(sorted(args.only - set(GROUPS)))}; they are {', '.join(GROUPS)}")
    from tests.realmodel import gguf_path

    gguf = gguf_path()
    home = args.home or Path(tempfile.mkdtemp(prefix="hyprstream-coldstart-"))
    llama = None
    if Path(args.llama_python).is_file():
        llama = llama_files(args.llama_python, gguf, LLAMA)
    else:
        print(f"llama.cpp: no {args.llama_python}; build it with\n  {BUILD_HINT}\nor pass --llama-python. "
              "Measuring ours only.")
    keep_alive, engine_stop = has_keep_alive()
    if not keep_alive:
        print("warm: `hyprstream infer` has no --no-keep-alive yet (no keep-alive engine): warm case skipped.")
    elif not engine_stop:
        print("note: no `hyprstream engine stop`: an engine from an earlier case may still be running.")
    cases = Cases(args, home, llama, keep_alive, engine_stop)
    try:
        imported = prepare_home(home, gguf)
        header = versions(llama is not None, args.llama_python)
        if imported is not None:
            header += f"\n`hyprstream model import` of the GGUF into a fresh home: {imported:.1f} s (once)"
        if "tui" in args.only:
            cases.prepare_tui()
        times, answers = measure(cases.all(args.only), args.rounds)
        ok = report(args, times, answers, keep_alive, header, cases.strays)
        if args.json:
            print(json.dumps({"times": times, "answers": answers}))
        if args.profile:
            profile(cases)
    finally:
        cases.stop_engine()
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
        if cases.tui_home is not None:
            shutil.rmtree(cases.tui_home, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
