"""Bodies of the Moonshot routes (pydantic; unknown fields are ignored, as Moonshot's own models do). Types,
presence and sizes here; what the values mean (known connector, URL, token, params) the service checks."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from orchestrator.surfaces.moonshot.endpoints import MAX_NAME, MAX_RATE, MAX_TOKEN, MAX_URI, EndpointSpec


def _whole_number(value: Any) -> Any:
    # Litestar validates in lax mode, which would take true, "10" and 10.0 for 10.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "Input should be a whole number")
    return value


Rate = Annotated[int, BeforeValidator(_whole_number), Field(ge=0, le=MAX_RATE)]
"""0 is unlimited."""


class EndpointIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
    connector_type: Annotated[str, Field(min_length=1, max_length=64)]
    uri: Annotated[str, Field(min_length=1, max_length=MAX_URI)]
    token: Annotated[str, Field(max_length=MAX_TOKEN)]
    """May be empty (an endpoint that takes no key)."""
    max_calls_per_second: Rate
    max_concurrency: Rate
    params: dict[str, Any] | None = None

    def spec(self) -> EndpointSpec:
        return EndpointSpec(
            name=self.name,
            connector_type=self.connector_type,
            uri=self.uri,
            token=self.token,
            max_calls_per_second=self.max_calls_per_second,
            max_concurrency=self.max_concurrency,
            params=self.params or {},
        )


class MessageOut(BaseModel):
    message: str


class ErrorsOut(BaseModel):
    error: list[str]


class DetailOut(BaseModel):
    detail: str
