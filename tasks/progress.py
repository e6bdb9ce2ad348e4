"""What a running stage shows the person watching it: lines in the run's log, a progress bar on
the terminal, and Prefect artifacts on the flow run's page.

  say(line)                     one line for the run's log: Prefect's run logger inside a flow or
                                task run (the terminal and the Prefect UI), stdout outside one (a
                                plain call, a test without Prefect)
  Progress(name, total, unit)   one long loop. update(n) / set(done) / close():
                                - a tqdm bar on the terminal (one line: count, rate, ETA), drawn
                                  only when stderr is a terminal, so logs and CI output stay clean;
                                - a line in the run's log at most every `log_every_s` seconds (and
                                  the first and the last), so the Prefect UI shows progress too;
                                - a Prefect progress artifact (0-100 %) updated at the same pace.
  publish_markdown(key, text) / publish_table(key, rows)
                                Prefect artifacts of the current run; nothing outside a run.
  interval_rates(records)       tokens/s of each training engine record over its own interval.

Publishing never fails a stage: a Prefect API error is reported once in the log and the stage goes
on (what it makes is the artifact in the store, not the picture of it in the UI).
"""
from __future__ import annotations

import logging
import re
import sys
import time

from tqdm import tqdm

_LOG = logging.getLogger("slm")
_warned: set[str] = set()


def in_run() -> bool:
    """True inside a Prefect flow or task run (where the run logger and artifacts work)."""
    if "prefect.context" not in sys.modules:  # no run without Prefect loaded; a plain call need not load it
        return False
    try:
        from prefect.context import FlowRunContext, TaskRunContext
    except ImportError:  # pragma: no cover - prefect is a dependency
        return False
    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def say(line: str, level: int = logging.INFO) -> None:
    """One line for the run's log (see the module docstring). Secrets are masked by the log filter
    flows/pipeline.py installs; outside a run the line is printed as it is."""
    if in_run():
        from prefect.logging import get_run_logger

        with tqdm.external_write_mode(file=sys.stderr):
            get_run_logger().log(level, line)
    else:
        tqdm.write(line, file=sys.stdout)


def _warn_once(what: str, err: Exception) -> None:
    if what not in _warned:
        _warned.add(what)
        _LOG.warning("could not publish %s to Prefect (%s: %s); the stage goes on", what, type(err).__name__, err)


def artifact_key(name: str) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")


def publish_markdown(key: str, text: str, description: str | None = None) -> bool:
    """A markdown artifact on the current run; False (and nothing done) outside a run or on an API error."""
    if not in_run():
        return False
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=text, key=artifact_key(key), description=description)
        return True
    except Exception as err:  # noqa: BLE001 - the UI's picture must not fail the stage
        _warn_once(f"artifact {key}", err)
        return False


def publish_table(key: str, rows: list[dict], description: str | None = None) -> bool:
    """A table artifact (a list of rows with the same keys) on the current run; False outside a run."""
    if not in_run() or not rows:
        return False
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=rows, key=artifact_key(key), description=description)
        return True
    except Exception as err:  # noqa: BLE001
        _warn_once(f"artifact {key}", err)
        return False


