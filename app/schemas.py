"""Request and response bodies. Response shapes follow OpenAI's published API reference so the
official clients parse them unchanged; Tuneforge's own fields are additions."""

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from app.core.hyperparameters import Hyperparameters

T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, data: list, has_more: bool):
        return cls(
            data=data,
            has_more=has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )


# --- Files ---


class FilePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str
    examples: int


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# --- Fine-tuning jobs ---


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"]
    supervised: SupervisedMethod = Field(default_factory=SupervisedMethod)


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        # Hyperparameters go at the top level or under method, not both (see the validator below).
        json_schema_extra={
            "not": {
                "required": ["hyperparameters", "method"],
                "properties": {"hyperparameters": {"type": "object"}, "method": {"type": "object"}},
            }
        },
    )

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported: leave it out.")

    @model_validator(mode="after")
    def _one_source_of_hyperparameters(self):
        if self.hyperparameters is not None and self.method is not None:
            raise ValueError("give hyperparameters either at the top level or under method, not both")
        return self

    @property
    def requested_hyperparameters(self) -> Hyperparameters:
        if self.method is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any] = Field(validation_alias="hyperparameters")
    model: str
    organization_id: str = Field(validation_alias="tenant_id")
    result_files: list[str] = []
    seed: int
    # A running job asked to pause still reports running until the worker has checkpointed.
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = Field(None, validation_alias="metadata_")
    user_provided_suffix: str | None = Field(None, validation_alias="suffix")

    @field_validator("method", mode="before")
    @classmethod
    def _supervised_method(cls, hyperparameters):
        return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}


class JobEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _event_id(cls, row_id):
        return f"ftevent-{row_id}" if isinstance(row_id, int) else row_id

    @computed_field
    @property
    def type(self) -> Literal["message", "metrics"]:
        # Lifecycle events carry data too (attempt, checkpoint id); only step metrics are "metrics".
        return "metrics" if self.data and "train_loss" in self.data else "message"


class CheckpointPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(validation_alias="model_id")
    fine_tuning_job_id: str = Field(validation_alias="job_id")
    metrics: dict[str, float]
    step_number: int = Field(validation_alias="step")

    @field_validator("metrics", mode="before")
    @classmethod
    def _numbers_only(cls, metrics):
        return {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float)}

    @model_validator(mode="after")
    def _step_first(self):
        self.metrics = {"step": float(self.step_number), **self.metrics}
        return self


# --- Models ---


class ModelPublic(BaseModel):
    # Fine-tunes come from their Model row; base models, which have none, are built by field name.
    model_config = ConfigDict(from_attributes=True, validate_by_name=True)

    id: str
    object: Literal["model"] = "model"
    created: int = Field(validation_alias="created_at")
    owned_by: str = Field(validation_alias="tenant_id")
    parent: str | None = None


# --- Inference ---


class ContentPart(BaseModel):
    """An OpenAI content part; the text of "text" parts is used, other parts are ignored."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


StopString = Annotated[str, Field(min_length=1)]


class SamplingFields(BaseModel):
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="Up to 4 non-empty strings; the text ends before the first one generated."
    )
    seed: int | None = None


class OpenAIRequestFields(SamplingFields):
    max_tokens: int | None = Field(None, ge=1)
    n: Literal[1] | None = Field(1, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None


Messages = Annotated[list[ChatMessage], Field(min_length=1)]


class ChatCompletionRequest(OpenAIRequestFields):
    messages: Messages
    # The newer name of max_tokens.
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(OpenAIRequestFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(
        description="One prompt: a string, or a list holding one string."
    )


def _exactly_one_of(*fields: str) -> dict:
    """JSON Schema for "exactly one of these fields is given and not null"."""
    return {
        "oneOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in fields]
    }


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra=_exactly_one_of("prompt", "messages"))

    prompt: str | None = None
    messages: Messages | None = None
    max_new_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class TextCompletion(BaseModel):
    """Both the whole answer and each streamed chunk of /v1/completions (as OpenAI does)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class GenerateResponse(BaseModel):
    model: str
    text: str
    usage: Usage
    finish_reason: Literal["stop", "length"]


# --- Health ---


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(description='Each dependency: "ok", or why it is not.')
    refused: dict[str, str] = Field(
        description="Base models listed to be served that this process refused at start, each with "
        "why (not configured, or a family Tuneforge does not support) and what is supported."
    )
