"""The generation and server bodies: `/v1/generate`, `/v1/chat/completions`, `/v1/models` and
errors. Each task's own request and response bodies live with the task (its `Endpoint`), built
from the same pieces (`finegrain.tasks.schemas`): strict requests, finite numbers, non-blank
texts. `max_new_tokens` is bounded by `--max-new-tokens` (`generation_requests`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from finegrain.tasks.schemas import ModelName, NonEmptyText, StopText, Strict, Text, whole


class Sampling(Strict):
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 decodes greedily.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: whole(0, 2**32 - 1) | None = None


class GenerateRequest(Sampling):
    prompt: NonEmptyText
    model: ModelName | None = Field(None, description="A base model or generative run (see /v1/models).")
    max_new_tokens: whole(1) = Field(32, description="At most --max-new-tokens.")
    top_k: whole(1, 1_000_000) | None = None
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    stop: list[StopText] = Field(default_factory=list, max_length=4)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    model: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


class Message(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Sampling):
    """The subset of OpenAI's chat completion request that finegrain honours; other fields are refused."""

    model: ModelName | None = None
    messages: list[Message] = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    max_tokens: whole(1) | None = None
    max_completion_tokens: whole(1) | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: whole(1, 1) = Field(1, description="Only 1.")
    user: Annotated[Text, Field(max_length=256)] | None = None


def generation_requests(limit: int) -> tuple[type[GenerateRequest], type[ChatRequest]]:
    """The generation request bodies with `max_new_tokens` (and chat's `max_tokens`) at most `limit`,
    the server's `--max-new-tokens`, in validation and in the schema alike; the default is 32 or the limit."""

    class GenerateRequest(globals()["GenerateRequest"]):  # the name the schema shows
        max_new_tokens: whole(1, limit) = Field(min(32, limit), description=f"At most {limit} (--max-new-tokens).")

    class ChatRequest(globals()["ChatRequest"]):
        max_tokens: whole(1, limit) | None = Field(None, description=f"At most {limit} (--max-new-tokens).")
        max_completion_tokens: whole(1, limit) | None = Field(None, description=f"At most {limit} (--max-new-tokens).")

    return GenerateRequest, ChatRequest


class ChatChoice(BaseModel):
    index: int
    message: dict[str, str]
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "finegrain"
    task: str
    endpoint: str
    base: str | None = None
    labels: list[str] | None = None
    multi_label: bool | None = None
    adapter_bytes: int | None = Field(None, description="Memory the run adds to its shared base.")
    parameter_bytes: int | None = Field(None, description="Memory of a base model's weights.")
    members: list[str] | None = Field(None, description="An ensemble's member runs, whose probabilities it averages.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    error: dict[str, Any]
