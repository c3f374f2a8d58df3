"""The task endpoints, one per task with an `Endpoint` (finegrain.tasks.TASKS), registered in one
loop: the task's request body is validated, its inputs read, checked against the command-line
limits, tokenized off the event loop and queued for the batching thread."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter

from finegrain.errors import FinegrainError
from finegrain.serve.logs import log
from finegrain.serve.service import ERRORS, ServeError, Service, all_finite, input_error, limit_error, off_loop
from finegrain.tasks import TASKS, ServedTask
from finegrain.tasks.schemas import with_max_items


def task_router(service: Service) -> APIRouter:
    """The routes of the tasks whose runs the registry serves, in the task table's order."""
    router = APIRouter(tags=["tasks"])
    served = set(service.registry.endpoints())
    for task in TASKS.values():
        if task.endpoint is not None and task.endpoint.path in served:
            add_task_route(router, service, task)  # type: ignore[arg-type]
    return router


def add_task_route(router: APIRouter, service: Service, task: type[ServedTask]) -> None:
    """POST `task.endpoint.path`: the task's request body → one prediction per input, in its response body."""
    endpoint = task.endpoint
    assert endpoint is not None

    async def answer_request(body: Any) -> Any:
        inputs, texts = endpoint.read(body)
        name, predictions = await answer(service, endpoint.path, body.model, endpoint.field, inputs, texts)
        return endpoint.response(model=name, predictions=predictions)

    # FastAPI reads the body's type from the annotation; the request carries --max-texts in its schema.
    answer_request.__annotations__["body"] = with_max_items(endpoint.request, endpoint.field, service.settings.max_texts)
    router.add_api_route(
        endpoint.path, answer_request, methods=["POST"], response_model=endpoint.response, responses=ERRORS,
        name=endpoint.path.rsplit("/", 1)[-1], description=endpoint.summary,
    )


async def answer(service: Service, endpoint: str, model: str | None, field: str, inputs: list,
                 texts: list[tuple[str, str]]) -> tuple[str, list]:
    """The run answering `endpoint` and its predictions, one per input.

    Args:
        field: the request field that holds the inputs ("texts", "items").
        inputs: what the task's `examples_from_inputs` takes (texts, or dicts of the items).
        texts: every string of the inputs with its param ("items.0.context"), for the token limit.
    """
    started = time.monotonic()
    name = service.pick(model, endpoint)
    settings = service.settings
    if len(inputs) > settings.max_texts:
        raise limit_error(field, f"{len(inputs)} {field}, over the limit of {settings.max_texts} per request (--max-texts)")
    run = service.registry.runs[name]
    for param, text in texts:
        service.check_length(run.tokenizer, param, text)
    items = await off_loop(encode_inputs, run, settings.max_tokens_per_text, field, inputs, texts)
    predictions = await service.submit(("task", name), items, len(items), started)
    if not all_finite(predictions):
        log("non_finite_output", logging.ERROR, model=name)
        raise ServeError(500, f"model '{name}' gave a NaN or infinite score: its adapter or base model is damaged; "
                              "check the run (finegrain evaluate) and train it again")
    return name, predictions


def encode_inputs(run: Any, max_tokens: int, field: str, inputs: list, texts: list[tuple[str, str]]) -> list:
    """The task's encoded items for `inputs`, after the token limit. Runs off the event loop."""
    count_tokens(run.tokenizer, max_tokens, texts)
    try:
        examples = run.task.examples_from_inputs(inputs, run.config.data)
        items = run.task.encode(run.tokenizer, examples, run.config.data.max_length)
    except FinegrainError as exc:
        raise input_error(exc, field) from None
    if any(not item.input_ids for item in items):
        raise limit_error(field, "an input encodes to no tokens; send some text")
    return items


def count_tokens(tokenizer: Any, max_tokens: int, fields: list[tuple[str, str]]) -> None:
    """Refuse any (param, text) pair over --max-tokens-per-text. Runs off the event loop."""
    encoded = tokenizer.encode_batch([text for _, text in fields], add_special_tokens=False)
    for (param, _), ids in zip(fields, encoded):
        if len(ids) > max_tokens:
            raise limit_error(param, f"{len(ids)} tokens, over the limit of {max_tokens} tokens per text (--max-tokens-per-text)")
