"""Post hoc: loading saved models safely, evaluating checkpoints and families, ranking by responses."""
