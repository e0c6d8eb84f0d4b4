"""What every trainer shares: distributed set-up, checkpoints and resume, signals, sampling of data, logs."""
