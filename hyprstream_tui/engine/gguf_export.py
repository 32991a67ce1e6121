"""GGUF out: a stored model (an adapter merged in when one is named) as one llama.cpp model file,
for llama.cpp, Ollama and LM Studio.

What llama.cpp's own `convert_hf_to_gguf.py` does, with gguf-py (its Python package):
- tensor names through gguf-py's tensor name map (`model.layers.0.self_attn.q_proj.weight` ->
  `blk.0.attn_q.weight`); a tied `lm_head` is not written (llama.cpp reuses `token_embd`);
- llama's q/k rows are permuted into llama.cpp's rope layout (`permute_qk`; transformers' GGUF loader
  reverses it on the way back); qwen2 keeps HF's layout;
- 1-D tensors (norms, biases) stay F32; matrices become the outtype: F32, F16, BF16 or Q8_0 (gguf-py's
  quantizer; a row not a multiple of 32 wide falls back to F16, as llama.cpp does);
- hparams as `<arch>.*` keys; the tokenizer as `tokenizer.ggml.*` (BPE "gpt2": tokens, types, merges,
  special ids, the chat template; the pre-tokenizer named by llama.cpp's hash of a fixed text).
The file is written under a temporary name beside the output and renamed into place, so an error,
a full disk or Ctrl-C never leaves a half-written .gguf under the output's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hyprstream_tui.errors import Conflict, InvalidInput, is_disk_full
from hyprstream_tui.store.atomic import disk_error
from hyprstream_tui.store.types import Progress

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hyprstream_tui.store import Store

# HF model_type -> (GGUF architecture, whether llama.cpp permutes q/k), as convert_hf_to_gguf maps them.
ARCHS: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
# llama.cpp's name for a BPE pre-tokenizer, by the sha256 of the token ids of CHECK_TEXT
# (convert_hf_to_gguf.py's get_vocab_base_pre); other tokenizers get the arch's default.
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
              "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
              "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
}
_DEFAULT_PRE = {"qwen2": "qwen2", "llama": "default"}


@dataclass(frozen=True)
class GGUFExported:
    path: Path
    commit: str  # the model's commit, or the adapter's when one was merged
    size: int
    outtype: str
    tensors: int


@dataclass(frozen=True)
class Planned:
    name: str  # GGUF tensor name
    source: str  # where its values come from (a state-dict key)
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: str  # F32, F16, BF16, Q8_0


def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise InvalidInput(f"Unknown outtype {outtype!r}: use one of {', '.join(OUTTYPES)}.")
    return outtype


def check_output(store: Store, output: Path | str, *, force: bool) -> Path:
    """The absolute output path of a .gguf export, or one line (nothing is written)."""
    text = str(output)
    if not text or any(ord(ch) < 32 for ch in text):
        raise InvalidInput("The `output` path is empty or has control characters.")
    path = Path(os.path.abspath(Path(text).expanduser()))
    home = store.paths.home.resolve()
    if path.resolve() == home or home in path.resolve().parents:
        raise InvalidInput(f"Export outside the store ({home}): its folders are managed by hyprstream.")
    if path.suffix.lower() != ".gguf":
        raise InvalidInput(f"The output {path.name!r} must end in .gguf.")
    if not path.parent.is_dir():
        raise InvalidInput(f"The folder {path.parent} does not exist: create it first.")
    if path.is_dir():
        raise Conflict(f"{path} is a folder: choose a file name ending in .gguf.")
    if path.exists() and not force:
        raise Conflict(f"{path} exists already: choose another `output` or set `force` (--force).")
    return path


def gguf_arch(config: dict[str, Any], what: str) -> tuple[str, bool]:
    """(GGUF architecture, permute q/k) of an HF config, or one line listing what is supported."""
    model_type = str(config.get("model_type", "unknown"))
    if model_type not in ARCHS:
        raise InvalidInput(f"{what} is a {model_type!r} model; GGUF export supports {', '.join(sorted(ARCHS))}.")
    return ARCHS[model_type]


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: each head's rows from HF's half-split rope order into
    llama.cpp's interleaved pairs (for q pass the attention heads, for k the kv heads). Works on any
    array whose first axis is the output rows (a weight, or a LoRA B)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_name_map(arch: str, blocks: int) -> Callable[[str], str | None]:
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    mapping = gguf.get_tensor_name_map(by_name[arch], blocks)
    return lambda key: mapping.get_name(key, try_suffixes=(".weight", ".bias"))


def tensor_type(shape: tuple[int, ...], outtype: str) -> str:
    if len(shape) < 2 or outtype == "f32":
        return "F32"
    if outtype == "q8_0" and shape[-1] % 32:
        return "F16"
    return _TYPES[outtype]


def encode(values: np.ndarray, qtype: str) -> np.ndarray:
    """`values` (float32) in GGML type `qtype`, as the bytes or array gguf-py writes."""
    import gguf
    import numpy as np

    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F32":
        return values
    if qtype == "F16":
        return values.astype(np.float16)
    return gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, qtype))


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)]
    count = 1
    for dim in shape:
        count *= dim
    return count // block * size


def plan_tensors(state: dict[str, torch.Tensor], config: dict[str, Any], arch: str, outtype: str) -> list[Planned]:
    name_of = tensor_name_map(arch, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings", False))
    plan = []
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        name = name_of(key)
        if name is None:
            raise InvalidInput(f"The weight {key!r} has no GGUF name for a {arch} model: this model cannot be "
                               "exported to GGUF.")
        shape = tuple(tensor.shape)
        plan.append(Planned(name, key, shape, tensor_type(shape, outtype)))
    return plan


def _values(state: dict[str, torch.Tensor], item: Planned, config: dict[str, Any], permute: bool) -> np.ndarray:
    values = state[item.source].detach().float().cpu().numpy()
    if permute and item.name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = int(config["num_attention_heads"])
        if item.name.endswith("attn_k.weight"):
            heads = int(config.get("num_key_value_heads") or heads)
        values = permute_qk(values, heads)
    return values


def _rope(config: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    return theta, str(rope.get("rope_type", rope.get("type", "default"))), rope


def add_hparams(writer: Any, config: dict[str, Any], what: str) -> None:
    """The `<arch>.*` keys convert_hf_to_gguf writes for llama and qwen2."""
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, rope_type, rope = _rope(config)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise InvalidInput(f"{what} uses {rope_type!r} rope scaling, which GGUF export does not write "
                           "(it writes default and linear rope).")


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types for `tokenizer.ggml.*`, as convert_hf_to_gguf's `get_vocab_base`."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special if i in decoder else False
            if special or (token.startswith("<|") and token.endswith("|>")):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                token = token.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(token)
    return tokens, types


def pre_tokenizer(tokenizer: Any, arch: str) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    return PRE_TOKENIZERS.get(digest, _DEFAULT_PRE.get(arch, "default"))


def add_tokenizer(writer: Any, folder: Path, vocab_size: int, arch: str) -> None:
    import gguf
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"Cannot read the model's tokenizer ({type(exc).__name__}): GGUF export needs "
                           "tokenizer.json.") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str()).get("model", {}).get("type") != "BPE":
        raise InvalidInput("GGUF export writes BPE tokenizers (tokenizer.json with a BPE model); this model's is not.")
    tokens, types = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, arch))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    probe = tokenizer.encode("a")  # what the tokenizer adds around a text, llama.cpp's add_bos/add_eos
    special.add_special_token.setdefault("bos", bool(probe) and probe[0] == tokenizer.bos_token_id)
    special.add_special_token.setdefault("eos", bool(probe) and probe[-1] == tokenizer.eos_token_id)
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def sweep_incomplete(folder: Path, name: str) -> None:
    """Temporary files of exports to `name` whose process was killed (SIGKILL skips the cleanup)."""
    for entry in folder.glob(f".{name}.*.incomplete"):
        try:
            pid = int(entry.name[len(name) + 2:].split("-")[0])
        except ValueError:
            continue  # not a name this module writes
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            entry.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def write_atomically(output: Path, write: Callable[[Path], None]) -> int:
    """Run `write(tmp)` for a temporary file beside `output`, then rename it into place; on any
    error or interrupt the temporary file goes and `output` is untouched. Returns the size."""
    sweep_incomplete(output.parent, output.name)
    tmp = output.with_name(f".{output.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.incomplete")
    try:
        try:
            write(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, output)
        except OSError as exc:
            raise disk_error(exc, f"writing {output.name}") from None
        except Exception as exc:  # numpy's tofile reports a full disk as its own OSError subclass or text
            if is_disk_full(exc):
                raise disk_error(OSError(28, str(exc)), f"writing {output.name}") from None
            raise
    finally:
        tmp.unlink(missing_ok=True)
    return output.stat().st_size


def write_gguf(tmp: Path, writer: Any, plan: list[Planned], values: Callable[[Planned], np.ndarray],
               progress: Callable[[Progress], None] | None, label: str) -> None:
    """Tensor infos first, then each tensor converted and written in turn (one in memory at a time)."""
    import gguf
    import numpy as np

    for item in plan:
        writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), nbytes(item.shape, item.qtype),
                               raw_dtype=getattr(gguf.GGMLQuantizationType, item.qtype))
    writer.write_header_to_file(path=tmp)
    try:
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    except BaseException:
        writer.close()
        raise
    total = sum(nbytes(p.shape, p.qtype) for p in plan)
    done = 0
    try:
        for item in plan:
            data = encode(values(item), item.qtype)
            writer.write_tensor_data(data)
            done += data.nbytes
            if progress:
                progress(Progress(label, done, total))
    finally:
        writer.close()


def _source(store: Store, model: str, adapter: str | None, rev: str | None) -> tuple[Path, Path | None, str]:
    """(the model folder, the adapter folder or None, the commit exported)."""
    if adapter is None:
        commit = store.head(model, rev or "main")
        return (store.model_dir(model) if rev is None else store.snapshot(model, commit)), None, commit
    info = store.resolve_adapter(model, adapter, rev)
    adapter_dir = store.snapshot(model, info.tip, "adapter")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise InvalidInput(f"Adapter {info.name!r} has no trained weights at {info.tip[:7]}: train it first "
                           f"(`hyprstream lora train start {info.name}`).")
    return store.model_dir(model), adapter_dir, info.tip


def _state(folder: Path, adapter_dir: Path | None) -> dict[str, torch.Tensor]:
    """The weights in float32, the adapter merged in memory (merge_and_unload, as `lora merge`)."""
    from hyprstream_tui.engine.train.loop import load_base_model, peft_model

    model = load_base_model(folder, dtype="float32")
    if adapter_dir is not None:
        model = peft_model(model, adapter_dir, seed=0, trainable=False).merge_and_unload()
    return dict(model.state_dict())


def export_model_gguf(store: Store, spec: str, output: Path | str, *, outtype: str = "f16", rev: str | None = None,
                      force: bool = False, progress: Callable[[Progress], None] | None = None) -> GGUFExported:
    """Write MODEL[:ADAPTER] as one GGUF model file (the adapter merged in memory; nothing is stored).
    `rev` picks the adapter's checkpoint, or the model's commit when no adapter is named."""
    import gguf

    from hyprstream_tui.engine.sources import parse_spec

    check_outtype(outtype)
    parsed = parse_spec(spec)
    rev = rev or parsed.rev
    path = check_output(store, output, force=force)
    folder, adapter_dir, commit = _source(store, parsed.model, parsed.adapter, rev)
    config = json.loads((folder / "config.json").read_text())
    arch, permute = gguf_arch(config, f"Model {parsed.model!r}")
    writer = gguf.GGUFWriter(None, arch)  # metadata first: a model it cannot describe is refused before loading
    writer.add_type("model")
    writer.add_name(str(parsed))
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, config, f"Model {parsed.model!r}")
    add_tokenizer(writer, folder, int(config["vocab_size"]), arch)
    if progress:
        progress(Progress(f"{path.name}: loading", 0, 0))
    state = _state(folder, adapter_dir)
    plan = plan_tensors(state, config, arch, outtype)
    size = write_atomically(path, lambda tmp: write_gguf(tmp, writer, plan,
                                                         lambda item: _values(state, item, config, permute),
                                                         progress, path.name))
    return GGUFExported(path, commit, size, outtype, len(plan))
