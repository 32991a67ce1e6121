"""The LoRA training loop: setup -> step()* -> save(), on one adapter worktree.

`Trainer` knows nothing about git, locks or events (see job.py): it loads the base model and the
adapter from the worktree, plans the run (resume an unfinished one or start a new schedule), and
runs one optimizer step per call with AdamW, warm-up + cosine decay and gradient clipping. Data
order is a pure function of the seed and the epoch; rows appended to the samples file while it
runs join at the next epoch boundary.
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
from hyprstream_tui.engine.train.data import SAMPLES_PATH, Encoded, collate, encode, epoch_order, parse_jsonl
from hyprstream_tui.engine.train.defaults import ADAPTER_CONFIG, ModelShape, learning_rate_for, read_adapter_config
from hyprstream_tui.errors import HyprError, InvalidInput

if TYPE_CHECKING:  # torch, transformers and peft load when training starts
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


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

    def __init__(self, *, base_dir: Path, worktree: Path, config: TrainConfig, explicit: Collection[str] = ()) -> None:
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
        base = load_base_model(self.base_dir, dtype=self.config.dtype, device=self.config.device)
        self.model = peft_model(base, self.worktree / "adapter", seed=hp["seed"], trainable=True)
        self.model.train()
        named = sorted((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(self.params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
        if saved is not None and saved.param_names == self.param_names and saved.optimizer:
            current = self.optimizer.state_dict()
            self.optimizer.load_state_dict({"state": saved.optimizer, "param_groups": current["param_groups"]})
        if saved is not None and saved.rng is not None:
            torch.set_rng_state(saved.rng)
        else:
            torch.manual_seed(hp["seed"])
        self.metric_lines = ckpt.read_metric_lines(self.worktree)
        self._reload_rows()

    def _plan(self, saved: ckpt.Saved | None) -> ckpt.RunState:
        """Resume the saved run if it is unfinished, else start a new one from the saved step."""
        given = {k: getattr(self.config, k) for k in RUN_KEYS if k != "total_steps"}
        if saved is not None and saved.state.unfinished and not self.config.new_run:
            state = saved.state
            self._check_resumable(state)
            self.resumed = True
            if state.hparams["max_seq_len"] != self._max_len:
                self._max_len, self._encoded = state.hparams["max_seq_len"], {}
            return state
        state = saved.state if saved is not None else ckpt.RunState()
        total = self._new_run_steps()
        if given["learning_rate"] is None:
            given["learning_rate"] = self._default_learning_rate()
        state.run_start, state.run_total = state.step, total
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
        return self.config.run_steps(math.ceil(max(1, len(self._read_rows())) / self.config.batch_size))

    def _check_resumable(self, state: ckpt.RunState) -> None:
        """Options the user gave must agree with the run being resumed (its schedule and data
        order are fixed); otherwise say how to resume it or start a new one."""
        wanted = {k: getattr(self.config, k) for k in self.explicit if k in RUN_KEYS}
        clash = [k for k, v in wanted.items() if v != state.hparams.get(k)]
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
        return out

    def _reload_rows(self) -> None:
        self._rows = self._read_rows()
        if not self._rows:
            raise InvalidInput("The adapter has no samples to learn from: add some with `hyprstream lora train sample`"
                               " (or raise `max_seq_len` if every answer is cut off).")

    def _next_batch(self) -> list[Encoded]:
        s, size = self.state, self.state.hparams["batch_size"]
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
