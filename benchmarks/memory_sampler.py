"""Peak resident memory of this process, sampled from /proc/self/status in a thread."""

from __future__ import annotations

import threading
import time


def status_kib(fields: tuple[str, ...]) -> dict[str, int]:
    """Values (KiB) of `fields` in /proc/self/status."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in fields:
                values[name] = int(rest.split()[0])
    return values


class Sampler(threading.Thread):
    """Track the peaks of RssAnon and RssFile in a background thread."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.lock = threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = status_kib(self.FIELDS)
            with self.lock:
                for name, value in now.items():
                    self.peak[name] = max(self.peak[name], value)
            time.sleep(self.interval_s)

    def take(self) -> dict[str, int]:
        """The peaks (KiB) since the last call, sampled once more now."""
        now = status_kib(self.FIELDS)
        with self.lock:
            peak = {name: max(self.peak[name], now[name]) for name in self.FIELDS}
            self.peak = now
        return peak
