"""Every candidate's time from Triton's autotuner, not only its pick.

Why: a pick alone does not say how close the runners-up were, and the notes' predictions are
about whole families of tiles (rows per thread, steps in flight). ``log_tunings`` wraps an
autotuner so that each newly tuned key's ``configs_timings`` is kept; ``format_tunings``
prints them fastest first.
"""
from __future__ import annotations


def log_tunings(tuner, label: str, sink: list) -> None:
    """Append (label, key, {config: ms}) to sink whenever ``tuner`` tunes a new key."""
    run = tuner.run

    def logged_run(*args, **kwargs):
        known = set(tuner.cache)
        result = run(*args, **kwargs)
        timings = getattr(tuner, "configs_timings", None)
        for key in set(tuner.cache) - known:
            if timings:
                sink.append((label, key, {str(config): ms for config, ms in timings.items()}))
        return result

    tuner.run = logged_run


def format_tunings(sink: list) -> list[str]:
    lines = []
    for label, key, timings in sink:
        lines.append(f"# autotune {label} {key}:")
        for config, ms in sorted(timings.items(), key=lambda item: item[1][0] if isinstance(item[1], list) else item[1]):
            us = [round(t * 1e3, 1) for t in (ms if isinstance(ms, list) else [ms])]
            lines.append(f"#   {us} us  {config}")
    return lines
