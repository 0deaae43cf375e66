"""Typed settings read from the environment and `.env`: the only module that reads them."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service; `.env.example` lists each one with its default."""

    # Empty values mean "the default", so .env.example can list every setting with a blank.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", env_ignore_empty=True)

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-4o-mini"
    # Comma-separated in the environment; empty means "just OPENAI_MODEL".
    allowed_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    openai_max_retries: int = Field(default=2, ge=0, le=10)
    openai_timeout: float = Field(default=60.0, gt=0)
    openai_stream_idle_timeout: float = Field(default=60.0, gt=0)
    database_url: str = "sqlite:///./chat.db"
    system_prompt: str | None = None
    max_message_chars: int = Field(default=32_000, ge=1, le=1_000_000)
    max_messages_per_chat: int = Field(default=10_000, ge=2)
    max_request_bytes: int = Field(default=1_048_576, ge=1024)
    max_context_tokens: int = Field(default=100_000, ge=256)
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_rounds: int = Field(default=5, ge=0, le=50)
    tools_enabled: bool = True
    generate_titles: bool = True
    max_active_replies: int = Field(default=1000, ge=1)
    max_reply_seconds: float = Field(default=600.0, gt=0)
    stream_send_timeout: float = Field(default=30.0, gt=0)
    keep_finished_seconds: float = Field(default=300.0, ge=0)
    keep_finished_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    log_level: str = "INFO"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_models", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _sqlite_only(cls, value: str) -> str:
        if not value.startswith("sqlite:///"):
            raise ValueError("DATABASE_URL must look like sqlite:///./chat.db or sqlite:////abs.db")
        return value

    @field_validator("openai_api_key", "openai_base_url", "system_prompt", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def database_path(self) -> Path:
        """The SQLite file named by DATABASE_URL (`sqlite:///rel.db`, `sqlite:////abs.db`)."""
        return Path(self.database_url.removeprefix("sqlite:///"))

    @property
    def models(self) -> list[str]:
        """The models a chat may use; the default model is always one of them."""
        extra = [m for m in self.allowed_models if m != self.openai_model]
        return [self.openai_model, *extra]

    @property
    def llm_configured(self) -> bool:
        """Whether there is anything to talk to: an API key, or a compatible server's URL."""
        return self.openai_api_key is not None or self.openai_base_url is not None


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
