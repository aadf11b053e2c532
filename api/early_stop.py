"""A stop asked for while a server process is still building its app is kept, not lost.

A granian worker is forked from the server's main process and keeps the main's own signal handler until the worker's
event loop installs its own, after the app is built (imports, settings, the composition: about a second). A SIGTERM
in between (the server stopped just after it started) was taken by that inherited handler and lost: the worker then
served on, deaf to the stop its main process waited for, for ever. Held from the start of the app's build (all but
the milliseconds of granian's own set-up after the fork), such a signal is sent again once the server's own handlers
are in place (when the app's lifespan starts), and the worker stops as soon as it has started.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EarlyStop:
    """Holds SIGTERM and SIGINT from `hold` until `release`."""

    def __init__(self) -> None:
        self._asked: list[int] = []
        self._before: dict[int, signal.Handlers | object] = {}

    @property
    def held(self) -> bool:
        return bool(self._before)

    def hold(self) -> None:
        if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
            return
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # one ignored (a server started in the background) stays so
                self._before[sig] = signal.signal(sig, self._keep)

    def release(self) -> None:
        """Gives the signals back to whoever handles them now, and sends again the one that came meanwhile. A handler
        installed since (the server's event loop's) stays; where none was, the one from before `hold` is restored."""
        for sig, before in self._before.items():
            if signal.getsignal(sig) == self._keep:
                signal.signal(sig, before)  # type: ignore[arg-type]  # what signal.signal itself answered
        self._before = {}
        asked, self._asked = self._asked, []
        for sig in asked[:1]:  # one stop is enough
            os.kill(os.getpid(), sig)

    def _keep(self, signum: int, _frame: FrameType | None) -> None:
        self._asked.append(signum)
