"""The step schedule behind loadtest/shapes.py (tested without importing Locust, which
would monkey-patch this process with gevent)."""

from __future__ import annotations

import pytest

from imgsearch.loadtest.scenario import step_count, step_schedule


def test_users_step_up_every_step_time_to_the_top():
    users = [step_schedule(t, 2, 10, 7, 5)[0] for t in (0, 9.99, 10, 19.9, 20, 30, 39.9)]
    assert users == [2, 2, 4, 4, 6, 7, 7]
    assert step_count(2, 7) == 4
    assert step_schedule(40, 2, 10, 7, 5) is None  # after the last step the run ends
    assert step_schedule(0, 2, 10, 7, 5)[1] == 5  # spawn rate passed through


def test_run_time_caps_the_schedule():
    assert step_schedule(14.9, 1, 10, 10, 1, run_time=15) == (2, 1)
    assert step_schedule(15, 1, 10, 10, 1, run_time=15) is None


@pytest.mark.parametrize("args", [(0, 10, 5), (1, 0, 5), (1, 10, 0)])
def test_nonsense_steps_are_refused(args):
    with pytest.raises(ValueError):
        step_schedule(0, *args, 1)
