"""Step load: add ``--step-users`` users every ``--step-time`` seconds up to ``--users``.

Each step holds a fixed concurrency long enough to measure it, so the report can draw
throughput against users and pick the knee: the highest throughput whose p99 still meets
the SLO. Past the knee, more users only add queueing (latency grows, throughput flat).

Locust uses a shape class found in any of its ``-f`` files, so this one lives in its own
file and is loaded only when asked::

    locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --users 16 --spawn-rate 8 \\
        --step-users 2 --step-time 20 --host http://127.0.0.1:8000
    imgsearch loadtest --shape step --users 16 --step-users 2 --step-time 20
"""

from __future__ import annotations

from locust import LoadTestShape

try:
    from imgsearch.loadtest.scenario import step_schedule
except ImportError:  # a Locust image with loadtest/ mounted as a plain folder: Locust puts it on sys.path
    from scenario import step_schedule  # type: ignore[no-redef]


class StepLoadShape(LoadTestShape):
    """Reads --users (the top), --spawn-rate, --run-time (a cap), --step-users, --step-time."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        opts = self.runner.environment.parsed_options
        max_users = int(getattr(opts, "num_users", None) or 10)
        step_users = int(getattr(opts, "step_users", 2) or 2)
        step_time = float(getattr(opts, "step_time", 20.0) or 20.0)
        # spawning a whole step within ~1 s keeps the ramp out of the step's measurement
        spawn_rate = float(getattr(opts, "spawn_rate", None) or max(step_users, 1))
        run_time = getattr(opts, "run_time", None)
        return step_schedule(self.get_run_time(), step_users, step_time, max_users, spawn_rate,
                             float(run_time) if run_time else None)
