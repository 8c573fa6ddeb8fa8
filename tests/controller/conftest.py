"""Operator tests run Kopf with short timers: resync every 2 s, rollout ticks every 0.5 s,
training triggers every second.

Set before the handlers module is imported (its timers read them at import).
"""

import os

os.environ.setdefault("RECSYS_RESYNC_SECONDS", "2")
os.environ.setdefault("RECSYS_ROLLOUT_TICK_SECONDS", "0.5")
os.environ.setdefault("RECSYS_TRIGGER_TICK_SECONDS", "1")
