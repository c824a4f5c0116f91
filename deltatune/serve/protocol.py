"""The OpenAI request bodies the server accepts, validated strictly, and OpenAI-style errors.

Strict types (a string is not a number), unknown fields refused (a client asking for `logprobs` or
`tools` learns they are unsupported instead of silently getting something else); OpenAI fields that
change nothing at their defaults (`n=1`, zero penalties, `user`, `best_of=1`, an empty `logit_bias`, a text
`response_format`, `store=false`), and any field sent as null, are accepted. `top_k` is an extension, as in
other OpenAI-compatible servers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from deltatune.data.formats import invalid_unicode_field


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_found_model(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what a torch.Generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0, le=0)
    frequency_penalty: float = Field(0.0, ge=0, le=0)
    logprobs: Literal[False] | None = None  # log-probabilities are not returned
    # OpenAI fields accepted at the values that change nothing here (others are a 400 naming the field)
    best_of: int = Field(1, ge=1, le=1)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)
    response_format: dict[str, Literal["text"]] | None = None
    store: Literal[False] = False
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None  # no tools: nothing to call in parallel

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value is not None and value is not False:  # `0` asks for the chosen tokens' log-probabilities
            raise ValueError("log-probabilities are not returned (send null or false)")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and value != {"type": "text"}:
            raise ValueError("only {'type': 'text'} is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value: dict[str, bool] | None, info: ValidationInfo) -> dict[str, bool] | None:
        if value is not None and not info.data.get("stream"):  # as OpenAI answers: it would be silently ignored
            raise ValueError("stream_options is only allowed when stream is true")
        if value and set(value) - {"include_usage"}:
            raise ValueError("only include_usage is supported")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: Literal[False] = False
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list must not be empty")
        if isinstance(value, list) and len(value) > 64:
            raise ValueError("at most 64 prompts per request")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: None = None  # a participant's name changes OpenAI's answer; chat templates have no place for it

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AdapterLoadRequest(_Strict):
    name: str
    path: str | None = None  # a folder under the server's adapter directory; default: `name`


_UNSUPPORTED_VALUES = {  # fields accepted only at the value that changes nothing: say what, not pydantic's bound
    "n": "only n=1 is supported (one choice per request)",
    "best_of": "only best_of=1 is supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "presence_penalty": "penalties are not supported (send 0)",
    "frequency_penalty": "penalties are not supported (send 0)",
    "store": "stored completions are not supported",
}


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field. A field sent as null is
    left at its default, as OpenAI reads it (clients such as LiteLLM send explicit nulls)."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    bad = invalid_unicode_field(data)  # the tokenizer and the error answer itself cannot encode it
    if bad is not None:
        bad = bad or "body"
        raise APIError(400, f"{bad}: not valid Unicode (a lone surrogate)", param=bad)
    required = {name for name, f in model.model_fields.items() if f.is_required()}
    data = {k: v for k, v in data.items() if v is not None or k in required}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [
            str(p)
            for p in err["loc"]
            if not (isinstance(p, str) and p in ("str", "list[str]", "int", "float", "bool", "list[TextPart]"))
        ]
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unsupported field"
        elif len(loc) == 1 and loc[0] in _UNSUPPORTED_VALUES:
            msg = _UNSUPPORTED_VALUES[loc[0]]
        elif loc and loc[0] == "messages" and loc[-1] == "name":
            msg = "a participant's name is not supported (the chat template has no place for it)"
        elif (
            loc
            and loc[0] == "prompt"
            and isinstance(data.get("prompt"), list)
            and any(isinstance(p, (int, list)) for p in data["prompt"])
        ):
            msg = "token-id prompts are not supported; send text"
        raise APIError(
            400,
            f"{param}: {msg}" if param else msg,
            param=param,
            code="unsupported_parameter" if err["type"] == "extra_forbidden" else None,
        ) from None
