"""Progress lines for logs without a terminal (issue 13, item 8): each tenth, or every `every` seconds."""

from __future__ import annotations

from jobs import progress
from jobs.progress import Progress, timing


def test_a_line_at_each_tenth_and_after_the_interval_with_rate_and_eta(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    shown = Progress("prepare: data.sft", 1000, every=30.0)
    shown.begin()
    lines = []
    for done in range(1, 1001):
        clock[0] += 0.01 if done < 500 else 0.5  # slower in the second half: the interval triggers lines
        if line := shown.update(done):
            lines.append(line)
    assert lines[0] == "prepare: data.sft: 100/1000 rows, 1s elapsed, 100 rows/s, ETA 9s"
    assert [int(line.split(": ")[2].split("/")[0]) for line in lines[:5]] == [100, 200, 300, 400, 500]
    assert any(" 560/1000" in line for line in lines), "every 30 s between tenths"
    assert lines[-1].startswith("prepare: data.sft: 1000/1000 rows, ") and "ETA" not in lines[-1]
    assert "\r" not in capsys.readouterr().out


def test_timing_reads_as_a_person_would_say_it():
    assert timing(100, 10, 990, "steps") == "1m40s elapsed, 10 s/step, ETA 2h45m"
    assert timing(5, 100, 0, "rows") == "5s elapsed, 20 rows/s"
    assert timing(0, 0, 10, "rows") == "0s elapsed"
