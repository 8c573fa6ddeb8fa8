"""Stream jobs: user events in, fresh per-user features out (docs/stream-features.md).

Modules, in the order an event meets them: `producer` (sending), `features` (the job's
loop), `user_features` (the feature math, pure), `item_embeddings` (model versions' item
vectors), `feature_store` (one batch to Redis), `dead_letters`; around them `metrics`,
`backlog` and `cli`. The event schema, the key layout and the job's settings are
contracts with other components and live in `recsys_contracts`.
"""
