"""The per-epoch progress bar: loss, accuracy (where there is one), items/s and time left.

tqdm draws it when it is installed; otherwise :class:`TextBar` redraws one line with ``\\r``.
It is only drawn on a terminal: :func:`progress_bar` returns a :class:`SilentBar` when the
stream is not a TTY or the bar is switched off (``--no-progress``), and the run prints one line
per epoch instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["progress_bar", "TextBar", "SilentBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class SilentBar:
    """Draws nothing."""

    def update(self, count: int, loss: float, accuracy: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class TextBar:
    """``epoch 3/30 [#######.......]  41/98  loss 1.234  acc 55.1%  2,345 img/s  ETA 0:24``.

    ``unit`` names what :meth:`update` counts ("img", "tok"); without an ``accuracy`` the
    ``acc`` field is left out."""

    def __init__(
        self,
        total: int,
        description: str,
        stream: TextIO,
        width: int = 24,
        min_interval: float = 0.1,
        unit: str = "img",
    ):
        self.total, self.description, self.stream, self.width = total, description, stream, width
        self.min_interval, self.unit = min_interval, unit
        self.steps = self.count = 0
        self.start = self.last_draw = time.perf_counter()
        self.text = ""

    def update(self, count: int, loss: float, accuracy: float | None = None) -> None:
        self.steps += 1
        self.count += count
        now = time.perf_counter()
        if now - self.last_draw < self.min_interval and self.steps < self.total:
            return
        self.last_draw = now
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        left = elapsed / self.steps * (self.total - self.steps)
        filled = self.width * self.steps // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        shown_accuracy = "" if accuracy is None else f"acc {100 * accuracy:5.1f}%  "
        text = (
            f"{self.description} [{bar}] {self.steps:>{len(str(self.total))}}/{self.total}  loss {loss:.4f}  "
            f"{shown_accuracy}{rate:,.0f} {self.unit}/s  ETA {format_duration(left)}"
        )
        self.stream.write("\r" + text + " " * max(0, len(self.text) - len(text)))
        self.stream.flush()
        self.text = text

    def close(self) -> None:
        if self.text:
            self.stream.write("\r" + " " * len(self.text) + "\r")
            self.stream.flush()


class TqdmBar:
    """The same fields through tqdm."""

    def __init__(self, total: int, description: str, stream: TextIO, unit: str = "img"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=description, file=stream, leave=False, unit="step", dynamic_ncols=True)
        self.count, self.unit = 0, unit

    def update(self, count: int, loss: float, accuracy: float | None = None) -> None:
        self.count += count
        elapsed = self.bar.format_dict["elapsed"]
        rate = self.count / elapsed if elapsed > 0 else 0.0
        shown_accuracy = "" if accuracy is None else f"  acc {100 * accuracy:.1f}%"
        self.bar.set_postfix_str(f"loss {loss:.4f}{shown_accuracy}  {rate:,.0f} {self.unit}/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def progress_bar(total: int, description: str, enabled: bool = True, stream: TextIO | None = None, unit: str = "img"):
    """A bar over ``total`` steps on ``stream`` (default stderr): tqdm's if importable, else a
    :class:`TextBar`; a :class:`SilentBar` if not ``enabled`` or ``stream`` is not a terminal.
    ``unit`` names what each update counts (images, "tok" for tokens)."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not enabled or not (isatty and isatty()):
        return SilentBar()
    return TqdmBar(total, description, stream, unit) if _has_tqdm() else TextBar(total, description, stream, unit=unit)
