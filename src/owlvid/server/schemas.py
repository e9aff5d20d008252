"""Request models (pydantic) and response builders for the OpenAI-compatible API.

Requests are validated strictly enough that a malformed body is a 422 with the offending field. Fields
the model does not declare are kept (`model_extra`) for `server.requests`, which refuses with a 400 naming
it every top-level field that owlvid cannot honour (docs/serving.md, "Request fields").
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ImageURLPart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Lenient):
    url: str


class VideoURLPart(_Lenient):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImageURLPart | VideoURLPart, Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # NaN and infinity are refused (JSON parsers here accept them); tiny values are handled by SamplingParams
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # vLLM extension; 0 or -1 disable it
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    min_tokens: int | None = Field(None, ge=0)  # vLLM extension: no end token or stop string before this
    ignore_eos: bool | None = None  # vLLM extension: end tokens are ordinary tokens (benchmarking)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM-compatible per-request media controls
    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    # accepted for compatibility; anything but the neutral value is refused with 400
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


# -- responses ---------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, created: int, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
          *, with_usage_field: bool = False) -> dict[str, Any]:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage_field:
        out["usage"] = None
    return out


def usage_chunk(cid: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def model_card(model_id: str, root: str, max_model_len: int | None, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "owlvid", "root": root,
            "parent": None, "max_model_len": max_model_len}
