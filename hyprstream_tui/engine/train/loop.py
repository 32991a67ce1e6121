"""The LoRA training loop: setup -> step()* -> save(), on one adapter worktree.

`Trainer` knows nothing about git, locks or events (see job.py): it loads the base model and the
adapter from the worktree, plans the run (resume an unfinished one or start a new schedule), and
runs one optimizer step per call with AdamW, warm-up + cosine decay and gradient clipping. Data
order is a pure function of the seed and the epoch; rows appended to the samples file while it
runs join at the next epoch boundary.

In a group (group.py: one Trainer per rank, under torch.distributed) every rank plans the same run
and walks the same epoch order; a step takes the next `batch_size` x N rows of it (the global
batch) and rank r trains on rows r, r+N, r+2N... of them (DistributedSampler's striding). The loss
is summed over the answer tokens and divided by the global batch's count of them, and DDP
averages the LoRA gradients: the step is the single-process step on the global batch, up to
float rounding. A rank whose share of a short last batch is empty trains on a row with every label
masked (no gradient). Every rank holds the same weights and optimizer state; rank 0 saves them.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

from hyprstream_tui.engine.train import checkpoint as ckpt
from hyprstream_tui.engine.train.config import RUN_KEYS, TrainConfig, lr_at
from hyprstream_tui.engine.train.data import (IGNORE_INDEX, SAMPLES_PATH, Encoded, collate, encode, epoch_order,
                                               parse_jsonl)
from hyprstream_tui.engine.train.defaults import ADAPTER_CONFIG, ModelShape, learning_rate_for, read_adapter_config
from hyprstream_tui.errors import HyprError, InvalidInput

if TYPE_CHECKING:  # torch, transformers and peft load when training starts
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from hyprstream_tui.engine.train.group import Group, RankStats


@dataclass(frozen=True)
class StepResult:
    step: int  # global step count after this step
    loss: float
    lr: float
    tokens: int  # tokens processed (padding excluded)
    samples: int
    seconds: float
    epoch: int


def load_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir))


def load_base_model(base_dir: Path, *, dtype: str = "auto", device: str = "cpu") -> PreTrainedModel:
    """The base model from its folder: safetensors only, no remote code. dtype "auto" keeps the
    checkpoint's, except that bf16/fp16 weights train in fp32 on a CPU without native bf16
    arithmetic (there PyTorch falls back to a scalar bf16 matmul, about 100x slower)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from hyprstream_tui.engine.loader import cpu_has_bf16

    hf_logging.disable_progress_bar()  # rich draws our own; tqdm bars would garble it
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except Exception as exc:  # a malformed config.json or weights break transformers anywhere
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise InvalidInput(f"Cannot load the base model in {str(base_dir)!r}, its files are malformed: "
                           f"{type(exc).__name__}: {text}") from None
    half = model.dtype in (torch.bfloat16, torch.float16)
    if dtype == "auto" and half and device == "cpu" and not cpu_has_bf16():
        model = model.float()
    return model.to(device)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) types `self` as the first argument


def lora_config(adapter_dir: Path, *, trainable: bool) -> LoraConfig:
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as exc:  # a malformed adapter_config.json: TypeError, ValueError, JSONDecodeError...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        raise InvalidInput(f"The adapter's adapter_config.json is malformed ({type(exc).__name__}: {text}): "
                           "roll back to an earlier commit.") from None
    config.inference_mode = not trainable
    return config


def peft_model(base: PreTrainedModel, adapter_dir: Path, *, seed: int, trainable: bool) -> PeftModel:
    """`base` wrapped with the adapter described in `adapter_dir` (weights loaded if present;
    otherwise PEFT's initialisation, seeded)."""
    import torch
    from peft import PeftModel, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # PEFT warns that the config names the base by its store name rather than a path, and
        # about a transformers deprecation it calls itself: neither is the user's to act on.
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        torch.manual_seed(seed)
        model = get_peft_model(base, lora_config(adapter_dir, trainable=trainable))
    assert isinstance(model, PeftModel)  # get_peft_model(mixed=False) never returns a PeftMixedModel
    weights = adapter_dir / Path(ckpt.ADAPTER_FILE).name
    if weights.is_file():
        result = set_peft_model_state_dict(model, load_file(str(weights)))
        if getattr(result, "unexpected_keys", None):
            raise InvalidInput(f"{weights} does not match the adapter's configuration: roll back to an earlier commit.")
    return model


