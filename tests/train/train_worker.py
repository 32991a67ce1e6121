"""A zygote for the kill tests: it imports torch, transformers, peft and the CLI once, then forks a
real `hyprstream ...` command per request, so a kill point costs a fork instead of a 10 s import.

The children are ordinary processes running `hyprstream_tui.cli.main(ARGS)`: they take the train
lock, write the worktree and commit, and die by SIGKILL like any other. The zygote itself never
runs a torch operation (no thread pool exists to be broken by fork).

Protocol, one line each way:  `start LOG ARG...` -> `pid N`;  `wait N` -> `exit CODE`.
"""

from __future__ import annotations

import os
import shlex
import sys

from tests.zygote import run_cli_and_exit, warm_up


def child(log: str, args: list[str]) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    run_cli_and_exit(args)


def main() -> None:
    warm_up()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *rest = shlex.split(line)
        if cmd == "start":
            pid = os.fork()
            if pid == 0:
                child(rest[0], rest[1:])
            print(f"pid {pid}", flush=True)
        elif cmd == "wait":
            _, status = os.waitpid(int(rest[0]), 0)
            print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
