"""The request body of `POST /v1/chat/completions` (OpenAI's chat-completions shape) and the server's limits.

Content parts: `{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}` (OpenAI's), and otterfast's own `{"type": "video", "frames": ["data:...", ...]}`: the frames of one short video.
Fields OpenAI has and otterfast does not use (frequency_penalty, user, ...) are ignored; `n` must be 1.
`ignore_eos: true` (vLLM's extension) makes the reply exactly max_tokens tokens long (benchmarks).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, MAX_ASPECT_RATIO
from .errors import ApiError


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 20 * 1024 * 1024  # a request's body; larger ones get 413 before they are parsed
    max_images: int = 16  # per request, every message and video frame counted
    # per image, from its header (data/images.py's size rule; its long side / short side limit is fixed there)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # PIL's decompression-bomb threshold; may only be lowered
    max_queue: int = 64  # requests waiting for the model; more get 503


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageUrl(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl | str


class VideoPart(_Strict):
    type: Literal["video"]
    frames: list[str] = Field(min_length=1)


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: exactly max_tokens new tokens (benchmarks: fixed-length replies)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(body: bytes) -> ChatRequest:
    """The body -> a ChatRequest, or ApiError(400) naming the first problem and where it is."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json") from e
    if not isinstance(obj, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as e:
        # A union (content: a string or a list of parts) reports one error per branch: the deepest one says
        # what is wrong (`messages.0.content.1: Input tag 'foo' ...`); branch names leave the path.
        err = max(e.errors(), key=lambda x: len(x["loc"]))
        where = ".".join(str(x) for x in err["loc"] if not _is_branch(x)) or None
        code = "missing_field" if err["type"] == "missing" else "invalid_value"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ApiError(400, f"{where}: {err['msg']}{more}" if where else err["msg"], code=code, param=where) from e


def _is_branch(loc_item) -> bool:
    """pydantic's names of union branches in an error's location (`str`, `list[...]`, `tagged-union[...]`)."""
    return isinstance(loc_item, str) and (loc_item in ("str", "int", "float", "bool", "none") or "[" in loc_item)
