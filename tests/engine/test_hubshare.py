"""Pushing models and adapters to the Hugging Face Hub and pulling adapters back (engine/hubshare.py),
against the fake hub on 127.0.0.1 (tests/hubserver.py) driven by the real huggingface_hub client,
with the tiny real model, a real store and the real CLI in-process.

The fake hub has no Xet storage, so its fixture switches huggingface_hub to LFS uploads
(HF_HUB_DISABLE_XET, huggingface_hub's own setting); nothing of huggingface_hub is mocked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from hyprstream_tui.engine import hubshare  # noqa: E402
from hyprstream_tui.errors import HubError, InvalidInput, NotFound  # noqa: E402
from hyprstream_tui.settings import Paths  # noqa: E402
from hyprstream_tui.store import Store  # noqa: E402
from hyprstream_tui.store.types import Progress  # noqa: E402
from tests import hubserver  # noqa: E402

hub_server = hubserver.hub_server  # the fixture: a fake hub on 127.0.0.1, HF_ENDPOINT pointing at it
FakeHub = hubserver.FakeHub

TOKEN = FakeHub.WRITE_TOKEN
BASE_REPO = "org/tiny"
ADAPTER_REPO = "me/tiny-qa"
STEP, LOSS = 7, 1.25
PROMPT = ["--prompt", "Hello there", "--temperature", "0", "--max-tokens", "12", "--json"]


def random_lora(base_dir: Path, dest: Path, *, seed: int = 1, r: int = 4) -> Path:
    """PEFT's own save of a random LoRA (nonzero B: it changes the output), q_proj and v_proj."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    peft_model.save_pretrained(dest)
    return dest / "adapter_model.safetensors"


