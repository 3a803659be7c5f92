"""A real headless Chromium (Debian's ``chromium`` package, installed by ``make test`` when missing)
driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on fd 3, events
and replies on fd 4, NUL-separated JSON): no websocket library, no browser download.

``open_page(url)`` loads a page and returns what a test checks: console errors and uncaught
exceptions, failed loads, the value of a JavaScript expression and a PNG screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--hide-scrollbars", "--remote-debugging-pipe")


def chromium() -> str | None:
    """The Chromium binary, if installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _high(*fds: int) -> tuple[int, ...]:
    """The fds moved to numbers ≥ 10, so that none of them is 3 or 4 (which the child's redirections
    overwrite)."""
    out = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return out


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    value: Any = None  # of the expression
    screenshot: bytes = b""


class Chromium:
    """One headless browser process with a fresh profile, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, width: int = 1280, height: int = 2400):
        self.profile = tempfile.mkdtemp(prefix="boxrefine-chromium-")
        cmd_r, self._cmd_w = _high(*os.pipe())  # we write commands, chromium reads fd 3
        self._out_r, out_w = _high(*os.pipe())  # chromium writes fd 4, we read
        # bash (dash takes single-digit fds only) moves the pipe ends to fds 3 and 4, where chromium expects them
        shell = f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", shell, binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60) -> dict[str, Any]:
        """A command and its reply (events that arrive meanwhile are kept in ``events``)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self._read()
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.time() + timeout
        for m in self.events:
            if m.get("method") == method:
                return m
        while time.time() < deadline:
            m = self._read()
            self.events.append(m)
            if m.get("method") == method:
                return m
        raise TimeoutError(method)

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._cmd_w, self._out_r):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)


def _errors(events: list[dict[str, Any]], session: str) -> list[str]:
    out = []
    for e in events:
        if e.get("sessionId") != session:
            continue
        p, m = e.get("params", {}), e.get("method")
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            out.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed":
            out.append(f"load failed: {p.get('errorText')}")
    return out


def open_page(binary: str, url: str, expression: str, width: int = 1280) -> PageResult:
    """Load ``url``, wait for its load event, evaluate ``expression`` (its JSON value comes back) and
    take a full-page screenshot."""
    b = Chromium(binary, width)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=session)
        b.send("Page.navigate", {"url": url}, session=session)
        b.wait_event("Page.loadEventFired")
        value = b.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                       session=session)
        metrics = b.send("Page.getLayoutMetrics", session=session)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                 "clip": {"x": 0, "y": 0, "width": width,
                                                          "height": min(size["height"], 8000), "scale": 1}},
                      session=session)
        b.send("Runtime.evaluate", {"expression": "0"}, session=session)  # let late events arrive
        return PageResult(_errors(b.events, session), value.get("result", {}).get("value"),
                          base64.b64decode(shot["data"]))
    finally:
        b.close()
