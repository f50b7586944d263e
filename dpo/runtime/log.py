"""A rank-aware logger: under DDP/FSDP only global rank 0 writes, unless asked otherwise."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_only


class RankZeroLogger(logging.LoggerAdapter):
    """``logging.Logger`` that drops records on ranks other than 0 (``rank_zero_only=False`` to keep)."""

    def __init__(self, name: str, extra: Mapping[str, object] | None = None) -> None:
        super().__init__(logging.getLogger(name), extra or {})

    def log(self, level: int, msg: object, *args: Any, rank_zero_only_: bool = True, **kwargs: Any) -> None:
        if rank_zero_only_ and getattr(rank_zero_only, "rank", 0) != 0:
            return
        if self.isEnabledFor(level):
            msg, kwargs = self.process(msg, kwargs)
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> RankZeroLogger:
    """The rank-zero logger for module ``name``."""
    return RankZeroLogger(name)
