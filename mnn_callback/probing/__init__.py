"""Running the model over the fixed sample: the sample, the hooks, the collectives, the results."""
