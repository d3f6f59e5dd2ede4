"""Where a night's verdict goes, besides the exit code and the verdict file: stdout, a file, or a webhook.

A notifier never changes the verdict: a failed delivery is reported on stderr and the night's exit code
stays what the gates said.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from typing import Any, Protocol

from rcat_ray.nightly.config import NotifyConfig


class Notifier(Protocol):
    def send(self, verdict: dict[str, Any]) -> None: ...


class StdoutNotifier:
    """One human line and the JSON verdict on stdout (picked up by cron mail or CI logs)."""

    def send(self, verdict: dict[str, Any]) -> None:
        state = "PASS" if verdict["passed"] else "FAIL: " + ", ".join(verdict["failing"])
        print(f"[nightly] {verdict['pair']} {verdict['date']}: {state}")
        print(json.dumps(verdict, default=str))


class FileNotifier:
    """Appends one JSON line per night to a file (a log another tool can tail)."""

    def __init__(self, path: str):
        self.path = path

    def send(self, verdict: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(verdict, default=str) + "\n")


class WebhookNotifier:
    """POSTs the verdict as JSON (chat tools, incident systems, a CI trigger)."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s

    def send(self, verdict: dict[str, Any]) -> None:
        body = json.dumps(verdict, default=str).encode()
        req = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"webhook answered {resp.status}")


def make_notifier(cfg: NotifyConfig) -> Notifier:
    if cfg.kind == "file":
        return FileNotifier(cfg.path or "")
    if cfg.kind == "webhook":
        return WebhookNotifier(cfg.url or "", cfg.timeout_s)
    return StdoutNotifier()


def deliver(notifier: Notifier, verdict: dict[str, Any]) -> bool:
    """Send, reporting (not raising) a delivery failure; returns whether it was delivered."""
    try:
        notifier.send(verdict)
    except Exception as err:  # noqa: BLE001 - any delivery failure is reported the same way, never fatal
        print(f"[nightly] warning: notification failed: {type(err).__name__}: {err}", file=sys.stderr)
        return False
    return True
