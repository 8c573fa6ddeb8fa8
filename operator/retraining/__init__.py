"""When to retrain besides the schedule: performance and drift triggers (spec.training.triggers)."""
