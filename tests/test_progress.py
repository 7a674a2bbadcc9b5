"""The progress line of a running sweep (sweeps.launcher.progress): its counts, its ETA and when it prints."""

from __future__ import annotations

import io

from sweeps.launcher.progress import ProgressLine


def test_line_counts_and_eta_follow_the_plan_scaled_by_measured_time() -> None:
    view = ProgressLine("demo", n_total=5, estimates={"a": 100.0, "b": 100.0, "c": 100.0, "d": 100.0},
                        search_estimate=50.0, stream=None)
    # Nothing done: 4 grid trials x 100 s + 1 search trial x 50 s, one slot.
    assert view.eta_seconds([], {}, []) == 450.0
    # "a" done in twice its planned time; "b" half-way: pending (200 + 50 + 100 x 1/2 done off) x 2.
    statuses, recorded, running = ["ok"], ["a"], {"tune-b": 0.5}
    pending = (300.0 + 50.0) - 0.5 * (350.0 / 4)
    assert view.eta_seconds(recorded, running, [(200.0, 100.0)]) == 2 * pending
    view.attach(io.StringIO(), n_slots=2)
    assert view.eta_seconds(recorded, running, [(200.0, 100.0)]) == pending
    line = view.line(statuses + ["diverged"], recorded + ["c"], running, 1, [(200.0, 100.0)])
    assert line.startswith("[demo] 2/5 done | 1 running | 0 failed | 1 diverged | 1 retried | ETA ")


def test_a_pipe_gets_a_new_line_when_a_trial_ends_not_on_every_call() -> None:
    out = io.StringIO()
    view = ProgressLine("demo", n_total=2, estimates={"a": 10.0, "b": 10.0}, search_estimate=0.0, stream=None)
    view.attach(out, n_slots=1)
    view.draw([], [], {}, 0, [], force=True)
    view.draw([], [], {"t": 0.5}, 0, [])  # a trial started, none ended: a log gets no line for that
    view.draw([], [], {"t": 0.6}, 0, [])  # only the ETA moved: nothing either
    view.draw(["ok"], ["a"], {}, 0, [])  # a trial ended: a line
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ETA")[0] for ln in lines] == [
        "[demo] 0/2 done | 0 running | 0 failed | 0 diverged",
        "[demo] 1/2 done | 0 running | 0 failed | 0 diverged",
    ]
    view.close()  # not a terminal: no trailing newline to add
    assert out.getvalue().count("\n") == 2
