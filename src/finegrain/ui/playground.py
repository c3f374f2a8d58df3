"""The playground: a run's predictions for what a person types, made by the server's own code.

A run is loaded by `finegrain.serve.models.ModelRegistry` and answered by
`finegrain.serve.engine.Engine`, the path a `finegrain serve` request takes after its batching
queue: the task's request body validated by its schema, its inputs encoded under the server's
limits (`encode_inputs`), the engine's forward passes and the task's decoding. So what the
playground shows is what the server would answer. The last few runs used stay loaded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from finegrain.errors import FinegrainError
from finegrain.serve.batching import Job
from finegrain.serve.engine import Engine, GenerationWork
from finegrain.serve.metrics import Metrics
from finegrain.serve.models import ModelRegistry
from finegrain.serve.routers.tasks import encode_inputs
from finegrain.serve.service import ServeError
from finegrain.serve.settings import ServeSettings
from finegrain.tasks import task_class


def describe(config) -> dict[str, Any]:
    """What the page needs to build the run's input form: the request field ("texts", "items") or
    "messages" for a generative run."""
    endpoint = task_class(config.task).endpoint
    return {"task": config.task, "field": endpoint.field if endpoint is not None else "messages"}


class Playground:
    """Loaded runs (the last `keep` used) and the one lock their predictions run under.

    Args:
        settings: the limits of `finegrain serve`'s defaults (tokens per text, new tokens).
        keep: how many runs stay loaded.
    """

    def __init__(self, settings: ServeSettings | None = None, keep: int = 2):
        self.settings = settings or ServeSettings()
        self.keep = keep
        self._loaded: OrderedDict[Path, tuple[ModelRegistry, Engine]] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, run_dir: Path, body: dict[str, Any]) -> dict[str, Any]:
        """The run's prediction for `body`: `{"input": ...}` in the shape of one element of the
        task's request field (a text, or a QA/relation item), or `{"messages": [...]}` for a
        generative run. FinegrainError (a 422 for the page) for input the task refuses."""
        with self._lock:
            registry, engine = self._load(run_dir)
            name, run = next(iter(registry.runs.items()))
            if run.generative:
                return {"reply": self._chat(engine, name, run, body)}
            return {"prediction": self._predict(engine, name, run, body)}

    def _load(self, run_dir: Path) -> tuple[ModelRegistry, Engine]:
        key = run_dir.resolve()
        if key not in self._loaded:
            registry = ModelRegistry([(run_dir.name or "run", run_dir)])
            registry.load()
            self._loaded[key] = (registry, Engine(registry, Metrics()))
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return self._loaded[key]

    def _predict(self, engine: Engine, name: str, run, body: dict[str, Any]) -> Any:
        endpoint = run.task.endpoint
        try:
            request = endpoint.request.model_validate({endpoint.field: [body.get("input")]})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"][2:]) or "input"
            raise FinegrainError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        inputs, texts = endpoint.read(request)
        try:
            items = encode_inputs(run, self.settings.max_tokens_per_text, endpoint.field, inputs, texts)
        except ServeError as exc:
            raise FinegrainError(exc.message) from None
        return engine.run(("task", name), [Job(("task", name), items, len(items))])[0][0]

    def _chat(self, engine: Engine, name: str, run, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise FinegrainError("messages: a list of {role: user|assistant|system, content: text}")
        prompt = run.tokenizer.chat_prompt(messages)
        if len(run.tokenizer.encode(prompt)) > self.settings.max_tokens_per_text:
            raise FinegrainError(f"messages: over {self.settings.max_tokens_per_text} tokens; start a new conversation")
        work = GenerationWork(prompt, name, min(run.config.instruct.max_new_tokens, self.settings.max_new_tokens), {"temperature": 0.0})
        return engine.run(("generate", name), [Job(("generate", name), work)])[0]

