"""The operator console (`returner console`): the queue, results with thumbnails, and
dead letters with replay, in a browser. Needs the `console` extra
(`pip install 'returner[console]'`); importing this package without it raises
ImportError naming the missing module."""

from returner.console.server import serve

__all__ = ["serve"]