class Trainer:
    """One adapter being trained in its worktree."""

    # Set by setup():
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    state: ckpt.RunState
    model: PeftModel  # the base model with the adapter, in train mode
    param_names: list[str]  # the trainable parameters, sorted by name
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    metric_lines: list[str]  # metrics/steps.jsonl, one line per step

    def __init__(self, *, base_dir: Path, worktree: Path, config: TrainConfig, explicit: Collection[str] = (),
                 group: Group | None = None) -> None:
        self.group = group
        self.world = group.world if group is not None else 1
        self.stop_wanted = lambda: False  # a group's ranks vote on stopping after each step
        self.group_stop = False  # ... and this is the vote's outcome
        self.rank_stats: list[RankStats] = []
        self.base_dir = Path(base_dir)
        self.worktree = Path(worktree)
        self.config = config
        self.explicit = frozenset(explicit)  # options the user gave (checked against a resumed run)
        self._encoded: dict[str, Encoded] = {}
        self._rows: list[Encoded] = []
        self._since_checkpoint: list[float] = []
        self._max_len = config.max_seq_len
        self._order: tuple[tuple[int, int, int] | None, list[int]] = (None, [])  # (seed, epoch, size), order
        self.resumed = False

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        saved = ckpt.load(self.worktree)
        self.tokenizer = load_tokenizer(self.base_dir)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id or 0
        self.state = self._plan(saved)
        hp = self.state.hparams
        device = self.group.device if self.group is not None else self.config.device
        base = load_base_model(self.base_dir, dtype=self.config.dtype, device=device)
        self.model = peft_model(base, self.worktree / "adapter", seed=hp["seed"], trainable=True)
        self.model.train()
        named = sorted((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.forward: Any = self.model if self.group is None else self.group.wrap(self.model, self.params)
        self.optimizer = torch.optim.AdamW(self.params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
        if saved is not None and saved.param_names == self.param_names and saved.optimizer:
            current = self.optimizer.state_dict()
            self.optimizer.load_state_dict({"state": saved.optimizer, "param_groups": current["param_groups"]})
        if saved is not None and saved.rng is not None and (self.group is None or self.group.rank == 0):
            torch.set_rng_state(saved.rng)  # rank 0's generator is the one a checkpoint keeps
        elif self.group is None:
            torch.manual_seed(hp["seed"])
        else:  # each rank its own dropout noise, reproducible
            torch.manual_seed(hp["seed"] + self.state.step * 1009 + self.group.rank)
        self.metric_lines = ckpt.read_metric_lines(self.worktree)
        self._reload_rows()

    def _plan(self, saved: ckpt.Saved | None) -> ckpt.RunState:
        """Resume the saved run if it is unfinished, else start a new one from the saved step."""
        given = {k: getattr(self.config, k) for k in RUN_KEYS if k != "total_steps"}
        if saved is not None and saved.state.unfinished and not self.config.new_run:
            state = saved.state
            self._check_resumable(state)
            self.resumed = True
            if "batch_size" in self.explicit:  # the same global batch over another number of ranks
                state.hparams["batch_size"] = self.config.batch_size
            state.world_size = self.world
            if state.hparams["max_seq_len"] != self._max_len:
                self._max_len, self._encoded = state.hparams["max_seq_len"], {}
            return state
        state = saved.state if saved is not None else ckpt.RunState()
        total = self._new_run_steps()
        if given["learning_rate"] is None:
            given["learning_rate"] = self._default_learning_rate()
        state.run_start, state.run_total, state.world_size = state.step, total, self.world
        state.hparams = dict(given, total_steps=total, warmup_steps=self.config.warmup_for(total))
        if state.epoch >= 0:
            state.epoch_pos = state.epoch_size  # a new run starts with a new epoch
        return state

    def _default_learning_rate(self) -> float:
        """The rule of defaults.py for this model and this adapter's alpha and targets."""
        path = self.worktree / ADAPTER_CONFIG
        try:
            data = path.read_bytes()
        except OSError:
            raise InvalidInput(f"Cannot read {path}: roll back to an earlier commit.") from None
        return learning_rate_for(ModelShape.read(self.base_dir), read_adapter_config(data, str(path)))

    def _new_run_steps(self) -> int:
        return self.config.run_steps(math.ceil(max(1, len(self._read_rows())) / (self.config.batch_size * self.world)))

    def _check_resumable(self, state: ckpt.RunState) -> None:
        """Options the user gave must agree with the run being resumed (its schedule and data
        order are fixed); otherwise say how to resume it or start a new one."""
        wanted = {k: getattr(self.config, k) for k in self.explicit if k in RUN_KEYS}
        clash = [k for k, v in wanted.items() if v != state.hparams.get(k)]
        if "batch_size" in clash and self.config.batch_size * self.world == state.hparams["batch_size"] * state.world_size:
            clash.remove("batch_size")  # per-rank batch x ranks: the run's global batch
        if self.explicit & {"steps", "epochs"} and self._new_run_steps() != state.run_total:
            clash.append("steps" if "steps" in self.explicit else "epochs")
        if clash:
            left = state.run_total - state.run_done
            raise InvalidInput(
                f"This adapter has an unfinished run ({left} of {state.run_total} steps left) with other "
                f"{', '.join(f'`{k}`' for k in sorted(clash))}: leave those options out to resume it, or set `new_run`.")

    # ---- data --------------------------------------------------------------------------------
    def _read_rows(self) -> list[Encoded]:
        """The samples file as encoded rows that have at least one answer token."""
        path = self.worktree / SAMPLES_PATH
        data = path.read_bytes() if path.is_file() else b""
        out = []
        for row in parse_jsonl(data, SAMPLES_PATH):
            key = json.dumps(row, sort_keys=True)
            if key not in self._encoded:
                self._encoded[key] = encode(self.tokenizer, row, self._max_len)
            if self._encoded[key].answer_tokens:
                out.append(self._encoded[key])
        if self.group is not None:  # the ranks train on the rows every one of them has
            out = out[:self.group.agree_min(len(out), setup=not hasattr(self, "model"))]
        return out

    def _reload_rows(self) -> None:
        self._rows = self._read_rows()
        if not self._rows:
            raise InvalidInput("The adapter has no samples to learn from: add some with `hyprstream lora train sample`"
                               " (or raise `max_seq_len` if every answer is cut off).")

    def _next_batch(self) -> list[Encoded]:
        """The next global batch (every rank's rows)."""
        s, size = self.state, self.state.hparams["batch_size"] * self.world
        if s.epoch < 0 or s.epoch_pos >= s.epoch_size or s.epoch_size > len(self._rows):
            self._reload_rows()  # epoch boundary: pick up rows added meanwhile
            s.epoch, s.epoch_size, s.epoch_pos = s.epoch + 1, len(self._rows), 0
        key = (s.hparams["seed"], s.epoch, s.epoch_size)
        if self._order[0] != key:
            self._order = (key, epoch_order(s.epoch_size, seed=key[0], epoch=key[1]))
        picked = self._order[1][s.epoch_pos: s.epoch_pos + size]
        s.epoch_pos += len(picked)
        return [self._rows[i] for i in picked]

    @property
    def sample_count(self) -> int:
        """Samples the current pass draws from (those with at least one answer token)."""
        return len(self._rows)

    # ---- one step ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return not self.state.unfinished

    @property
    def target_step(self) -> int:
        return self.state.run_start + self.state.run_total

    def current_lr(self) -> float:
        hp = self.state.hparams
        return lr_at(self.state.run_done, learning_rate=hp["learning_rate"], total_steps=hp["total_steps"],
                     warmup_steps=hp["warmup_steps"], min_lr_ratio=hp["min_lr_ratio"])

    def step(self) -> StepResult:
        import torch

        started = time.perf_counter()
        batch = self._next_batch()
        if self.group is not None:
            return self._group_step(started, batch)
        tensors = {k: v.to(self.config.device) for k, v in collate(batch, self.pad_id).items()}
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.model(**tensors).loss
        if not torch.isfinite(loss):
            raise HyprError(f"The loss became {loss.item()} at step {self.state.step + 1}: lower `learning_rate` "
                            "and start again (the last checkpoint is kept).")
        loss.backward()
        if self.state.hparams["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.state.hparams["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        return self._record(loss.item(), lr, int(tensors["attention_mask"].sum()), len(batch), seconds)

    def _group_step(self, started: float, batch: list[Encoded]) -> StepResult:
        """This rank's share of the step on the global `batch` (see the module's docstring)."""
        import torch

        assert self.group is not None
        g = self.group
        mine = batch[g.rank::g.world] or [Encoded(batch[0].input_ids, (IGNORE_INDEX,) * len(batch[0].labels))]
        tensors = {k: v.to(g.device) for k, v in collate(mine, self.pad_id).items()}
        items = int((tensors["labels"][:, 1:] != IGNORE_INDEX).sum())
        tokens = int(tensors["attention_mask"].sum()) if items else 0
        all_items, all_tokens = g.sum_ints(items, tokens)
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.forward(**tensors, num_items_in_batch=torch.tensor(max(all_items, 1))).loss
        (loss * g.world).backward()  # DDP averages the gradients: undo its division
        seconds = time.perf_counter() - started
        self.rank_stats = g.gather_stats(loss=loss.item(), tokens=tokens, seconds=seconds, stop=self.stop_wanted())
        total = sum(r.loss for r in self.rank_stats)
        if not math.isfinite(total):
            raise HyprError(f"The loss became {total} at step {self.state.step + 1}: lower `learning_rate` "
                            "and start again (the last checkpoint is kept).")
        self.group_stop = any(r.stop for r in self.rank_stats)
        if self.state.hparams["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.state.hparams["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        return self._record(total, lr, all_tokens, len(batch), seconds)

    def _record(self, loss: float, lr: float, tokens: int, samples: int, seconds: float) -> StepResult:
        s = self.state
        s.step += 1
        s.samples_seen += samples
        s.tokens_seen += tokens
        s.elapsed += seconds
        self._since_checkpoint.append(loss)
        self.metric_lines.append(json.dumps({"step": s.step, "loss": round(loss, 6), "lr": lr,
                                             "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
                                             "time": round(time.time(), 3)}))
        return StepResult(step=s.step, loss=loss, lr=lr, tokens=tokens, samples=samples, seconds=seconds, epoch=s.epoch)

    # ---- checkpoint ----------------------------------------------------------------------------
    def save(self) -> dict[str, Any]:
        """Write the checkpoint files into the worktree; returns the metrics for the commit."""
        ckpt.save(self.worktree, model=self.model, optimizer=self.optimizer, param_names=self.param_names,
                  state=self.state, metric_lines=self.metric_lines)
        losses, self._since_checkpoint = self._since_checkpoint, []
        s = self.state
        metrics: dict[str, Any] = {}
        if losses:
            metrics["loss"] = sum(losses) / len(losses)
        metrics.update(lr=self.current_lr() if s.unfinished else self._last_lr(), samples=s.samples_seen,
                       tokens=s.tokens_seen, epoch=s.epoch, elapsed=round(s.elapsed, 2))
        return metrics

    def _last_lr(self) -> float:
        return json.loads(self.metric_lines[-1])["lr"] if self.metric_lines else 0.0
