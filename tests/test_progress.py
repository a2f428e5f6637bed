"""Progress bars on the dashboard: each update is an API call, so they are rationed."""

from __future__ import annotations

import time

from tasks._stage import PROGRESS_EVERY_S, progress_due


def test_an_update_is_due_at_the_end_or_after_a_whole_percent_and_the_interval():
    now = time.monotonic()
    long_ago, just_now = now - PROGRESS_EVERY_S - 1, now
    assert progress_due(100.0, 99.9, just_now, finished=True)  # the end always shows
    assert progress_due(0.4, -1.0, just_now, finished=True)
    assert not progress_due(50.0, 49.5, long_ago, finished=False)  # under a percent: not worth a call
    assert not progress_due(60.0, 40.0, just_now, finished=False)  # too soon after the last one
    assert progress_due(41.0, 40.0, long_ago, finished=False)
