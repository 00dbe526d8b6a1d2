"""The serial strategy: every chunk in the caller's thread, in order.

It is the oracle every other strategy must match, and the fallback the engine
uses when parallelism is off, gated, nested or unavailable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, final

from engine._chunks import Chunk, run_chunk
from engine.strategies.base import RunContext, Strategy


@final
class SerialStrategy(Strategy):
    """Run chunks one after another in the calling thread."""

    NAME: ClassVar[str] = "serial"
    IN_PROCESS: ClassVar[bool] = True

    def run(
        self,
        fn: Callable[..., Any],
        chunks: Iterable[Chunk],
        extra_args: tuple[Any, ...],
        ctx: RunContext,
    ) -> Iterator[tuple[Chunk, list[Any]]]:
        for chunk in chunks:
            ctx.check()
            results, compute_s = run_chunk(
                fn,
                chunk.items,
                extra_args,
                is_cancelled=ctx.is_cancelled,
                as_worker=False,
            )
            ctx.recorder.add(chunks=1, items=len(chunk), compute_s=compute_s)
            yield chunk, results
