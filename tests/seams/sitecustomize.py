"""The poison-frame seam, loaded only by test processes that put this directory on
PYTHONPATH: a frame whose image_id is listed in RETURNER_TEST_CRASH_ON makes the process
SIGKILL itself when its encoding starts, as a frame that crashes libjpeg would. Nothing in
the installed package can be made to do this."""

import os

_CRASH_ON = frozenset(filter(None, os.environ.get("RETURNER_TEST_CRASH_ON", "").split(",")))

if _CRASH_ON:
    import signal

    from returner import frames

    _with_frame = frames.with_frame

    def _crashing(task, use, *rest):  # type: ignore[no-untyped-def]
        if task.image_id in _CRASH_ON:
            os.kill(os.getpid(), signal.SIGKILL)
        return _with_frame(task, use, *rest)

    frames.with_frame = _crashing
