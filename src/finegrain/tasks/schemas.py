"""What request and response bodies are made of, and the text request the text tasks share.

Each task with an endpoint declares its own bodies (`Endpoint`, finegrain.tasks.base), built
from the pieces here; the server registers them as they are. Requests are strict: an unknown
field, a wrong type or a value out of range is a 422 that names the field. Limits set on the
command line (texts per request, tokens per text, new tokens) are checked by the server, whose
422 names the flag too.

The OpenAPI schema says what the server accepts, so that a client generated from it (or a fuzzer
such as schemathesis) is not refused what the schema allows: texts must hold a non-space
character (pattern `\\S`), integers may be sent as integer-valued numbers (`2.0`; JSON Schema's
"integer" allows them). Responses hold finite numbers only: a NaN (a damaged adapter) fails
validation instead of becoming `null`, against the schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.fields import FieldInfo


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


def read_texts(body: TextsRequest) -> tuple[list, list[tuple[str, str]]]:
    """A `TextsRequest`'s texts, as inputs and as (field, text) pairs for the token limit."""
    return body.texts, [(f"texts.{i}", text) for i, text in enumerate(body.texts)]


def with_max_items(request: type[BaseModel], field: str, max_items: int) -> type[BaseModel]:
    """`request` with `--max-texts` as its `field`'s `maxItems` in the schema (and in the field's
    description, "at most N, --max-texts"), under the same name, the one the schema shows. The
    server checks the limit itself, with a message that names the flag; pydantic's would not."""
    info = request.model_fields[field]
    description = (info.description or "").replace("at most --max-texts", f"at most {max_items}, --max-texts")
    limited = FieldInfo.merge_field_infos(info, json_schema_extra={"maxItems": max_items}, description=description)
    namespace = {"__annotations__": {field: info.annotation}, field: limited, "__module__": request.__module__}
    return type(request.__name__, (request,), namespace)
