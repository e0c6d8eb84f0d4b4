"""What every trainer shares: distributed set-up, checkpoints and resume, signals, sampling of data, logs, and the
training-run scaffolding around a step (engine/trainer.py). The bottom of the project's dependency order: the
engine imports nothing of models/, datasets/ or the scripts (their error types subclass engine.errors.UserError)."""
