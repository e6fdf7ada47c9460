"""Where results go and how they are read back: files, sinks, trackers, figures, plots, tables."""
