"""The one exception of `engine.native`, importable without torch (the tokenizer and the
checkpoint readers raise it too)."""


class Unsupported(Exception):
    """This model needs transformers' own classes (the message says why)."""


__all__ = ["Unsupported"]
