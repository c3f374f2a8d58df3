"""Generation: `/v1/generate` (continue a prompt) and the OpenAI-compatible `/v1/chat/completions`
(streamed as server-sent events on request), with a base model or a generative run's adapter.
Prompts are rendered and counted, and replies counted, off the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from finegrain.errors import FinegrainError
from finegrain.serve.engine import GenerationWork
from finegrain.serve.logs import log
from finegrain.serve.schemas import ChatResponse, GenerateResponse, generation_requests
from finegrain.serve.security import error_body
from finegrain.serve.service import ERRORS, Service, limit_error, off_loop


def generation_router(service: Service) -> APIRouter:
    """The two generation routes, their bodies bounded by `--max-new-tokens`."""
    router = APIRouter(tags=["generation"])
    settings, engine, metrics = service.settings, service.engine, service.metrics
    GenerateBody, ChatBody = generation_requests(settings.max_new_tokens)

    def generation_work(model: str, prompt: str, max_new_tokens: int, options: dict[str, Any], prompt_param: str) -> tuple[GenerationWork, int]:
        if max_new_tokens > settings.max_new_tokens:
            raise limit_error(prompt_param.replace("prompt", "max_new_tokens").replace("messages", "max_tokens"),
                              f"{max_new_tokens} is over the limit of {settings.max_new_tokens} (--max-new-tokens)")
        tokenizer = engine.model_of(model)[1]
        prompt_tokens = len(tokenizer.encode(prompt))  # a ChatPrompt's own ids: see `chat`
        if prompt_tokens > settings.max_tokens_per_text:
            raise limit_error(prompt_param, f"{prompt_tokens} tokens, over the limit of {settings.max_tokens_per_text} (--max-tokens-per-text)")
        context = engine.model_of(model)[0].llama.config.max_position_embeddings
        if prompt_tokens + max_new_tokens > context:
            raise limit_error(prompt_param, f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the model's context of {context}")
        return GenerationWork(prompt, model, max_new_tokens, options), prompt_tokens

    async def generate_text(body) -> GenerateResponse:
        """Continue a prompt with a base model (or a generative run)."""
        started = time.monotonic()
        name = service.pick(body.model, "/v1/generate")
        options = {"temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
                   "repetition_penalty": body.repetition_penalty, "stop": tuple(body.stop), "seed": body.seed}
        tokenizer = engine.model_of(name)[1]
        service.check_length(tokenizer, "prompt", body.prompt)
        work, prompt_tokens = await off_loop(generation_work, name, body.prompt, body.max_new_tokens, options, "prompt")
        text = await service.submit(generation_key(work, False), work, 1, started)
        completion, reason = await off_loop(finish, tokenizer, text, body.max_new_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
        return GenerateResponse(model=name, text=text, finish_reason=reason, usage=usage)

    async def chat(body, request: Request):
        """OpenAI-compatible chat completion; `stream: true` answers with server-sent events."""
        started = time.monotonic()
        name = service.pick(body.model, "/v1/chat/completions")
        tokenizer = engine.model_of(name)[1]
        messages = [m.model_dump() for m in body.messages]
        service.check_length(tokenizer, "messages", "".join(m["content"] for m in messages))
        max_tokens = body.max_completion_tokens or body.max_tokens or min(settings.max_new_tokens, 256)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        options = {"temperature": body.temperature, "top_p": body.top_p, "stop": stop, "seed": body.seed}

        def prepare() -> tuple[GenerationWork, int]:
            # The messages' text stays text: a message spelling "<|im_end|>" forges no turn (ChatPrompt).
            try:
                prompt = tokenizer.chat_prompt(messages)
            except FinegrainError as exc:
                raise limit_error("messages", str(exc)) from None
            return generation_work(name, prompt, max_tokens, options, "messages")

        work, prompt_tokens = await off_loop(prepare)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.stream:
            text = await service.submit(generation_key(work, False), work, 1, started)
            completion, reason = await off_loop(finish, tokenizer, text, max_tokens)
            return ChatResponse(
                id=completion_id, created=created, model=name,
                choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
            )

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        work.on_piece = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        job = service.enqueue(generation_key(work, True), work, 1)
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved here, reported below

        def chunk(delta: dict, reason: str | None = None, usage: dict | None = None) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": reason}]}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            deadline = started + settings.timeout
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    done, _ = await asyncio.wait({getter, job.future}, timeout=max(0.0, deadline - time.monotonic()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield chunk({"content": getter.result()})
                        continue
                    getter.cancel()
                    if not done:
                        metrics.rejected.inc("timeout")
                        yield f"data: {error_body(504, f'no answer within {settings.timeout:g} s (--timeout)', 'timeout').decode()}\n\n"
                        return
                    while not pieces.empty():
                        yield chunk({"content": pieces.get_nowait()})
                    if job.future.exception() is not None:
                        log("stream_failed", logging.ERROR, exc_info=job.future.exception())
                        yield f"data: {error_body(500, 'generation failed', 'server_error').decode()}\n\n"
                        return
                    completion, reason = await off_loop(finish, tokenizer, job.future.result(), max_tokens)
                    yield chunk({}, reason)
                    if body.stream_options and body.stream_options.include_usage:
                        yield chunk({}, usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                               "total_tokens": prompt_tokens + completion})
                    yield "data: [DONE]\n\n"
                    return
            finally:
                job.cancelled = True  # a client that went away stops the generation at its next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # FastAPI reads a body's type from the annotation: the bodies carry --max-new-tokens in their schema.
    generate_text.__annotations__["body"] = GenerateBody
    chat.__annotations__["body"] = ChatBody
    router.add_api_route("/v1/generate", generate_text, methods=["POST"], response_model=GenerateResponse, responses=ERRORS)
    router.add_api_route(
        "/v1/chat/completions", chat, methods=["POST"], response_model=ChatResponse,
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
    )
    return router


def generation_key(work: GenerationWork, stream: bool) -> tuple:
    """The batching key: greedy requests with equal options share a batch; sampled ones and streams run alone."""
    if stream or work.options.get("temperature", 0) > 0:
        return ("generate", work.model, uuid.uuid4().hex)
    return ("generate", work.model, work.max_new_tokens, tuple(sorted((k, str(v)) for k, v in work.options.items())))


def finish(tokenizer: Any, text: str, max_new_tokens: int) -> tuple[int, str]:
    """The reply's tokens and why it ended ("length" at the limit, else "stop"). Runs off the event loop."""
    completion = len(tokenizer.encode(text, add_special_tokens=False))
    return completion, "length" if completion >= max_new_tokens else "stop"
