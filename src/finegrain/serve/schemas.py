"""Request and response bodies. Requests are strict: an unknown field, a wrong type or a value out
of range is a 422 that names the field. Limits set on the command line (texts per request, tokens
per text, new tokens) are checked by the endpoints, whose 422 names the flag too.

The OpenAPI schema says what the server accepts, so that a client generated from it (or a fuzzer
such as schemathesis) is not refused what the schema allows: texts must hold a non-space
character (pattern `\\S`), integers may be sent as integer-valued numbers (`2.0`; JSON Schema's
"integer" allows them), and `max_new_tokens` is bounded by `--max-new-tokens` (`generation_requests`).
Responses hold finite numbers only: a NaN (a damaged adapter) fails validation instead of
becoming `null`, against the schema."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field


def _encodable(value: str) -> str:
    # JSON allows lone surrogates ("\ud800"); the tokenizer cannot encode them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate; send valid Unicode text") from None
    return value


def _not_blank(value: str) -> str:
    # The same test as the schema's pattern, with Python's idea of a space (what `str.split` uses).
    if not re.search(r"\S", value):
        raise ValueError("holds no text, only spaces; send some words")
    return value


def _whole_number(value: Any) -> Any:
    # JSON Schema's "integer" is any number with no fractional part, 2.0 included.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def whole(ge: int, le: int | None = None) -> Any:
    """An integer in [ge, le] that may arrive as an integer-valued number; the bounds come first,
    on the integer itself, so that the schema shows them as minimum and maximum."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_whole_number)]


Finite = Annotated[float, Field(allow_inf_nan=False)]
Text = Annotated[str, AfterValidator(_encodable)]
# The pattern is for the schema; `_not_blank` checks it, with a message that says what to do.
NonEmptyText = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": r"\S"}), AfterValidator(_encodable), AfterValidator(_not_blank)]
StopText = Annotated[str, Field(min_length=1), AfterValidator(_encodable)]
ModelName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_encodable)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextsRequest(Strict):
    """The body of `/v1/classify`, `/v1/regress` and `/v1/ner`."""

    texts: list[NonEmptyText] = Field(min_length=1, description="The texts (at most --max-texts).")
    model: ModelName | None = Field(None, description="The run to use (see /v1/models); optional when one serves this endpoint.")


class Prediction(BaseModel):
    label: str | list[str] = Field(description="The label; a list of labels for a multi-label run.")
    probabilities: dict[str, Finite]


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]


class Value(BaseModel):
    value: Finite = Field(description="The predicted number, in the units of the training targets.")


class RegressResponse(BaseModel):
    model: str
    predictions: list[Value]


class Entity(BaseModel):
    type: str
    start: int = Field(description="Character offset of the first character in the text.")
    end: int = Field(description="Character offset just past the last character (exclusive).")
    text: str
    words: list[int] = Field(description="[first, end) word indices.")
    score: Finite = Field(description="The mean probability of the entity's word tags.")


class Tagging(BaseModel):
    words: list[str]
    tags: list[str] = Field(description="One tag per word, in the run's scheme (BIO, BIOES or IO).")
    entities: list[Entity]
    truncated_words: int = Field(description="Words past the run's data.max_length, tagged O.")


class NerResponse(BaseModel):
    model: str
    predictions: list[Tagging]


Span = Annotated[list[whole(0)], Field(min_length=2, max_length=2, description="[start, end) character offsets.")]


class RelationItem(Strict):
    text: NonEmptyText = Field(description="The text, without <e1>/<e2> markers: the spans mark the entities.")
    head: Span
    tail: Span


class RelationRequest(Strict):
    items: list[RelationItem] = Field(min_length=1, description="Texts with two marked entities (at most --max-texts).")
    model: ModelName | None = Field(None, description="The relation run to use (see /v1/models).")


class Mention(BaseModel):
    start: int
    end: int = Field(description="Exclusive.")
    text: str


class Relation(BaseModel):
    label: str = Field(description="The relation type, or the run's no-relation label.")
    probabilities: dict[str, Finite]
    head: Mention
    tail: Mention


class RelationResponse(BaseModel):
    model: str
    predictions: list[Relation]


class QAItem(Strict):
    question: NonEmptyText
    context: NonEmptyText


class QARequest(Strict):
    items: list[QAItem] = Field(min_length=1, description="Questions about contexts (at most --max-texts).")
    model: ModelName | None = Field(None, description="The QA run to use (see /v1/models).")


class Answer(BaseModel):
    answer: str = Field(description="The answer span of the context.")
    start: int | None = Field(description="Its character offset in the context.")
    end: int | None = Field(description="Character offset just past it (exclusive).")
    score: Finite


class QAResponse(BaseModel):
    model: str
    predictions: list[Answer]


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
    user: Annotated[str, Field(max_length=256), AfterValidator(_encodable)] | None = None


def task_requests(max_texts: int) -> tuple[type[TextsRequest], type[RelationRequest], type[QARequest]]:
    """The task request bodies with `--max-texts` as the schema's `maxItems`. The endpoint checks
    it, with a message that names the flag; pydantic's would not."""
    most = {"maxItems": max_texts}

    class TextsRequest(globals()["TextsRequest"]):  # the name the schema shows
        texts: list[NonEmptyText] = Field(min_length=1, json_schema_extra=most, description=f"The texts (at most {max_texts}, --max-texts).")

    class RelationRequest(globals()["RelationRequest"]):
        items: list[RelationItem] = Field(min_length=1, json_schema_extra=most,
                                          description=f"Texts with two marked entities (at most {max_texts}, --max-texts).")

    class QARequest(globals()["QARequest"]):
        items: list[QAItem] = Field(min_length=1, json_schema_extra=most, description=f"Questions about contexts (at most {max_texts}, --max-texts).")

    return TextsRequest, RelationRequest, QARequest


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    error: dict[str, Any]
