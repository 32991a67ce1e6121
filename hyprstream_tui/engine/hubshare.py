"""Sharing through the Hugging Face Hub: push a model or an adapter, pull an adapter back.

- `push_model_to_hub`: the files of the model's main commit (config, tokenizer, the real weight
  bytes, not LFS pointers) plus a model card, as one hub commit. `hyprstream model pull` brings it back.
- `push_adapter_to_hub`: a PEFT repository (`adapter_config.json`, `adapter_model.safetensors`, the
  folder `lora export --format peft` writes) with a card whose metadata follows the hub's
  conventions (`base_model`, `library_name: peft`) and whose text gives the commits, step and loss.
- `pull_adapter_from_hub`: a PEFT repository downloaded through `store.hub.fetch` (verified,
  resumable), checked against the local model's weight shapes, committed on a new adapter branch.

Everything goes through huggingface_hub (`create_repo`, `create_commit`), imported when a push
starts. The token is `token`, else what huggingface_hub finds (HF_TOKEN, then `hf auth login`); it
is sent in request headers only: never logged, never in a message, a commit or a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyprstream_tui import names
from hyprstream_tui.errors import Conflict, HubError, HyprError, InvalidInput, NotFound, StorageError, is_disk_full
from hyprstream_tui.store.atomic import write_bytes
from hyprstream_tui.store.types import AdapterInfo, CommitInfo, Progress

if TYPE_CHECKING:
    from hyprstream_tui.store import Store

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
CARD = "README.md"
LIBRARY = "hyprstream-tui"
ProgressFn = Callable[[Any], None]  # gets store.types.Progress (pushes) or store.hub.DownloadProgress (pulls)


@dataclass(frozen=True)
class HubPushed:
    repo_id: str
    commit: str  # the hub's commit id
    commit_url: str
    files: tuple[str, ...] = ()  # the files of the push, README.md included
    size: int = 0  # their bytes


# -- pushing -----------------------------------------------------------------------------------
def push_model_to_hub(store: Store, model: str, repo_id: str, *, token: str | None = None, revision: str = "main",
                      progress: ProgressFn | None = None) -> HubPushed:
    """The model's main commit as one commit on `revision` of `repo_id` (created if missing)."""
    names.repo_id(repo_id)
    names.revision(revision)
    token = _write_token(token)
    summary = store.summary(model)
    folder = store.snapshot(model, summary.head)
    files = [(p.relative_to(folder).as_posix(), p) for p in sorted(folder.rglob("*")) if p.is_file()]
    files = [(rel, p) for rel, p in files if not any(part.startswith(".") for part in rel.split("/")) and rel != CARD]
    readme = folder / CARD
    card = _model_card(model, summary.head, summary.source, readme.read_text(errors="replace") if readme.is_file() else None)
    trailers = {"hyprstream-model": model, "model-commit": summary.head, "source": summary.source}
    return _push(repo_id, files, card, token=token, revision=revision, progress=progress,
                 message=f"Upload {model} from hyprstream ({summary.head[:7]})", trailers=trailers)


