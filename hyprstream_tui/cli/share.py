"""`hyprstream model push | clone` and `lora push | pull`: models and adapters to and from a git
remote (refs through git, large files through git-lfs: store/remote.py) or, with `--hub ORG/REPO`,
the Hugging Face Hub (engine/hubshare.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from hyprstream_tui.cli.common import find_adapter, split_adapter_spec, store_from

if TYPE_CHECKING:
    from hyprstream_tui.store.remote import Pushed


def add_share_commands(model_sub: argparse._SubParsersAction, lora_sub: argparse._SubParsersAction) -> None:
    p = model_sub.add_parser("push", help="push a model (branches, tags, LFS objects) to a git remote or the Hub")
    p.add_argument("name", help="the model")
    _remote_args(p, "push")
    p.set_defaults(func=cmd_model_push)

    p = model_sub.add_parser("clone", help="clone a model repository (adapters and history included) from a git remote")
    p.add_argument("url", help="git URL or path of the remote repository")
    p.add_argument("--name", help="name of the model here (default: the repository's)")
    p.set_defaults(func=cmd_model_clone)

    p = lora_sub.add_parser("push", help="push one adapter (branch, tags, LFS objects) to a git remote or the Hub")
    p.add_argument("name", help="ADAPTER or MODEL:ADAPTER")
    p.add_argument("--model", help="the base model, when the adapter name is not unique")
    p.add_argument("--commit", help="with --hub: the checkpoint to upload: commit, tag or step:N (default: the tip)")
    _remote_args(p, "push")
    p.set_defaults(func=cmd_lora_push)

    p = lora_sub.add_parser("pull", help="pull one adapter from a git remote holding the same model, or from the Hub")
    p.add_argument("name", help="ADAPTER or MODEL:ADAPTER (from the Hub: the name it gets here)")
    p.add_argument("--model", help="the base model here")
    _remote_args(p, "pull")
    p.set_defaults(func=cmd_lora_pull)


def _remote_args(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("remote", nargs="?", help="git URL, path, or remote name (or give --hub)")
    p.add_argument("--hub", metavar="ORG/REPO", help="a Hugging Face Hub repository instead of a git remote")
    p.add_argument("--token", help="Hub token (default: $HF_TOKEN or your `hf auth login`)")
    p.add_argument("--revision", default=None,
                   help="with --hub: the Hub branch to " + ("pull from, or a tag or commit" if verb == "pull" else "push to")
                   + " (default: main)")
    if verb == "pull":
        p.add_argument("--force", action="store_true", help="replace a local branch or tag that the pull would rewrite")
    else:
        p.add_argument("--force", action="store_true", help="overwrite the remote's history where it differs")


def _one_remote(args: argparse.Namespace) -> None:
    from hyprstream_tui.errors import InvalidInput

    if (args.remote is None) == (args.hub is None):
        raise InvalidInput("Give either a git REMOTE or --hub ORG/REPO (exactly one).")
    if args.token is not None and args.hub is None:
        raise InvalidInput("--token is for --hub: a git remote uses your git credentials.")
    if args.revision is not None and args.hub is None:
        raise InvalidInput("--revision is for --hub: a git remote gets the branch itself.")
    if args.force and args.hub is not None:
        raise InvalidInput("--force is for git remotes: a Hub push adds a commit and never rewrites history.")


def _progress(description: str) -> Any:
    from hyprstream_tui.cli.progress import ByteProgress

    return ByteProgress(description)


def _pushed(what: str, result: Pushed) -> None:
    from hyprstream_tui import units

    if not result.refs:
        print(f"{what[0].upper()}{what[1:]} is up to date on {result.remote}.")
        return
    refs = ", ".join(result.refs[:4]) + (f" and {len(result.refs) - 4} more" if len(result.refs) > 4 else "")
    print(f"Pushed {what} to {result.remote}: {refs}; {result.objects} large files ({units.size(result.bytes)}) checked or sent.")


def cmd_model_push(args: argparse.Namespace) -> int:
    _one_remote(args)
    store = store_from(args)
    if args.hub is not None:
        from hyprstream_tui.engine.hubshare import push_model_to_hub

        with _progress(f"push {args.name}") as bar:
            hub = push_model_to_hub(store, args.name, args.hub, token=args.token, revision=args.revision or "main",
                                    progress=bar)
        print(f"Pushed model {args.name} to {hub.repo_id}: commit {hub.commit[:7]} ({hub.commit_url}).")
        return 0
    with _progress(f"push {args.name}") as bar:
        result = store.push_model(args.name, args.remote, force=args.force, progress=bar)
    _pushed(f"model {args.name}", result)
    return 0


def cmd_model_clone(args: argparse.Namespace) -> int:
    from hyprstream_tui import units

    store = store_from(args)
    with _progress("clone") as bar:
        summary = store.clone_model(args.url, name=args.name, progress=bar)
    print(f"Cloned {summary.name}: {summary.architecture}, {units.count(summary.parameters)} params, "
          f"{summary.adapters} adapters, commit {summary.head[:7]}.")
    return 0


def cmd_lora_push(args: argparse.Namespace) -> int:
    _one_remote(args)
    store = store_from(args)
    adapter = find_adapter(store, args.name, args.model)
    if args.commit is not None and args.hub is None:
        from hyprstream_tui.errors import InvalidInput

        raise InvalidInput("--commit is for --hub: a git remote gets the whole branch; roll back first to share an "
                           "older checkpoint.")
    if args.hub is not None:
        from hyprstream_tui.engine.hubshare import push_adapter_to_hub

        with _progress(f"push {adapter.name}") as bar:
            hub = push_adapter_to_hub(store, adapter.model, adapter.uuid, args.hub, token=args.token, rev=args.commit,
                                      progress=bar)
        print(f"Pushed adapter {adapter.name} to {hub.repo_id}: commit {hub.commit[:7]} ({hub.commit_url}).")
        return 0
    with _progress(f"push {adapter.name}") as bar:
        result = store.push_adapter(adapter.model, adapter.uuid, args.remote, force=args.force, progress=bar)
    _pushed(f"adapter {adapter.name}", result)
    return 0


def cmd_lora_pull(args: argparse.Namespace) -> int:
    from hyprstream_tui.errors import InvalidInput

    _one_remote(args)
    spec_model, name = split_adapter_spec(args.name)
    model = spec_model if spec_model is not None else args.model
    if not model:
        raise InvalidInput("Name the base model here: write the adapter as MODEL:ADAPTER, or give --model MODEL.")
    store = store_from(args)
    store.model_dir(model)  # an unknown model is refused before any transfer
    if args.hub is not None:
        from hyprstream_tui.engine.hubshare import pull_adapter_from_hub

        with _progress(f"pull {name}") as bar:
            info = pull_adapter_from_hub(store, model, args.hub, name=name, revision=args.revision or "main",
                                         token=args.token, progress=bar)
        print(f"Pulled adapter {info.name} on {info.model} from {args.hub}: branch {info.branch}, commit {info.tip[:7]}.")
        return 0
    with _progress(f"pull {name}") as bar:
        info = store.pull_adapter(model, name, args.remote, force=args.force, progress=bar)
    print(f"Pulled adapter {info.name} on {info.model}: branch {info.branch}, commit {info.tip[:7]}.")
    return 0
