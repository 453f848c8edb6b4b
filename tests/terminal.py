"""A command run in a pseudo-terminal, driven as a person would type (stdin, stdout and stderr all the terminal)."""

from __future__ import annotations

import os
import pty
import subprocess
import time


class Terminal:
    def __init__(self, argv: list[str]) -> None:
        self.primary, secondary = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True)
        os.close(secondary)
        self.seen = b""

    def read_until(self, token: bytes, timeout: float = 120) -> None:
        """Wait for ``token``; the next wait only sees what comes after it."""
        end = time.time() + timeout
        while token not in self.seen and time.time() < end:
            try:
                self.seen += os.read(self.primary, 4096)
            except OSError:
                break
        assert token in self.seen, self.seen.decode(errors="replace")[-500:]
        self.seen = self.seen[self.seen.index(token) + len(token) :]

    def type(self, line: bytes) -> None:
        os.write(self.primary, line + b"\n")

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        os.close(self.primary)
