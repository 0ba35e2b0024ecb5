"""Progress of the long steps: a bar on a terminal, and one plain line every few seconds elsewhere
(CI logs, piped output), where a bar's carriage returns would pile up in one line."""
from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm

LINE_EVERY = 10.0   # seconds between two progress lines when stderr is not a terminal


class _Lines:
    """The non-terminal progress: ``desc: n/total samples, r sample/s, t s`` every LINE_EVERY
    seconds, and once when the step ends (one line for a short step)."""

    def __init__(self, total: Optional[int], desc: str, unit: str, stream):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.n, self._closed = 0, False
        self.t0 = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= LINE_EVERY:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        rate = self.n / max(now - self.t0, 1e-9)
        self.stream.write(f"{self.desc}: {self.n}{of} {self.unit}s, {rate:.1f} {self.unit}/s, {now - self.t0:.1f} s\n")
        self.stream.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._line(time.monotonic())

    def set_postfix_str(self, text: str) -> None:  # tqdm's API, ignored in lines
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off(_Lines):
    def __init__(self):
        super().__init__(None, "", "", None)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: Optional[int], desc: str, enabled: bool = True, unit: str = "sample", stream=None):
    """A tqdm bar when ``stream`` (stderr) is a terminal, else periodic lines; nothing when not ``enabled``."""
    stream = stream or sys.stderr
    if not enabled:
        return _Off()
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False, dynamic_ncols=True)
    return _Lines(total, desc, unit, stream)
