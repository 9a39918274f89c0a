"""Studies and sweeps: many runs of one experiment, coordinated through Optuna storage, compared by delta_m."""
