"""A loop that runs in the background of the router's event loop until stopped."""

from __future__ import annotations

import asyncio


class BackgroundLoop:
    """Subclasses implement `_run()`, a coroutine that loops forever; `start()` and `stop()` manage it."""

    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
