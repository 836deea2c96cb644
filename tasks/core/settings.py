"""Environment settings (URIs, paths): read from the environment by pydantic-settings, never set in code."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where Nightshift keeps its state and which tracking server it talks to.

    Embedded default: everything under ``NIGHTSHIFT_HOME`` (``./.nightshift``), MLflow on a local
    SQLite file there. Set ``MLFLOW_TRACKING_URI`` (and ``PREFECT_API_URL``, read by Prefect itself)
    to use servers instead.
    """

    model_config = SettingsConfigDict(env_prefix="", extra="ignore")

    nightshift_home: Path = Field(default=Path(".nightshift"), description="Root of artifacts, checkpoints and the embedded MLflow store.")
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking server; default sqlite under NIGHTSHIFT_HOME.")
    mlflow_registry_uri: str | None = Field(default=None, description="MLflow registry URI; defaults to the tracking URI.")
    nightshift_alert_webhook: str | None = Field(
        default=None, description="POST a JSON notification here after every pipeline run (success or failure); unset: none is sent.")
    nightshift_alert_timeout_s: float = Field(default=5.0, gt=0, le=120, description="Seconds an alert POST may take.")

    @property
    def home(self) -> Path:
        return self.nightshift_home.expanduser().resolve()

    @property
    def artifacts_root(self) -> Path:
        return self.home / "artifacts"

    @property
    def checkpoints_root(self) -> Path:
        return self.home / "checkpoints"

    @property
    def locks_root(self) -> Path:
        return self.home / "locks"

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> Path:
        return self.home / "mlartifacts"


def get_settings() -> Settings:
    """Settings read from the environment now (not cached: tests change the environment)."""
    return Settings()
