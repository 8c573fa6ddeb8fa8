"""Stream jobs: user events in, fresh per-user features out (docs/stream-features.md).

Modules, in the order an event meets them: `events` (the schema), `producer`
(sending), `features` (the job's loop), `user_features` (the feature math, pure),
`item_embeddings` (model versions' item vectors), `feature_store` (one batch to
Redis), `feature_keys` (the key layout shared with serving), `dead_letters`;
around them `settings`, `metrics`, `backlog` and `cli`.
"""
