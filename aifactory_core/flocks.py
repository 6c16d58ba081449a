"""The one bounded wait for an exclusive ``flock``, shared by every lock of the suite (device,
admission, partition state). Imports nothing at module level: hooks take it on their start-up path."""

from __future__ import annotations


def flock_within(descriptor: int, timeout_s: float) -> bool:
    """Take an exclusive ``flock`` on ``descriptor``, polling (5 ms, doubling up to 100 ms) for at
    most ``timeout_s`` seconds; False when it is still held by another process then. The lock
    goes with the descriptor, so a killed holder never leaves it taken."""
    import fcntl
    import time

    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
