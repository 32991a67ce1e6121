"""The tokenizer and chat template of a model folder, through `tokenizers` and jinja2 directly.

transformers' AutoTokenizer costs about 3.5 s to import and load here; `tokenizers` itself about
0.1 s. `NativeTokenizer` offers what the engine's inference path uses of a transformers tokenizer
(`encode`, `decode`, `chat_template`, `apply_chat_template`, `eos_token_id`) with the same
results: the same tokenizer.json, and the chat template rendered as transformers renders it (a
sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`, its `tojson`,
`raise_exception`, `strftime_now`, `dict` and `namespace`, and the special tokens as variables).
Tests compare both on every test model and on the real one.

`NativeTokenizer.read` raises `Unsupported` where the folder needs transformers (no
tokenizer.json, a template list, ...).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from hyprstream_tui.engine.native.unsupported import Unsupported

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(value: object) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class NativeTokenizer:
    def __init__(self, backend: Any, config: dict[str, Any], chat_template: str | None) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens_map = {name: token for name in SPECIAL
                                   if (token := _content(config.get(name))) is not None}
        eos = self.special_tokens_map.get("eos_token")
        self.eos_token = eos
        self.eos_token_id: int | None = backend.token_to_id(eos) if eos else None
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._compiled: tuple[str, Any] | None = None  # (source, template): recompiled on change

    @classmethod
    def read(cls, folder: Path) -> "NativeTokenizer":
        from tokenizers import Tokenizer

        if not (folder / "tokenizer.json").is_file():
            raise Unsupported("no tokenizer.json")
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text()) \
                if (folder / "tokenizer_config.json").is_file() else {}
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # malformed files: transformers' loader words the error
            raise Unsupported(f"tokenizer files: {type(exc).__name__}") from None
        if not isinstance(config, dict):
            raise Unsupported("tokenizer_config.json is not an object")
        if config.get("tokenizer_class") not in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
            raise Unsupported(f"tokenizer_class {config.get('tokenizer_class')!r}")
        if any(config.get(flag) for flag in ("add_bos_token", "add_eos_token")):
            raise Unsupported("add_bos_token/add_eos_token rewrite the post-processor")
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise Unsupported("a list of named chat templates")
        return cls(backend, config, template)

    # ---- what the engine uses -----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        text: str = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str | list[int]:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            self._compiled = (self.chat_template, _compile(self.chat_template))
        template = self._compiled[1]
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        text: str = template.render(messages=chat, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt,
                                          **self.special_tokens_map)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization, for tokenizers that ask for it."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _compile(source: str) -> Any:
    """The template in an environment like transformers' (sandboxed: templates are untrusted)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    class TemplateDict:
        """`dict(...)` in a template, without handing it the dict class itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        """Namespaces refuse underscore names, as transformers' do."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Namespace's own signature trick
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"underscore-prefixed namespace attribute {name!r}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = Namespace
    return env.from_string(source)


__all__ = ["NativeTokenizer"]
