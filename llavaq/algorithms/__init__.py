"""Anti-outlier algorithms."""
