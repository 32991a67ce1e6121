"""An adapter as llama.cpp's LoRA GGUF (for `llama-cli --lora`, Ollama's `ADAPTER`), and what vLLM
refuses in a PEFT folder.

The LoRA GGUF is what llama.cpp's `convert_lora_to_gguf.py` writes: `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha`, the base's architecture, and per adapted matrix two
tensors named after the base tensor, `blk.N.attn_q.weight.lora_a` (A, rank x in) and `.lora_b`
(B, out x rank), in F32. llama.cpp scales B·A by alpha / rank, PEFT's own rule; an rsLoRA adapter
(alpha / sqrt(rank)) has the difference folded into B. For llama, B's rows of q and k get the same
rope permutation as the base weights (`permute_qk`). DoRA magnitudes and `modules_to_save` have no
place in the format: such an adapter is refused with the merged-model export as the way out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from hyprstream_tui.engine.gguf_export import (GGUFExported, Planned, check_output, gguf_arch, permute_qk,
                                               tensor_name_map, write_atomically, write_gguf)
from hyprstream_tui.errors import InvalidInput
from hyprstream_tui.store.types import Progress

if TYPE_CHECKING:
    import numpy as np

    from hyprstream_tui.store import Store

VLLM_MAX_LORA_RANK = 16  # vLLM's default --max-lora-rank
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank
_PREFIX = "base_model.model."


def vllm_warnings(config: Mapping[str, Any]) -> list[str]:
    """One line per thing in a PEFT adapter_config.json that `vllm serve --enable-lora` refuses."""
    out = []
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank > VLLM_MAX_LORA_RANK:
        fits = next((r for r in VLLM_RANKS if r >= rank), rank)
        out.append(f"rank {rank} is above vLLM's default max_lora_rank of {VLLM_MAX_LORA_RANK}: start vLLM with "
                   f"`--max-lora-rank {fits}`.")
    if config.get("use_dora"):
        out.append("vLLM does not serve DoRA adapters (use_dora): serve a merged model instead "
                   "(`hyprstream lora merge`).")
    if config.get("modules_to_save"):
        out.append(f"vLLM refuses adapters with modules_to_save ({', '.join(config['modules_to_save'])}): "
                   "serve a merged model instead (`hyprstream lora merge`).")
    return out


def _check_config(config: Mapping[str, Any], name: str) -> None:
    merged = f"export the merged model instead (`hyprstream model export MODEL:{name} --format gguf`)"
    if config.get("use_dora"):
        raise InvalidInput(f"Adapter {name!r} is a DoRA adapter: llama.cpp's LoRA GGUF has no DoRA magnitudes; {merged}.")
    if config.get("modules_to_save"):
        raise InvalidInput(f"Adapter {name!r} saves whole modules ({', '.join(config['modules_to_save'])}), which "
                           f"llama.cpp's LoRA GGUF cannot hold; {merged}.")
    if config.get("alpha_pattern"):
        raise InvalidInput(f"Adapter {name!r} has a per-module alpha (alpha_pattern), which llama.cpp's LoRA GGUF "
                           f"cannot hold; {merged}.")


def lora_pairs(weights: Mapping[str, np.ndarray], name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{base weight key: (A, B)} from PEFT's keys (`...q_proj.lora_A.weight`)."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        stem = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if stem.endswith(suffix):
                pairs.setdefault(stem[: -len(suffix)] + ".weight", {})[part] = value
                break
        else:
            raise InvalidInput(f"Adapter {name!r} holds {key!r}, which is no LoRA matrix of a linear layer: "
                               "llama.cpp's LoRA GGUF cannot hold it.")
    broken = [k for k, v in pairs.items() if len(v) != 2]
    if broken:
        raise InvalidInput(f"Adapter {name!r} has {broken[0]} without its other LoRA half: roll back to an earlier commit.")
    return {k: (v["A"], v["B"]) for k, v in sorted(pairs.items())}


def export_lora_gguf(store: Store, model: str, ref: str, output: Path | str, *, rev: str | None = None,
                     force: bool = False, progress: Callable[[Progress], None] | None = None) -> GGUFExported:
    """Write adapter `ref` of `model` as llama.cpp's LoRA GGUF (F32)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    path = check_output(store, output, force=force)
    adapter = store.resolve_adapter(model, ref, rev)
    folder = store.snapshot(model, adapter.tip, "adapter")
    if not (folder / "adapter_model.safetensors").is_file():
        raise InvalidInput(f"Adapter {adapter.name!r} has no trained weights at {adapter.tip[:7]}: train it first "
                           f"(`hyprstream lora train start {adapter.name}`).")
    config = json.loads((folder / "adapter_config.json").read_text())
    _check_config(config, adapter.name)
    base = json.loads((store.model_dir(model) / "config.json").read_text())
    arch, permute = gguf_arch(base, f"The base model {model!r}")
    name_of = tensor_name_map(arch, int(base["num_hidden_layers"]))
    alpha = float(config["lora_alpha"])
    heads = int(base["num_attention_heads"])
    kv_heads = int(base.get("num_key_value_heads") or heads)
    tensors: dict[str, np.ndarray] = {}
    for key, (a, b) in lora_pairs(load_file(str(folder / "adapter_model.safetensors")), adapter.name).items():
        target = name_of(key)
        if target is None:
            raise InvalidInput(f"Adapter {adapter.name!r} adapts {key!r}, which has no GGUF name in a {arch} model.")
        a, b = a.astype(np.float32), b.astype(np.float32)
        if config.get("use_rslora"):  # PEFT: alpha / sqrt(r); llama.cpp: alpha / r
            b = b * np.float32(math.sqrt(a.shape[0]))
        if permute and target.endswith(("attn_q.weight", "attn_k.weight")):
            b = permute_qk(b, heads if target.endswith("attn_q.weight") else kv_heads)
        tensors[target + ".lora_a"], tensors[target + ".lora_b"] = a, b
    if not tensors:
        raise InvalidInput(f"Adapter {adapter.name!r} holds no LoRA matrices.")
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{model}:{adapter.name}")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan = [Planned(n, n, tuple(t.shape), "F32") for n, t in tensors.items()]
    size = write_atomically(path, lambda tmp: write_gguf(tmp, writer, plan, lambda item: tensors[item.source],
                                                         progress, path.name))
    return GGUFExported(path, adapter.tip, size, "f32", len(plan))
