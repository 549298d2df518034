"""returner: saves rendered frames from POSIX shared memory as JPEG, driven by Redis."""

__version__ = "0.2.0"
