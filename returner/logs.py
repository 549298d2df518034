"""Logging set-up: text for people, or one JSON object per line for machines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


# C0 controls, DEL and C1 controls: a message's value must not forge lines or move the
# cursor of whoever reads a text log. JSON logs escape them already.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


class TextFormatter(logging.Formatter):
    """The standard format, with control characters in the message escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(level: str, fmt: str, worker: str | None = None) -> None:
    """Log to stderr; `worker` tags every record (a worker process under --workers)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        tag = f" [{worker}]" if worker else ""
        handler.setFormatter(
            TextFormatter(f"%(asctime)s %(levelname)-7s{tag} %(name)s: %(message)s")
        )
    if worker:

        def tag_record(record: logging.LogRecord) -> bool:
            record.worker = worker
            return True

        handler.addFilter(tag_record)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The object store's client libraries say at INFO where they found credentials.
    for chatty in ("botocore", "boto3"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
