"""The bottom layer: the metrics and their math, the metric schema, errors, the guard and monitor names."""
