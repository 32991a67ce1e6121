"""The fuzz cases that need torch and transformers, in a process of their own: its address space is
capped (RLIMIT_AS: what it uses after loading the tiny model plus 2 GiB), every case has a 20 s
alarm, and the test that starts it has an overall timeout. A crash, a hang or a blow-up of this
process is a failure of the test, not of the test run.

    python fuzz_worker.py TINY_SRC WORK_DIR EXAMPLES DERANDOMIZE(0/1) SEED

Prints one JSON line: {"cases": {target: n}, "failures": [...], "maxrss_mb": M}. Targets:
- config:    config.json mutations -> loader.load_model
- tokenizer: tokenizer.json / tokenizer_config.json mutations -> load_tokenizer, chat.render
- adapter:   adapter_config.json mutations -> LoadedModel.use_adapter (engine) and loop.lora_config (training)
- template:  hostile and random chat templates -> chat.render, train.data.encode (2 s budget each)
- pickle:    .bin/.pt payloads that would create a marker file -> load_model, use_adapter (with and
             without allow_pickle); the marker must never appear
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hyprstream_tui.errors import HyprError  # noqa: E402

SRC, WORK = Path(sys.argv[1]), Path(sys.argv[2])
EXAMPLES, DERANDOMIZE, SEED = int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
MARKER = WORK / "PICKLE_RAN"
CASES: dict[str, int] = {}
FAILURES: list[str] = []
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                          max_leaves=12)
raw_file = st.one_of(st.binary(max_size=200), st.just(b"[" * 50_000), st.just(b'{"a":' * 30_000),
                     json_value.map(lambda v: json.dumps(v).encode()))


def settings_for(n: int):
    """Hypothesis settings of a target; a random run is reproducible from SEED."""
    chosen = settings(max_examples=n, derandomize=DERANDOMIZE, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate],  # no shrinking: report the first failure
                    suppress_health_check=list(HealthCheck), print_blob=False)
    return (lambda fn: chosen(fn)) if DERANDOMIZE else (lambda fn: seed(SEED)(chosen(fn)))


class Alarm(Exception):
    pass


def _alarm(signum, frame):
    raise Alarm("a fuzz case ran longer than 20 s")


def checked(target: str, fn, *args):
    """Run one case: a HyprError (one line) or a result is fine; anything else is a failure."""
    CASES[target] = CASES.get(target, 0) + 1
    signal.alarm(20)
    try:
        return fn(*args)
    except HyprError as exc:
        assert "\n" not in exc.message, exc.message
        return exc
    finally:
        signal.alarm(0)


def run_target(name: str, test) -> None:
    try:
        test()
    except BaseException as exc:  # noqa: BLE001
        FAILURES.append(f"{name}: {type(exc).__name__}: {str(exc)[:400]}\n{traceback.format_exc()[-1500:]}")


def model_copy(name: str) -> Path:
    dest = WORK / name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in SRC.iterdir():
        (os.link if f.suffix == ".safetensors" else shutil.copyfile)(f, dest / f.name)
    return dest


def with_mutations(doc, mutations):
    doc = json.loads(json.dumps(doc))
    for key, value in mutations:
        if key is None:
            return value  # the whole document replaced
        doc[key] = value
    return doc


def write(path: Path, value) -> None:
    path.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())


# ---- targets ------------------------------------------------------------------------------------
def fuzz_config() -> None:
    from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model
    from hyprstream_tui.store.inspect import read_config

    base = json.loads((SRC / "config.json").read_text())
    keys = sorted(base) + ["rope_scaling", "auto_map", "quantization_config", "torch_dtype", "sliding_window"]
    folder = model_copy("config")

    @settings_for(EXAMPLES)
    @given(st.lists(st.tuples(st.sampled_from(keys), json_value), min_size=1, max_size=3) | raw_file)
    def case(change):
        write(folder / "config.json", with_mutations(base, change) if isinstance(change, list) else change)
        checked("config", read_config, folder / "config.json")
        checked("config", load_model, ModelSource(name="fuzz", path=folder), LoadOptions(dtype="float32", device="cpu"))

    case()


def fuzz_tokenizer() -> None:
    from hyprstream_tui.engine.chat import render
    from hyprstream_tui.engine.loader import load_tokenizer

    tok_json = json.loads((SRC / "tokenizer.json").read_text())
    tok_cfg = json.loads((SRC / "tokenizer_config.json").read_text())
    folder = model_copy("tokenizer")

    @settings_for(EXAMPLES * 2)
    @given(st.sampled_from(["tokenizer.json", "tokenizer_config.json"]),
           st.lists(st.tuples(st.sampled_from(sorted(set(tok_json) | set(tok_cfg)) + [None]), json_value),
                    min_size=1, max_size=2) | raw_file | st.integers(0, 60_000))
    def case(which, change):
        original = tok_json if which == "tokenizer.json" else tok_cfg
        for name, doc in (("tokenizer.json", tok_json), ("tokenizer_config.json", tok_cfg)):
            write(folder / name, doc)
        if isinstance(change, int):  # truncated
            data = json.dumps(original).encode()
            write(folder / which, data[: change % max(1, len(data))])
        else:
            write(folder / which, with_mutations(original, change) if isinstance(change, list) else change)
        tok = checked("tokenizer", load_tokenizer, folder)
        if not isinstance(tok, HyprError):
            checked("tokenizer", render, tok, MESSAGES)

    # Found before: each of these was a traceback (at load, or at the first encode).
    for which, change in [("tokenizer_config.json", [("model_max_length", [])]), ("tokenizer_config.json", [("eos_token", 5)]),
                          ("tokenizer_config.json", [(None, [1])]), ("tokenizer.json", [(None, [])]),
                          ("tokenizer.json", b"[" * 50_000)]:
        case.hypothesis.inner_test(which, change)
    case()


def fuzz_adapter(lm) -> None:
    import uuid

    from peft import LoraConfig, get_peft_model

    from hyprstream_tui.engine.loader import AdapterSource, load_model  # noqa: F401
    from hyprstream_tui.engine.train.loop import load_base_model, lora_config

    good = WORK / "adapter-good"
    if not good.exists():
        base = load_base_model(SRC, dtype="float32")
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(good))
    config = json.loads((good / "adapter_config.json").read_text())
    keys = sorted(config) + ["rank_pattern", "layers_to_transform", "modules_to_save"]
    folder = WORK / "adapter"
    shutil.copytree(good, folder, dirs_exist_ok=True)

    @settings_for(EXAMPLES)
    @given(st.lists(st.tuples(st.sampled_from(keys), json_value), min_size=1, max_size=3) | raw_file)
    def case(change):
        write(folder / "adapter_config.json", with_mutations(config, change) if isinstance(change, list) else change)
        source = AdapterSource(name="fuzz", path=folder, commit=uuid.uuid4().hex)
        with lm.lock:
            checked("adapter", lm.use_adapter, source)
            lm.use_adapter(None)
        checked("adapter", lambda: lora_config(folder, trainable=True))

    case()


HOSTILE_TEMPLATES = {
    "raises": "{{ raise_exception('refused') }}",
    "undefined": "{{ nothing.here }}",
    "syntax": "{% for %}",
    "unclosed": "{% if messages %}{{ messages[0].content }}",
    "escape-mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "escape-globals": "{{ cycler.__init__.__globals__.os.system('touch " + str(MARKER) + "') }}",
    "escape-lipsum": "{{ lipsum.__globals__['os'].popen('touch " + str(MARKER) + "').read() }}",
    "escape-namespace": "{{ namespace.__init__.__globals__ }}",
    "escape-format": "{{ '{0.__class__}'.format(messages) }}",
    "escape-attr": "{{ messages|attr('__class__') }}",
    "escape-context": "{{ self._TemplateReference__context }}",
    "range-huge": "{% for i in range(10**9) %}x{% endfor %}",
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "nested-silent": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "doubling-list": "{% set ns = namespace(a=[1]) %}{% for i in range(100000) %}{% set ns.a = ns.a + ns.a %}{% endfor %}",
    "doubling-string": "{% set ns = namespace(s='x') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "macro-recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "big-repeat": "{{ 'xxxxxxxxxx' * 100000 * 100000 }}",
    "empty": " ",
}
TEMPLATE_TOKENS = ["{{", "}}", "{%", "%}", "for m in messages", "endfor", "if", "endif", "m.content", "m['role']",
                   "raise_exception('x')", "range(", ")", "~", "*", "10**9", "loop.index", "set x =", "x", "|join",
                   "|tojson", "'", '"', "messages", "add_generation_prompt", "eos_token", "namespace(", "\n", " "]


def fuzz_templates(tok, trainer_tok) -> None:
    """`tok`: the engine's tokenizer (engine.native's); `trainer_tok`: transformers' (training)."""
    from hyprstream_tui.engine import chat
    from hyprstream_tui.engine.chat import render
    from hyprstream_tui.engine.train.data import encode

    chat.TEMPLATE_SECONDS = 0.5  # the mechanism, not the product's 2 s, is under test

    row = {"input": "hi", "output": "hello"}

    def one(template: str) -> None:
        tok.chat_template = trainer_tok.chat_template = template
        started = time.monotonic()
        checked("template", render, tok, MESSAGES)
        checked("template", render, trainer_tok, MESSAGES)
        checked("template", encode, trainer_tok, row, 64)
        assert time.monotonic() - started < 10, f"template {template[:60]!r} took {time.monotonic() - started:.1f} s"
        assert not MARKER.exists(), f"template {template[:60]!r} escaped the sandbox"

    original, trainer_original = tok.chat_template, trainer_tok.chat_template
    try:
        for name, template in HOSTILE_TEMPLATES.items():
            try:
                one(template)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None

        @settings_for(EXAMPLES * 2)
        @given(st.lists(st.sampled_from(TEMPLATE_TOKENS), max_size=25).map("".join))
        def case(template):
            one(template)

        case()
    finally:
        tok.chat_template, trainer_tok.chat_template = original, trainer_original


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def fuzz_pickle(lm) -> None:
    import pickle
    import zipfile

    from hyprstream_tui.engine.loader import AdapterSource, LoadOptions, ModelSource, load_model

    raw = pickle.dumps({"model.embed_tokens.weight": Payload()})
    payloads = {"raw pickle": raw}
    zipped = WORK / "zipped.pt"  # torch.save's zip layout, with the payload as data.pkl
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", raw)
        zf.writestr("archive/version", "3\n")
    payloads["torch zip"] = zipped.read_bytes()
    for label, data in payloads.items():
        for filename in ("pytorch_model.bin", "model.pt"):
            folder = model_copy("pickled")
            (folder / "model.safetensors").unlink()
            (folder / filename).write_bytes(data)
            for allow in (False, True):
                result = checked("pickle", load_model, ModelSource(name="pickled", path=folder),
                                 LoadOptions(dtype="float32", device="cpu", allow_pickle=allow))
                assert isinstance(result, HyprError), f"{label} {filename} allow={allow} loaded"
                assert not MARKER.exists(), f"{label} {filename} allow_pickle={allow}: the pickle ran"
            adapter = WORK / "pickled-adapter"
            shutil.rmtree(adapter, ignore_errors=True)
            shutil.copytree(WORK / "adapter-good", adapter)
            (adapter / "adapter_model.safetensors").unlink()
            (adapter / filename.replace("pytorch_model", "adapter_model")).write_bytes(data)
            with lm.lock:
                result = checked("pickle", lm.use_adapter, AdapterSource(name="pickled", path=adapter, commit=label))
                lm.use_adapter(None)
            assert isinstance(result, HyprError) and not MARKER.exists(), f"{label} adapter {filename}"


