"""A zygote for the reliability kill tests: it imports the `hyprstream` CLI with everything its
commands load (pygit2, huggingface_hub, torch, transformers, peft) once, then forks one real
`hyprstream ARGS` per request. A kill point then costs a fork, not a 5-10 s import, and the random
kill moments land in the command's own work (store writes, commits, downloads, training steps)
rather than in Python's start-up.

Each child is an ordinary process running `hyprstream_tui.cli.main(ARGS)` with its stdout and
stderr in a log file and the given environment; it takes the same locks and writes the same files
as the console script, and dies by SIGKILL like any other. The zygote itself never runs a torch
operation, so no thread pool exists yet when it forks.

Protocol, one line each way (JSON):  {"start": [LOG, {ENV}, ARG...]} -> {"pid": N};
{"wait": N} -> {"exit": CODE}.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import huggingface_hub  # noqa: F401  (preloaded for the children)
import peft  # noqa: F401
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
from safetensors import safe_open  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

from hyprstream_tui import _sigint, cli
from hyprstream_tui.engine.train import export, job, loop  # noqa: F401
from hyprstream_tui.store import hub, store  # noqa: F401


def child(log: str, env: dict[str, str], args: list[str]) -> None:
    os.setpgid(0, 0)  # its own process group: a kill of the group reaches helpers it may start
    os.environ.update(env)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # never the zygote's request pipe
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 70
    _sigint.during_start_up()  # as `python -m hyprstream_tui` does before it calls main
    try:
        code = cli.main(args)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    try:  # transformers' checkpoint-conversion regexes, built once for every child
        from transformers.conversion_mapping import _build_checkpoint_conversion_mapping

        _build_checkpoint_conversion_mapping()
    except Exception:  # noqa: BLE001 - an optimisation only
        pass
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "start" in request:
            log, env, *args = request["start"]
            pid = os.fork()
            if pid == 0:
                child(log, env, args)
            print(json.dumps({"pid": pid}), flush=True)
        elif "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
