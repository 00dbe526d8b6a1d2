"""ce-parallel-engine: run perturbation-based explanations in parallel.

Importing ``engine`` has no side effects: no environment is read, no process
or thread is started, and optional backends (joblib, dask) are not imported.
"""

from __future__ import annotations

from engine.config import ParallelConfig
from engine.errors import (
    BrokenExecutorError,
    CancelledError,
    ConfigError,
    EngineError,
    EngineWarning,
    ExecutorStateError,
    FallbackWarning,
    PayloadError,
    RunTimeoutError,
    StrategyUnavailableError,
    SupervisorLostError,
    WorkerCrashedError,
)
from engine.executor import ParallelExecutor
from engine.strategies import available_strategies

__version__ = "0.1.0"

__all__ = [
    "BrokenExecutorError",
    "CancelledError",
    "ConfigError",
    "EngineError",
    "EngineWarning",
    "ExecutorStateError",
    "FallbackWarning",
    "ParallelConfig",
    "ParallelExecutor",
    "PayloadError",
    "RunTimeoutError",
    "StrategyUnavailableError",
    "SupervisorLostError",
    "WorkerCrashedError",
    "__version__",
    "available_strategies",
]
