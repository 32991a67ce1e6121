"""A zygote for the disk-full tests: it imports torch, transformers, peft and the CLI once, then
forks a real `hyprstream ...` command per request under a file-size limit, so a training or merge
command costs its own work instead of a 10 s import (as tests/train/train_worker.py does for kills).

The child sets HYPRSTREAM_HOME, ignores SIGXFSZ (a write past the limit then fails with EFBIG),
lowers RLIMIT_FSIZE and runs `hyprstream_tui.cli.main(ARGS)`; its stdout and stderr are pipes (a
pipe is not subject to the limit), read back by the zygote. The zygote never runs a torch operation.

Protocol, one JSON line each way: {"args": [...], "home": H, "limit": N|null}
  -> {"code": C, "stdout": S, "stderr": E}.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from tests.zygote import run_cli_and_exit, warm_up  # noqa: E402  (after the environment)


def child(request: dict, out_w: int, err_w: int) -> None:
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.environ["HYPRSTREAM_HOME"] = request["home"]
    if request.get("limit") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["limit"], request["limit"]))
    run_cli_and_exit(request["args"])


def run(request: dict) -> dict:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        child(request, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while block := os.read(fd, 65536):
            chunks[fd].append(block)
        os.close(fd)

    readers = [threading.Thread(target=drain, args=(fd,)) for fd in (out_r, err_r)]
    for t in readers:
        t.start()
    _, status = os.waitpid(pid, 0)
    for t in readers:
        t.join()
    text = {fd: b"".join(parts).decode(errors="replace") for fd, parts in chunks.items()}
    return {"code": os.waitstatus_to_exitcode(status), "stdout": text[out_r], "stderr": text[err_r]}


def main() -> None:
    warm_up()
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