def push_adapter_to_hub(store: Store, model: str, uuid: str, repo_id: str, *, token: str | None = None,
                        rev: str | None = None, progress: ProgressFn | None = None) -> HubPushed:
    """Adapter `uuid` (name or uuid; at `rev`: commit, tag or step:N, None = its tip) as a PEFT repo."""
    from hyprstream_tui.engine.train.export import export_adapter

    names.repo_id(repo_id)
    token = _write_token(token)
    adapter = store.resolve_adapter(model, uuid, rev)
    checkpoint = _checkpoint_of(store.log(model, adapter.uuid), adapter.tip)
    base_id = _hub_id(store.summary(model).source)
    with tempfile.TemporaryDirectory(prefix="hyprstream-push-") as tmp:
        out = Path(tmp) / "peft"
        with _disk_errors("preparing the adapter for the hub"):
            export_adapter(store, model, adapter.uuid, out, fmt="peft", rev=adapter.tip)
            config = json.loads((out / CONFIG).read_text())
            if base_id:  # what PEFT loads the base from: the hub id, not this machine's model name
                config["base_model_name_or_path"] = base_id
                write_bytes(out / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        card = _adapter_card(repo_id, adapter, config, checkpoint, base_id)
        step = checkpoint.step if checkpoint is not None else None
        trailers = {"hyprstream-adapter": adapter.name, "adapter-commit": adapter.tip,
                    "base-model": model, "base-commit": adapter.base_commit or "", "step": step,
                    "loss": checkpoint.metrics.get("loss") if checkpoint is not None else None}
        message = f"Upload adapter {adapter.name}" + (f" at step {step}" if step is not None else "")
        return _push(repo_id, [(CONFIG, out / CONFIG), (WEIGHTS, out / WEIGHTS)], card, token=token,
                     revision="main", progress=progress, message=message, trailers=trailers)


def _push(repo_id: str, files: Sequence[tuple[str, Path]], card: str, *, token: str, revision: str,
          progress: ProgressFn | None, message: str, trailers: dict[str, Any]) -> HubPushed:
    from huggingface_hub import CommitOperationAdd, HfApi

    endpoint = _endpoint()
    report = progress or (lambda _event: None)
    card_bytes = card.encode()
    total = sum(p.stat().st_size for _rel, p in files) + len(card_bytes)
    api = HfApi(endpoint=endpoint, library_name=LIBRARY)
    ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
    ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card_bytes))
    description = "\n".join(f"{k}: {v}" for k, v in trailers.items() if v not in (None, ""))
    with _quiet_hf_bars(progress is not None), _hub_errors(repo_id, endpoint, revision):
        api.create_repo(repo_id, token=token, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        done = 0
        for op, (rel, path) in zip(ops, files):  # one file at a time: progress between files
            size = path.stat().st_size
            report(Progress(rel, done, total))
            api.preupload_lfs_files(repo_id, additions=[op], token=token, revision=revision, free_memory=False)
            done += size
            report(Progress(rel, done, total))
        info = api.create_commit(repo_id, ops, commit_message=message, commit_description=description,
                                 token=token, revision=revision)
        report(Progress(CARD, total, total))
    return HubPushed(repo_id=repo_id, commit=str(info.oid), commit_url=str(info.commit_url),
                     files=tuple(rel for rel, _p in files) + (CARD,), size=total)


def _write_token(token: str | None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()  # HF_TOKEN, then the token `hf auth login` saved
    if not found:
        raise InvalidInput("Pushing to the hub needs a token with write access: pass `token` or set HF_TOKEN, "
                           "or run `hf auth login`.")
    return found


def _endpoint() -> str:
    from hyprstream_tui.store.hub import DEFAULT_ENDPOINT

    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@contextmanager
def _quiet_hf_bars(quiet: bool) -> Iterator[None]:
    """huggingface_hub's own tqdm bars off while our progress bar shows the push."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    if quiet and not was_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_off:
            enable_progress_bars()


# -- model cards -------------------------------------------------------------------------------
def _hub_id(source: str) -> str | None:
    """`hf://ORG/NAME` (a model pulled from the hub) -> `ORG/NAME`; None for a local model."""
    if not source.startswith("hf://"):
        return None
    try:
        names.repo_id(source[len("hf://"):])
    except InvalidInput:
        return None
    return source[len("hf://"):]


def _checkpoint_of(history: list[CommitInfo], tip: str) -> CommitInfo | None:
    """The checkpoint (or rollback) whose weights `tip` holds: `tip` or the nearest commit before it with a step."""
    shas = [c.sha for c in history]
    start = shas.index(tip) if tip in shas else len(history)
    return next((c for c in history[start:] if c.step is not None), None)


def _adapter_card(repo_id: str, adapter: AdapterInfo, config: dict[str, Any], checkpoint: CommitInfo | None, base_id: str | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base_id, library_name="peft", tags=["lora", "peft", "hyprstream"],
                         pipeline_tag="text-generation")
    step = checkpoint.step if checkpoint is not None else None
    loss = checkpoint.metrics.get("loss") if checkpoint is not None else None
    targets = config.get("target_modules")
    rows = [
        ("Base model", f"`{base_id}`" if base_id else f"`{adapter.model}` (a local model)"),
        ("Source model commit", f"`{adapter.base_commit or 'unknown'}`"),
        ("Adapter commit", f"`{adapter.tip}`"),
        ("Step", str(step) if step is not None else "unknown"),
        ("Loss", f"{loss:.6g}" if isinstance(loss, (int, float)) else "unknown"),
        ("Rank / alpha", f"{config.get('r')} / {config.get('lora_alpha')}"),
        ("Target modules", ", ".join(targets) if isinstance(targets, list) else str(targets)),
    ]
    base = base_id or "BASE_MODEL"
    body = "\n".join([
        f"# {adapter.name}", "",
        f"A LoRA adapter trained with hyprstream on `{base_id or adapter.model}`.", "",
        "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Use", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM", "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```", "",
        f"With hyprstream: `hyprstream lora pull MODEL:{adapter.name} --hub {repo_id}`.", "",
    ])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _model_card(model: str, head: str, source: str, existing: str | None) -> str:
    """The model's own README with a hyprstream section appended (and a `hyprstream` tag), or a new card."""
    from huggingface_hub import ModelCard, ModelCardData

    section = f"\n\n## From hyprstream\n\nPushed from hyprstream's model `{model}`, commit `{head}` (source: `{source}`).\n"
    if existing is not None:
        try:
            card = ModelCard(existing)
        except (ValueError, TypeError):  # a README without valid metadata: kept as it is
            return existing.rstrip("\n") + section
        data = card.data
        if isinstance(data, ModelCardData):
            data.tags = sorted({*(data.tags or []), "hyprstream"})
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{card.text.rstrip()}{section}"))
    data = ModelCardData(library_name="transformers", tags=["hyprstream"], pipeline_tag="text-generation")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {model}{section}"))


# -- pulling -----------------------------------------------------------------------------------
def pull_adapter_from_hub(store: Store, model: str, repo_id: str, *, name: str | None = None,
                          revision: str | None = "main", token: str | None = None,
                          progress: ProgressFn | None = None) -> AdapterInfo:
    """Download the PEFT repository `repo_id` and make it adapter `name` of `model`."""
    from hyprstream_tui.store import hub
    from hyprstream_tui.store.inspect import read_safetensors_header

    names.repo_id(repo_id)
    revision = revision or "main"
    names.revision(revision)
    name = names.adapter_name(name if name is not None else repo_id.split("/")[1])
    if any(a.name == name for a in store.list_adapters(model)):
        raise Conflict(f"Model {model!r} has an adapter named {name!r} already: choose another `name`.")
    snap = hub.fetch(repo_id, revision=revision, token=token, progress=progress)
    files = {f.relpath: f.path for f in snap.files}
    missing = [f for f in (CONFIG, WEIGHTS) if f not in files]
    if missing:
        raise InvalidInput(f"{repo_id} is not a PEFT LoRA adapter: it has no {' or '.join(missing)} "
                           "(a whole model comes with `hyprstream model pull`).")
    config = _read_config(files[CONFIG], repo_id)
    tensors = {t.name: t.shape for t in read_safetensors_header(files[WEIGHTS])}
    targets = _check_fit(repo_id, model, config, tensors, _base_shapes(store, model))
    info = store.create_adapter(model, name, rank=config["r"], alpha=float(config["lora_alpha"]),
                                dropout=float(config.get("lora_dropout") or 0.0), target_modules=targets)
    config["base_model_name_or_path"] = model
    worktree = store.worktree(model, info.uuid)
    with _disk_errors(f"writing adapter {name}"):
        write_bytes(worktree / "adapter" / CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        write_bytes(worktree / "adapter" / WEIGHTS, files[WEIGHTS].read_bytes())
    trailers = {"source": f"hf://{repo_id}", "revision": snap.commit, "requested": revision}
    store.commit_worktree(model, info.uuid, f"Pull {repo_id}@{revision}", trailers, ["adapter"])
    return store.resolve_adapter(model, info.uuid)


def _read_config(path: Path, repo_id: str) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        raise InvalidInput(f"The adapter_config.json of {repo_id} is not readable JSON.") from None
    if not isinstance(config, dict):
        raise InvalidInput(f"The adapter_config.json of {repo_id} is not a JSON object.")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidInput(f"{repo_id} is a {config.get('peft_type')} adapter; hyprstream uses LoRA adapters only.")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise InvalidInput(f"The adapter_config.json of {repo_id} has no valid rank `r` and `lora_alpha`.")
    config["lora_alpha"] = alpha
    return config


def _base_shapes(store: Store, model: str) -> dict[str, tuple[int, ...]]:
    from hyprstream_tui.store.inspect import read_safetensors_header

    folder = store.snapshot(model, store.head(model))
    return {t.name: t.shape for p in sorted(folder.rglob("*.safetensors")) for t in read_safetensors_header(p)}


def _check_fit(repo_id: str, model: str, config: dict[str, Any], tensors: dict[str, tuple[int, ...]],
               base: dict[str, tuple[int, ...]]) -> list[str]:
    """The adapter's LoRA pairs against the model's weights: one line on the first that does not fit.
    Returns the target module names (the last part of each adapted layer's name)."""
    trained_on = config.get("base_model_name_or_path") or "another model"
    modules = sorted({key[:-len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight")})
    if not modules:
        raise InvalidInput(f"{repo_id} holds no LoRA weights (no lora_A / lora_B tensors).")
    for module in modules:
        layer = module.removeprefix("base_model.model.")
        a, b = tensors[module + ".lora_A.weight"], tensors.get(module + ".lora_B.weight")
        weight = base.get(layer + ".weight")
        if weight is None:
            raise InvalidInput(f"The adapter {repo_id} does not fit model {model!r}: the model has no layer {layer} "
                               f"(the adapter was trained on {trained_on}).")
        if b is None or len(a) != 2 or len(b) != 2 or len(weight) != 2 or a[0] != b[1] \
                or (b[0], a[1]) != (weight[0], weight[1]):
            shown = f"{b[0]}x{a[1]}" if b is not None and len(a) == 2 and len(b) == 2 else "malformed"
            raise InvalidInput(f"The adapter {repo_id} does not fit model {model!r}: {layer} is "
                               f"{'x'.join(map(str, weight))} in the model but {shown} in the adapter "
                               f"(it was trained on {trained_on}).")
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


# -- errors ------------------------------------------------------------------------------------
@contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    try:
        yield
    except HyprError:
        raise
    except OSError as err:
        if is_disk_full(err):
            raise StorageError(f"Not enough disk space while {what}: free some space and try again.") from None
        raise StorageError(f"Cannot write while {what} ({err.strerror or err}).") from None


@contextmanager
def _hub_errors(repo_id: str, endpoint: str, revision: str) -> Iterator[None]:
    """huggingface_hub's failures as one line each. Messages never carry the token: they are
    written here, and the hub's own text (X-Error-Message) is shown only for a 400."""
    import httpx2
    from huggingface_hub import errors as hf

    org = repo_id.split("/")[0]
    try:
        yield
    except HyprError:
        raise
    except hf.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, so the hub is not contacted: unset it to push.") from None
    except hf.RevisionNotFoundError:
        raise NotFound(f"No branch {revision!r} in {repo_id} on the hub: push to an existing branch or to main.") from None
    except hf.RepositoryNotFoundError:
        raise NotFound(f"No repository {repo_id} on the hub, and the token may not create it: "
                       f"check the name and that your token may write to {org}.") from None
    except hf.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise HubError(f"The hub refused the token (HTTP 401) for {repo_id}: pass a valid `token` or set HF_TOKEN.") from None
        if status == 403:
            raise HubError(f"The hub denied writing to {repo_id} (HTTP 403): use a token with write access to {org} "
                           "(pass `token` or set HF_TOKEN).") from None
        if status == 400:
            said = " ".join(str(err.server_message or "").split())[:160]
            raise HubError(f"The hub refused the push to {repo_id} (HTTP 400{': ' + said if said else ''}).") from None
        if status == 429:
            raise HubError("The hub is rate-limiting requests (HTTP 429): wait a minute, then push again.") from None
        raise HubError(f"The hub answered HTTP {status} for {repo_id}: push again later.") from None
    except httpx2.TimeoutException:
        raise HubError(f"The hub at {endpoint} did not answer in time: check your network or HF_ENDPOINT.") from None
    except httpx2.HTTPError as err:
        raise HubError(f"Cannot reach the hub at {endpoint} ({type(err).__name__}): check your network or HF_ENDPOINT.") from None
    except ValueError as err:  # a malformed answer, or metadata the hub's validation refused
        reason = " ".join(str(err).split())[:160]
        raise HubError(f"The hub at {endpoint} refused or garbled the push to {repo_id} ({reason}).") from None
    except OSError as err:
        if is_disk_full(err):
            raise StorageError("Not enough disk space while pushing to the hub: free some space and try again.") from None
        raise StorageError(f"Cannot read the files to push ({err.strerror or err}).") from None
