"""Settings of the producer CLIs (`jetinfer infer`, `bench`, `video`)."""

from __future__ import annotations

from dataclasses import dataclass

from jetinfer.settings import ConnectionSettings, require, setting

__all__ = ["ProducerSettings"]


@dataclass(kw_only=True)
class ProducerSettings(ConnectionSettings):
    """Connection plus how long to wait for replies."""

    timeout_s: float = setting(30.0, "seconds to wait for each reply")
    concurrency: int = setting(16, "requests in flight at once")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.timeout_s > 0, "timeout_s", "must be above 0")
        require(1 <= self.concurrency <= 100_000, "concurrency", "must be 1..100000")
