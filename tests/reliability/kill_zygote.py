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

from hyprstream_tui import interrupt
from tests.zygote import run_cli_and_exit, warm_up


def child(log: str, env: dict[str, str], args: list[str]) -> None:
    os.setpgid(0, 0)  # its own process group: a kill of the group reaches helpers it may start
    os.environ.update(env)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # never the zygote's request pipe
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    interrupt.during_start_up()  # as `python -m hyprstream_tui` does before it calls main
    run_cli_and_exit(args)


def main() -> None:
    warm_up()
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