def main() -> None:
    import random

    import torch

    from hyprstream_tui.engine.loader import LoadOptions, ModelSource, load_model

    torch.set_num_threads(1)
    random.seed(SEED)
    signal.signal(signal.SIGALRM, _alarm)
    WORK.mkdir(parents=True, exist_ok=True)
    lm = load_model(ModelSource(name="tiny", path=SRC), LoadOptions(dtype="float32", device="cpu"))
    with open("/proc/self/statm") as fh:
        vsz = int(fh.read().split()[0]) * 4096
    resource.setrlimit(resource.RLIMIT_AS, (vsz + (2 << 30), resource.RLIM_INFINITY))
    run_target("config", fuzz_config)
    run_target("tokenizer", fuzz_tokenizer)
    run_target("adapter", lambda: fuzz_adapter(lm))
    from hyprstream_tui.engine.loader import load_tokenizer

    run_target("template", lambda: fuzz_templates(lm.tokenizer, load_tokenizer(SRC)))
    run_target("pickle", lambda: fuzz_pickle(lm))
    if MARKER.exists():
        FAILURES.append("a pickle payload or template ran code: the marker file exists")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"cases": CASES, "failures": FAILURES, "maxrss_mb": maxrss}), flush=True)


if __name__ == "__main__":
    main()
