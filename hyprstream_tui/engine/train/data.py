"""Training samples: parsing and validating rows, the adapter's `data/samples.jsonl`, the chat
template with the loss on answer tokens only, deterministic epoch order, padded batches.

A row is either `{"input": ..., "output": ...}` (optional `"system"`) or a chat
`{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}` with at least one
assistant message. The file is append-only: rows keep their order, so an epoch's order is a pure
function of (seed, epoch, number of rows).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from hyprstream_tui.errors import InvalidInput

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

SAMPLES_PATH = "data/samples.jsonl"
ROLES = ("system", "user", "assistant")
MAX_ROW_BYTES = 1 << 20
IGNORE_INDEX = -100  # label value the loss skips


# ---- rows ------------------------------------------------------------------------------------
def check_row(row: Any, where: str) -> dict[str, Any]:
    """The row as it is stored (known keys only); InvalidInput naming `where` if it is unusable."""
    if not isinstance(row, dict):
        raise InvalidInput(f"{where}: a sample must be a JSON object with input/output or messages.")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise InvalidInput(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects.")
        clean = []
        for i, m in enumerate(messages, 1):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidInput(f"{where}: message {i} needs a role (system, user or assistant) and text content.")
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"] for m in clean):
            raise InvalidInput(f"{where}: the conversation has no assistant answer to learn.")
        return {"messages": clean}
    if "input" in row or "output" in row:
        for key in ("input", "output"):
            if not isinstance(row.get(key), str):
                raise InvalidInput(f"{where}: \"{key}\" must be text.")
        if not row["output"]:
            raise InvalidInput(f"{where}: \"output\" is empty: there is no answer to learn.")
        out = {"input": row["input"], "output": row["output"]}
        if row.get("system") is not None:
            if not isinstance(row["system"], str):
                raise InvalidInput(f"{where}: \"system\" must be text.")
            out["system"] = row["system"]
        return out
    raise InvalidInput(f"{where}: a sample needs \"input\" and \"output\", or \"messages\".")


def parse_jsonl(data: bytes, source: str) -> list[dict[str, Any]]:
    """Every row of a JSONL file, validated; the first bad row raises with its line number."""
    rows = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{source} line {lineno}"
        if len(raw) > MAX_ROW_BYTES:
            raise InvalidInput(f"{where}: the row is larger than 1 MiB.")
        try:
            value = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}: not UTF-8 text.") from None
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{where}: not valid JSON ({exc.msg}).") from None
        except ValueError as exc:  # valid syntax json still refuses: an integer past int_max_str_digits
            raise InvalidInput(f"{where}: not valid JSON ({str(exc).split(':')[0]}).") from None
        except RecursionError:
            raise InvalidInput(f"{where}: not valid JSON (nested too deeply).") from None
        rows.append(check_row(value, where))
    return rows


def dump_rows(rows: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False, sort_keys=True).encode() + b"\n" for r in rows)


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        return row["messages"]
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return system + [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["output"]}]


# ---- tokens ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE_INDEX outside assistant answers

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """The model's chat template; a model without one gets the plain transcript that inference
    (engine/chat.py) uses for it too."""
    if getattr(tokenizer, "chat_template", None):
        from hyprstream_tui.engine.chat import template_budget

        try:
            with template_budget():
                # tokenize=False returns a str; transformers types every variant's result as one union
                return tokenizer.apply_chat_template(list(messages), tokenize=False,  # type: ignore[return-value]
                                                     add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja's TemplateError, a sandbox refusal, the budget
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInput(f"The model's chat template fails on a sample ({first}): fix the sample or the "
                               "template.") from None
    eos = tokenizer.eos_token or ""
    text = "".join(f"{m['role']}: {m['content']}{eos if m['role'] == 'assistant' else ''}\n" for m in messages)
    return text + ("assistant:" if generation_prompt else "")


def answer_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer (with the
    template's end-of-turn marker, so the model learns to stop)."""
    text = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            if i != len(messages) - 1 or not text.startswith(prompt):
                continue  # a template that rewrites earlier turns: learn only the last answer
            upto = text
        spans.append((len(prompt), len(upto)))
    if not spans:
        raise InvalidInput("The model's chat template hides the assistant answers: train on input/output samples instead.")
    return text, spans


def encode(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], max_seq_len: int) -> Encoded:
    """Token ids of the chat-formatted row and labels that keep only the answer tokens."""
    text, spans = answer_spans(tokenizer, to_messages(row))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_seq_len], enc["offset_mapping"][:max_seq_len]
    labels = [tok if any(a <= start < b for a, b in spans) else IGNORE_INDEX for tok, (start, _end) in zip(ids, offsets)]
    return Encoded(tuple(ids), tuple(labels))


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch, n)."""
    order = list(range(n))
    random.Random(f"hyprstream:{seed}:{epoch}").shuffle(order)
    return order


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels, each [B, S]."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
