"""Small GGUF files for the tests, written with gguf-py's own writer (llama.cpp's Python package).

`write_tiny_gguf` writes a tiny random llama (2 layers, 64 wide, the demo tokenizer's vocabulary
and merges, its chat template) whose matrices are stored as F32, F16, BF16 or Q8_0, with norms in
F32 as llama.cpp writes them. transformers' GGUF loader reads it like any llama.cpp export, in a
second or two: the fast stand-in for a real GGUF file (the real one is tests/realmodel.py's).
"""

from __future__ import annotations

import json
from pathlib import Path

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 256


def _tokenizer() -> tuple[list[str], list[int], list[str], str]:
    from hyprstream_tui.engine.tiny import tokenizer_dir

    data = json.loads((tokenizer_dir() / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in data["added_tokens"]}
    types = [3 if i in special else 1 for i in range(len(tokens))]  # 3: control, 1: normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    template = (tokenizer_dir() / "chat_template.jinja").read_text()
    return tokens, types, merges, template


def _tensors(vocab: int, seed: int) -> dict[str, "object"]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int):
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    kv = HIDDEN // HEADS * KV_HEADS
    out = {"token_embd.weight": mat(vocab, HIDDEN), "output_norm.weight": np.ones(HIDDEN, np.float32),
           "output.weight": mat(vocab, HIDDEN)}
    for i in range(LAYERS):
        out |= {f"blk.{i}.attn_norm.weight": np.ones(HIDDEN, np.float32), f"blk.{i}.attn_q.weight": mat(HIDDEN, HIDDEN),
                f"blk.{i}.attn_k.weight": mat(kv, HIDDEN), f"blk.{i}.attn_v.weight": mat(kv, HIDDEN),
                f"blk.{i}.attn_output.weight": mat(HIDDEN, HIDDEN), f"blk.{i}.ffn_norm.weight": np.ones(HIDDEN, np.float32),
                f"blk.{i}.ffn_gate.weight": mat(FFN, HIDDEN), f"blk.{i}.ffn_up.weight": mat(FFN, HIDDEN),
                f"blk.{i}.ffn_down.weight": mat(HIDDEN, FFN)}
    return out


def write_tiny_gguf(path: Path, *, tensor_type: str = "F32", arch: str = "llama", seed: int = 0) -> Path:
    """A tiny llama GGUF whose matrices are `tensor_type` (F32, F16, BF16 or Q8_0)."""
    import gguf
    import numpy as np

    tokens, types, merges, template = _tokenizer()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny gguf")
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(template)
    qtype = getattr(gguf.GGMLQuantizationType, tensor_type)
    for name, array in _tensors(len(tokens), seed).items():
        if array.ndim == 1 or tensor_type == "F32":
            writer.add_tensor(name, array)
        elif tensor_type == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_other_arch_gguf(path: Path, arch: str = "rwkv6") -> Path:
    """A well-formed GGUF of an architecture transformers' loader does not read."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
