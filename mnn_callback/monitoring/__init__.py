"""The monitor: when to probe, one measurement, the reference, the history, the budget, the collapse alarm."""