@pytest.fixture
def trained(store, hub_server, tiny_model_src, tmp_path):
    """Model `tiny` pulled from the hub's org/tiny, with adapter `qa` at a checkpoint commit (step 7, loss 1.25)
    written through the store's checkpoint path."""
    hub_server.add_repo(BASE_REPO, tiny_model_src)
    store.pull_model(BASE_REPO, name="tiny")
    adapter = store.create_adapter("tiny", "qa", rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    weights = random_lora(store.model_dir("tiny"), tmp_path / "lora")
    worktree = store.worktree("tiny", adapter.uuid)
    (worktree / "adapter" / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    (worktree / "metrics").mkdir(exist_ok=True)
    (worktree / "metrics" / "steps.jsonl").write_text(json.dumps({"step": STEP, "loss": LOSS}) + "\n")
    info = store.commit_checkpoint("tiny", adapter.uuid, step=STEP, metrics={"loss": LOSS})
    return store, store.resolve_adapter("tiny", "qa"), info


def tensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def infer(monkeypatch, capsys, home: Path, spec: str) -> list[int] | str:
    from hyprstream_tui.cli import main

    monkeypatch.setenv("HYPRSTREAM_HOME", str(home))
    capsys.readouterr()
    assert main(["infer", spec, *PROMPT]) == 0
    return json.loads(capsys.readouterr().out)["text"]


def endpoint_read_at_import(monkeypatch, url: str) -> None:
    """huggingface_hub's constants as they are when HF_ENDPOINT is set before it is imported (as in the
    CLI); the tests set it later, and the fixture leaves them alone because downloads do not need them."""
    from urllib.parse import urlsplit

    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_URL_HOSTS", hf_constants.HF_URL_HOSTS | {urlsplit(url).hostname})


# -- adapters --------------------------------------------------------------------------------------
def test_adapter_push_is_a_peft_repo_whose_card_gives_base_commits_step_and_loss(trained, hub_server, monkeypatch):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    from hyprstream_tui.store import hub

    store, adapter, checkpoint = trained
    events: list[Progress] = []
    pushed = hubshare.push_adapter_to_hub(store, "tiny", adapter.uuid, ADAPTER_REPO, token=TOKEN, rev=None,
                                          progress=events.append)

    remote = hub_server.repos[ADAPTER_REPO]
    assert (pushed.repo_id, pushed.commit) == (ADAPTER_REPO, remote.commit)
    assert pushed.commit_url.endswith(f"/{ADAPTER_REPO}/commit/{remote.commit}")
    assert sorted(remote.files) == [".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert remote.files["adapter_model.safetensors"].lfs  # through the LFS batch API and its upload action
    assert events[-1].done == events[-1].total == pushed.size
    # downloads of the new commit work, and give the store's weights and config
    snap = hub.fetch(ADAPTER_REPO)
    got = {f.relpath: f.path for f in snap.files}
    assert snap.commit == pushed.commit
    local = store.snapshot("tiny", adapter.tip, "adapter")
    assert same_tensors(tensors(got["adapter_model.safetensors"]), tensors(local / "adapter_model.safetensors"))
    config = json.loads(got["adapter_config.json"].read_text())
    assert config["base_model_name_or_path"] == BASE_REPO and config["r"] == 4 and config["peft_type"] == "LORA"
    # the card: the hub's metadata conventions, and the commits, step and loss in its text
    meta = metadata_load(got["README.md"])
    assert meta["base_model"] == BASE_REPO and meta["library_name"] == "peft" and "lora" in meta["tags"]
    endpoint_read_at_import(monkeypatch, hub_server.url)
    card = ModelCard.load(ADAPTER_REPO)  # huggingface_hub's own download of the card
    assert card.content == got["README.md"].read_text() and card.data.base_model == BASE_REPO
    for needle in (checkpoint.sha, adapter.base_commit, f"| Step | {STEP} |", f"| Loss | {LOSS:g} |"):
        assert needle in card.text
    # the LFS bytes went to the "CDN" without the token
    assert all(h.auth is None for h in hub_server.hits if h.cdn)


def test_adapter_push_of_an_earlier_step_names_that_step(trained, hub_server):
    store, adapter, first = trained
    worktree = store.worktree("tiny", adapter.uuid)
    (worktree / "adapter" / "adapter_model.safetensors").write_bytes(
        random_lora(store.model_dir("tiny"), worktree.parent / "lora2", seed=2).read_bytes())
    store.commit_checkpoint("tiny", adapter.uuid, step=9, metrics={"loss": 0.5})
    hubshare.push_adapter_to_hub(store, "tiny", "qa", ADAPTER_REPO, token=TOKEN, rev=f"step:{STEP}", progress=None)

    readme = hub_server.repos[ADAPTER_REPO].files["README.md"].data.decode()
    assert first.sha in readme and f"| Step | {STEP} |" in readme and "| Step | 9 |" not in readme


def test_adapter_pulled_into_a_second_home_answers_the_same_greedy_tokens(trained, hub_server, tmp_path, monkeypatch, capsys):
    store, adapter, _ = trained
    pushed = hubshare.push_adapter_to_hub(store, "tiny", "qa", ADAPTER_REPO, token=TOKEN, rev=None, progress=None)
    home2 = tmp_path / "home2"
    store2 = Store(Paths.from_env(home2))
    store2.pull_model(BASE_REPO, name="tiny")
    events: list = []
    pulled = hubshare.pull_adapter_from_hub(store2, "tiny", ADAPTER_REPO, name="qa2", revision="main", token=None,
                                            progress=events.append)

    assert pulled.name == "qa2" and [a.name for a in store2.list_adapters("tiny")] == ["qa2"]
    assert events and events[-1].bytes_done == events[-1].bytes_total
    tip = store2.log("tiny", "qa2")[0]
    assert tip.summary == f"Pull {ADAPTER_REPO}@main"
    assert tip.metrics["source"] == f"hf://{ADAPTER_REPO}" and tip.metrics["revision"] == pushed.commit
    weights = store2.snapshot("tiny", pulled.tip, "adapter") / "adapter_model.safetensors"
    assert same_tensors(tensors(weights), tensors(store.snapshot("tiny", adapter.tip, "adapter") / "adapter_model.safetensors"))

    here = infer(monkeypatch, capsys, store.paths.home, "tiny:qa")
    there = infer(monkeypatch, capsys, home2, "tiny:qa2")
    base = infer(monkeypatch, capsys, home2, "tiny")
    assert here == there and there != base  # the same adapter, and it changes the answer


def test_pull_of_an_adapter_for_another_model_is_one_line_and_creates_nothing(trained, hub_server):
    import numpy as np
    from safetensors.numpy import save

    store, _, _ = trained
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    wrong = {f"{key}.lora_A.weight": np.zeros((4, 999), np.float32), f"{key}.lora_B.weight": np.zeros((32, 4), np.float32)}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "base_model_name_or_path": "big/model"}
    hub_server.add_repo("other/big-lora", files={"adapter_model.safetensors": save(wrong),
                                                 "adapter_config.json": json.dumps(config).encode()})
    with pytest.raises(InvalidInput, match=r"does not fit model 'tiny'.*layers\.0\.self_attn\.q_proj.*big/model") as err:
        hubshare.pull_adapter_from_hub(store, "tiny", "other/big-lora", name=None, revision="main", token=None, progress=None)
    assert "\n" not in str(err.value)
    assert [a.name for a in store.list_adapters("tiny")] == ["qa"]
    hub_server.add_repo("other/not-an-adapter", files={"config.json": b"{}"})
    with pytest.raises(InvalidInput, match="not a PEFT LoRA adapter"):
        hubshare.pull_adapter_from_hub(store, "tiny", "other/not-an-adapter", name="x", revision="main", token=None, progress=None)
    with pytest.raises(NotFound, match="nobody/nothing"):
        hubshare.pull_adapter_from_hub(store, "tiny", "nobody/nothing", name="y", revision="main", token=None, progress=None)


# -- models ----------------------------------------------------------------------------------------
def test_model_push_then_model_pull_gives_the_same_tensors_and_logits(hub_server, store, tiny_model_src, tmp_path):
    import torch
    from huggingface_hub.repocard import metadata_load
    from transformers import AutoModelForCausalLM

    store.import_model(tiny_model_src, name="tiny")
    pushed = hubshare.push_model_to_hub(store, "tiny", "me/tiny-copy", token=TOKEN, progress=None)
    remote = hub_server.repos["me/tiny-copy"]
    assert pushed.commit == remote.commit and "README.md" in pushed.files
    weights = remote.files["model.safetensors"]
    assert weights.lfs and weights.data == (tiny_model_src / "model.safetensors").read_bytes()  # the bytes, not a pointer

    store2 = Store(Paths.from_env(tmp_path / "home2"))
    store2.pull_model("me/tiny-copy", name="copy")
    one, two = store.model_dir("tiny"), store2.model_dir("copy")
    for src in sorted(tiny_model_src.iterdir()):
        assert (two / src.name).read_bytes() == src.read_bytes(), src.name  # real bytes, not LFS pointers
    assert same_tensors(tensors(one / "model.safetensors"), tensors(two / "model.safetensors"))
    meta = metadata_load(two / "README.md")
    assert "hyprstream" in meta["tags"] and store.head("tiny") in (two / "README.md").read_text()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in (one, two)]
    assert torch.equal(logits[0], logits[1])


def test_model_push_to_a_branch_keeps_the_models_card_and_skips_an_unchanged_push(hub_server, store, tiny_model_src, tmp_path):
    import shutil

    from huggingface_hub.repocard import metadata_load

    src = tmp_path / "with-card"
    shutil.copytree(tiny_model_src, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- chat\n---\n# Tiny chat\n\nThe author's words.\n")
    store.import_model(src, name="tiny")
    first = hubshare.push_model_to_hub(store, "tiny", "me/tiny-copy", token=TOKEN, revision="v1", progress=None)
    remote = hub_server.repos["me/tiny-copy"]
    assert remote.branches["v1"] == first.commit and remote.branches["main"] != first.commit
    (tmp_path / "README.md").write_bytes(remote.files["README.md"].data)
    meta = metadata_load(tmp_path / "README.md")
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["chat", "hyprstream"]
    card = (tmp_path / "README.md").read_text()
    assert "The author's words." in card and store.head("tiny") in card
    again = hubshare.push_model_to_hub(store, "tiny", "me/tiny-copy", token=TOKEN, revision="v1", progress=None)
    assert again.commit == first.commit  # nothing changed: no new commit (huggingface_hub skips it)


# -- tokens and errors -----------------------------------------------------------------------------
def test_a_wrong_token_is_one_line_that_never_shows_it(trained, hub_server, capsys, monkeypatch):
    store, _, _ = trained
    secret = "hf_WrongTokenThatMustNotLeak42"
    with pytest.raises(HubError, match="HTTP 401") as err:
        hubshare.push_adapter_to_hub(store, "tiny", "qa", ADAPTER_REPO, token=secret, rev=None, progress=None)
    assert "HF_TOKEN" in str(err.value) and "--token" in err.value.worded(lambda s: f"--{s.replace('_', '-')}")
    assert secret not in str(err.value) and "\n" not in str(err.value)
    assert ADAPTER_REPO not in hub_server.repos
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    hubshare.push_adapter_to_hub(store, "tiny", "qa", ADAPTER_REPO, token=TOKEN, rev=None, progress=None)
    endpoint_read_at_import(monkeypatch, hub_server.url)  # create_repo's 401 path parses URLs with it
    with pytest.raises(HubError, match="HTTP 401"):  # the repository exists: refused at the upload
        hubshare.push_adapter_to_hub(store, "tiny", "qa", ADAPTER_REPO, token=secret, rev=None, progress=None)
    hub_server.tokens["hf_ReadOnly000"] = "read"
    with pytest.raises(HubError, match="HTTP 403.*write access"):
        hubshare.push_adapter_to_hub(store, "tiny", "qa", "me/other", token="hf_ReadOnly000", rev=None, progress=None)


def test_the_token_comes_from_hf_token_and_lands_nowhere(trained, hub_server, monkeypatch, capsys):
    store, _, _ = trained
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hubshare.push_adapter_to_hub(store, "tiny", "qa", ADAPTER_REPO, token=None, rev=None, progress=None)

    writes = [h for h in hub_server.hits if h.method in ("POST", "PUT") and not h.cdn]
    assert writes and all(h.auth == f"Bearer {TOKEN}" for h in writes)
    remote = hub_server.repos[ADAPTER_REPO]
    assert not any(TOKEN.encode() in f.data for f in remote.files.values())
    assert not any(TOKEN.encode() in body for body in hub_server.bodies)  # the commit (NDJSON) and uploads
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    for path in store.paths.home.rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_without_any_token_is_refused_before_contacting_the_hub(trained, hub_server):
    store, _, _ = trained
    before = len(hub_server.hits)
    with pytest.raises(InvalidInput, match="HF_TOKEN") as err:
        hubshare.push_adapter_to_hub(store, "tiny", "qa", ADAPTER_REPO, token=None, rev=None, progress=None)
    assert err.value.setting == "token" and len(hub_server.hits) == before


def test_bad_repo_ids_and_an_unreachable_hub_are_one_line(trained, hub_server, monkeypatch):
    store, _, _ = trained
    for bad in ("no-slash", "a/b/c", "org/../x"):
        with pytest.raises(InvalidInput, match="ORG/NAME"):
            hubshare.push_adapter_to_hub(store, "tiny", "qa", bad, token=TOKEN, rev=None, progress=None)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(HubError, match="Cannot reach the hub") as err:
        hubshare.push_model_to_hub(store, "tiny", "me/x", token=TOKEN, progress=None)
    assert TOKEN not in str(err.value)


# -- the CLI (cli/share.py) ------------------------------------------------------------------------
def test_lora_push_and_pull_with_hub_through_the_cli(trained, hub_server, capsys, monkeypatch):
    from hyprstream_tui.cli import main

    store, adapter, _ = trained
    endpoint_read_at_import(monkeypatch, hub_server.url)  # as in a `hyprstream` process started with HF_ENDPOINT
    capsys.readouterr()
    assert main(["lora", "push", "tiny:qa", "--hub", ADAPTER_REPO, "--token", TOKEN]) == 0
    out = capsys.readouterr()
    remote = hub_server.repos[ADAPTER_REPO]
    assert f"Pushed adapter qa to {ADAPTER_REPO}: commit {remote.commit[:7]}" in out.out
    assert "adapter_model.safetensors" in remote.files and TOKEN not in out.out + out.err

    assert main(["lora", "push", "tiny:qa", "--hub", ADAPTER_REPO, "--token", "hf_NotTheRightOne"]) == 7
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--token" in err and "HF_TOKEN" in err
    assert "hf_NotTheRightOne" not in err

    assert main(["lora", "pull", "tiny:qa-again", "--hub", ADAPTER_REPO]) == 0
    assert f"Pulled adapter qa-again on tiny from {ADAPTER_REPO}" in capsys.readouterr().out
    assert sorted(a.name for a in store.list_adapters("tiny")) == ["qa", "qa-again"]
