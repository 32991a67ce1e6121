"""A small client for a hyprstream (or any OpenAI-compatible) server, on plain httpx.

    client = Client("http://127.0.0.1:8080", api_key=None)
    client.models()                                  # ["tiny", "tiny:qa", ...]
    client.generate(model="tiny", prompt="Once", max_tokens=20).text
    client.chat(model="tiny:qa", messages=[{"role": "user", "content": "hi"}]).text
    for delta in client.stream(model="tiny", messages=[...]):  # text deltas as they come
        print(delta, end="")

Failures are HyprErrors carrying the server's own message: 400/413 InvalidInput, 401 InvalidInput
(about the key), 404 NotFound, 503 ServerBusy, an unreachable server ServerUnavailable. Closing a
`stream(...)` (or `chunks(...)`) iterator early closes the connection, which cancels the generation
on the server.
Imports neither torch nor the server.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Generator, Iterator, Mapping, Sequence

import httpx

from hyprstream_tui.errors import Conflict, HubError, HyprError, InvalidInput, NotFound


class ServerBusy(Conflict):
    """The server's queue is full (503): try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerUnavailable(HubError):
    """The server could not be reached, or failed on its side (5xx)."""


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A whole answer: its text, why it ended ("stop" or "length"), and token counts."""

    text: str
    finish_reason: str | None
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __str__(self) -> str:
        return self.text


class Client:
    """`Client(base_url, api_key=None)`; base_url with or without the trailing `/v1`."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 600.0) -> None:
        root = base_url.rstrip("/")
        root = root[:-3] if root.endswith("/v1") else root
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = root
        self._http = httpx.Client(base_url=root, headers=headers,
                                  timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- API -----------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def models(self) -> list[str]:
        """Model ids the server answers for: `model` and `model:adapter`."""
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    def generate(self, *, model: str, prompt: str, temperature: float | None = None,
                 top_p: float | None = None, max_tokens: int | None = None,
                 stop: Sequence[str] | None = None, seed: int | None = None,
                 **extra: Any) -> Completion:
        """Continue `prompt` (no chat template)."""
        body = _body(model=model, prompt=prompt, temperature=temperature, top_p=top_p,
                     max_tokens=max_tokens, stop=stop, seed=seed, **extra)
        data = self._json("POST", "/v1/completions", body)
        return _completion(data, data["choices"][0]["text"])

    def chat(self, *, model: str, messages: Sequence[Mapping[str, str]],
             temperature: float | None = None, top_p: float | None = None,
             max_tokens: int | None = None, stop: Sequence[str] | None = None,
             seed: int | None = None, **extra: Any) -> Completion:
        """Answer the conversation `messages` (the last one from the user)."""
        body = _body(model=model, messages=list(messages), temperature=temperature, top_p=top_p,
                     max_tokens=max_tokens, stop=stop, seed=seed, **extra)
        data = self._json("POST", "/v1/chat/completions", body)
        return _completion(data, data["choices"][0]["message"]["content"])

    def stream(self, *, model: str, prompt: str | None = None,
               messages: Sequence[Mapping[str, str]] | None = None, **params: Any) -> Iterator[str]:
        """Text deltas of a completion (`prompt`) or a chat answer (`messages`) as they arrive."""
        chat = messages is not None
        with contextlib.closing(self.chunks(model=model, prompt=prompt, messages=messages, **params)) as chunks:
            for data in chunks:
                for choice in data.get("choices", []):
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        yield text

    def chunks(self, *, model: str, prompt: str | None = None,
               messages: Sequence[Mapping[str, str]] | None = None,
               **params: Any) -> Generator[dict[str, Any], None, None]:
        """The server's streamed chunks (OpenAI `text_completion` or `chat.completion.chunk` objects,
        each with its `choices` and their `finish_reason`) as they arrive."""
        if (prompt is None) == (messages is None):
            raise InvalidInput("Give either prompt= or messages= to stream.")
        chat = messages is not None
        inputs: dict[str, Any] = {"messages": list(messages)} if messages is not None else {"prompt": prompt}
        body = _body(model=model, stream=True, **params, **inputs)
        path = "/v1/chat/completions" if chat else "/v1/completions"
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                for data in _sse(response.iter_lines()):
                    if "error" in data:
                        raise _error_from(500, data)
                    yield data
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from None

    # ---- plumbing ------------------------------------------------------------------------------
    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as exc:
            raise _unreachable(self.base_url, exc) from None
        if response.status_code >= 400:
            raise _error(response)
        return response.json()


def _body(**fields: Any) -> dict[str, Any]:
    body = {k: v for k, v in fields.items() if v is not None}
    if "stop" in body:
        body["stop"] = list(body["stop"]) if not isinstance(body["stop"], str) else body["stop"]
    return body


def _completion(data: dict[str, Any], text: str) -> Completion:
    usage = data.get("usage") or {}
    return Completion(text=text, finish_reason=data["choices"][0].get("finish_reason"),
                      model=data.get("model", ""), prompt_tokens=usage.get("prompt_tokens", 0),
                      completion_tokens=usage.get("completion_tokens", 0))


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def _error(response: httpx.Response) -> HyprError:
    try:
        data = response.json()
    except ValueError:
        data = {}
    error = _error_from(response.status_code, data if isinstance(data, dict) else {})
    if isinstance(error, ServerBusy):
        try:
            error.retry_after = float(response.headers.get("retry-after", ""))
        except ValueError:
            pass
    return error


def _error_from(status: int, data: dict[str, Any]) -> HyprError:
    raw = data.get("error")
    error = raw if isinstance(raw, dict) else {}
    message = error.get("message") or f"The server answered HTTP {status}."
    if status == 401:
        return InvalidInput(f"{message} (check --api-key / HYPRSTREAM_API_KEY)")
    if status == 404:
        return NotFound(message)
    if status in (429, 503):
        return ServerBusy(message)
    if 400 <= status < 500:
        return InvalidInput(message)
    return ServerUnavailable(message)


def _unreachable(url: str, exc: Exception) -> ServerUnavailable:
    return ServerUnavailable(f"Cannot reach the server at {url} ({type(exc).__name__}): is "
                             "`hyprstream serve` running there?")
