"""The in-process engine: loading, sampling, generation. Imports torch lazily.

Public entry points (import them from their modules; importing this package stays cheap):
- `engine.Engine`: the facade (load by `MODEL[:ADAPTER[@REV]]`, generate / chat in worker
  threads, events to a callback, cancel, LRU of loaded models);
- `events`: the frozen dataclasses it reports (TokenDelta, GenerationDone, GenerationError, ...);
- `params.SamplingParams`, `loader.LoadOptions`: validated, frozen settings;
- `tiny`: tiny random models for tests and the demo. (The `infer` and `chat` verbs are cli/generate.py.)
"""
