"""Progressive rollouts: analysis, the state machine, and its metrics source."""