class Progress:
    """A long loop's progress on the terminal, in the run's log and as a Prefect progress artifact.

    name: what runs (the bar's label, the log lines' start, the artifact's key), total: how many
    units when known (None: no percentage, ETA or artifact), initial: units done before this process
    started (a resumed run): left out of the rate, so a resume never claims their speed. The log
    line reads "name: done/total unit (pct), rate unit/s, ETA"; the rate is over this process's
    time (the bar's own rate, tqdm's, is a moving average). Memory: constant."""

    def __init__(self, name: str, total: int | None, unit: str = "it", initial: int = 0,
                 log_every_s: float = 10.0, artifact: bool = True, clock=time.monotonic):
        self.name, self.total, self.unit = name, total, unit
        self.done = self.initial = initial
        self.log_every_s = log_every_s
        self.clock = clock
        self.logged_at: float | None = None
        self.logged_done: int | None = None
        self.artifact_id = None
        self.want_artifact = artifact and total is not None and in_run()
        self.started = clock()
        self.bar = tqdm(total=total, initial=initial, desc=name, unit=unit, disable=None, dynamic_ncols=True,
                        leave=False, file=sys.stderr)

    # -- the numbers

    def rate(self) -> float | None:
        """Units per second since this process started (units done before it, `initial`, left out)."""
        seconds = self.clock() - self.started
        return (self.done - self.initial) / seconds if seconds > 0 and self.done > self.initial else None

    def eta_s(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate and self.total is not None else None

    def describe(self) -> str:
        parts = [f"{self.name}: {self.done:,}" + (f"/{self.total:,}" if self.total is not None else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        rate, eta = self.rate(), self.eta_s()
        if rate:
            parts.append(f"{rate:,.2f} {self.unit}/s")
        if eta is not None and self.done < (self.total or 0):
            parts.append(f"ETA {_duration(eta)}")
        return ", ".join(parts)

    # -- updates

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.set(self.done + n, postfix)

    def set(self, done: int, postfix: str | None = None) -> None:
        """`done` units finished so far (it only moves forward)."""
        if done < self.done:
            return
        self.bar.update(done - self.done)
        self.done = done
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)
        now = self.clock()
        finished = self.total is not None and done >= self.total
        if self.logged_at is None or finished or now - self.logged_at >= self.log_every_s:
            self._report(now)

    def _report(self, now: float) -> None:
        if self.logged_done == self.done:
            return
        self.logged_at, self.logged_done = now, self.done
        say(self.describe())
        if self.want_artifact:
            self._publish_progress()

    def _publish_progress(self) -> None:
        pct = 100.0 * min(self.done, self.total) / max(self.total, 1)
        try:
            from prefect.artifacts import (
                create_progress_artifact,
                update_progress_artifact,
            )

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(progress=pct, key=artifact_key(f"{self.name}-progress"),
                                                            description=f"{self.name}: {self.unit} done, in %")
            else:
                update_progress_artifact(artifact_id=self.artifact_id, progress=pct)
        except Exception as err:  # noqa: BLE001
            self.want_artifact = False
            _warn_once(f"the progress of {self.name}", err)

    def close(self) -> None:
        """The last line (if the loop moved since the last one) and the bar taken off the terminal."""
        self._report(self.clock())
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _attempts(records: list[dict]) -> list[tuple[tuple[float, int] | None, list[dict]]]:
    """The records split into attempts: (the (time, step) of the start or resume record that opened
    it, or None, its train records that have a time), in file order."""
    attempts: list[tuple[tuple[float, int] | None, list[dict]]] = [(None, [])]
    for rec in records:
        kind = rec.get("kind")
        if kind in ("start", "resume") and "time" in rec:
            attempts.append(((float(rec["time"]), int(rec.get("step", 0))), []))
        elif kind == "train" and "time" in rec and rec.get("step"):
            attempts[-1][1].append(rec)
    return [a for a in attempts if a[1]]


def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 and tokens > 0 else None


def interval_rates(records: list[dict]) -> list[tuple[int, float]]:
    """[(step, tokens/s)] for each "train" record of a training engine's metrics.jsonl: the tokens
    trained since the record before it over the wall-clock seconds between the two records' "time".

    An attempt opens with a "start" or "resume" record: the first interval of an attempt runs from
    that record, so a resumed run never divides the tokens of the steps before the resume (or of its
    whole history) by the time of one interval. The time includes evaluations and checkpoints that
    fall in the interval. Limit: the engine stamps a record when it writes it, which on a CPU is one
    step after the step it describes, except at an evaluation or the end; an interval's figure can
    be off by one step's time (with log_every 1, by far: use mean_rate for a run's speed)."""
    rates: list[tuple[int, float]] = []
    for opened, train in _attempts(records):
        before = opened
        for rec in train:
            step, now = int(rec["step"]), float(rec["time"])
            if before is not None and step > before[1]:
                rate = _rate((step - before[1]) * float(rec["tokens"]) / step, now - before[0])
                if rate is not None:
                    rates.append((step, rate))
            before = (now, step)
    return rates


def mean_rate(records: list[dict]) -> float | None:
    """A run's tokens/s: the tokens trained between the first and the last train record of each
    attempt (start or resume) over the seconds between them, summed over the attempts. Start-up and
    model compilation (before an attempt's first record) and the time between attempts are left out,
    and the one-step error of a record's stamp (see interval_rates) is spread over the whole window.
    An attempt with one train record counts from its start or resume record. None: nothing logged."""
    tokens = seconds = 0.0
    for opened, train in _attempts(records):
        first, last = train[0], train[-1]
        if len(train) == 1 and opened is not None:
            first = {"time": opened[0], "step": opened[1], "tokens": opened[1] * float(last["tokens"]) / last["step"]}
        elif len(train) == 1:
            continue
        tokens += float(last["tokens"]) - float(first["tokens"])
        seconds += float(last["time"]) - float(first["time"])
    return _rate(tokens, seconds)
