"""A synthetic world of users and items with a known ground truth.

Items belong to categories and have latent vectors near their category's centre and a
power-law popularity. Users have latent preferences that mix a few categories and
drift towards a new one over the simulated period. Sessions focus on one category the
user likes at that moment; each interaction is drawn from a softmax over
`sharpness * <user, item> + log popularity`, without repeats inside a session.

The same ground truth answers "would this user click this item now?"
(`click_probability`), so tests, benchmarks and a CTR simulation share one truth.
Everything is a pure function of the config: the same seed gives the same world and the
same log, bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model_handlers.interactions import Interactions

START_2026_MS = 1_767_225_600_000
"""2026-01-01T00:00:00Z, the default start of the simulated period."""

DAY_MS = 86_400_000
_SESSION_CHUNK = 256  # sessions sampled together; fixed so results never depend on memory


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of a synthetic world; defaults train in seconds on two cores."""

    users: int = 2000
    items: int = 5000
    categories: int = 20
    latent_dim: int = 16
    sessions_per_user: float = 4.0
    """Mean sessions per user over the period (Poisson, at least one)."""
    session_length: float = 8.0
    """Mean interactions per session (one plus a Poisson)."""
    days: float = 30.0
    popularity_exponent: float = 1.0
    """Item at popularity rank r has weight r^-exponent (Zipf)."""
    affinity_sharpness: float = 10.0
    """How strongly the latent match drives choices and clicks."""
    session_focus: float = 0.6
    """How much a session leans towards one category the user likes at that moment."""
    drift: float = 0.5
    """0: interests never change; 1: by the end they sit on a new category."""
    click_offset: float = 8.0
    """Logit offset of the click model; larger means a lower base click-through rate."""
    seed: int = 0
    start_ms: int = START_2026_MS

    def __post_init__(self) -> None:
        for name in ("users", "items", "categories", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic config: {name} must be at least 1")
        if self.sessions_per_user <= 0 or self.session_length < 1 or self.days <= 0:
            raise ValueError("synthetic config: sessions, session length and days must be positive")
        if not 0.0 <= self.drift <= 1.0:
            raise ValueError("synthetic config: drift must lie in [0, 1]")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> SyntheticConfig:
        return cls(**json.loads(text))


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticWorld:
    """The ground truth of one synthetic config: item and user latent vectors, popularity."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        c = config
        rng = np.random.default_rng([c.seed, 0])
        d = c.latent_dim

        self.category_centres = _normalize(rng.standard_normal((c.categories, d)))
        category_share = rng.permutation(_zipf_weights(c.categories, 0.7))
        self.item_category = rng.choice(c.categories, size=c.items, p=category_share).astype(
            np.int32
        )
        item_noise = rng.standard_normal((c.items, d)) / np.sqrt(d)
        self.item_vectors = _normalize(self.category_centres[self.item_category] + 0.6 * item_noise)
        popularity_rank = rng.permutation(c.items)
        self.item_log_popularity = (-c.popularity_exponent * np.log1p(popularity_rank)).astype(
            np.float32
        )

        # Each user likes one to three categories, with Dirichlet weights.
        interest_count = rng.integers(1, 4, size=c.users)
        start = np.zeros((c.users, d), dtype=np.float64)
        for u in range(c.users):
            cats = rng.choice(c.categories, size=interest_count[u], replace=False, p=category_share)
            weights = rng.dirichlet(np.ones(interest_count[u]))
            start[u] = weights @ self.category_centres[cats]
        start += 0.5 * rng.standard_normal((c.users, d)) / np.sqrt(d)
        self.user_start = _normalize(start)
        new_interest = rng.choice(c.categories, size=c.users, p=category_share)
        self.user_end = _normalize(
            (1.0 - c.drift) * self.user_start + c.drift * self.category_centres[new_interest]
        )

        self.user_ids = [f"u{u:0{len(str(c.users - 1))}d}" for u in range(c.users)]
        self.item_ids = [f"i{i:0{len(str(c.items - 1))}d}" for i in range(c.items)]
        self.category_names = [f"c{k:0{len(str(c.categories - 1))}d}" for k in range(c.categories)]
        self._user_position = {u: n for n, u in enumerate(self.user_ids)}
        self._item_position = {i: n for n, i in enumerate(self.item_ids)}

    # --- time -------------------------------------------------------------------------

    @property
    def end_ms(self) -> int:
        return self.config.start_ms + int(self.config.days * DAY_MS)

    def period_fraction(self, at_ms: np.ndarray | int) -> np.ndarray:
        """Where `at_ms` lies in the simulated period, clipped to [0, 1]."""
        span = self.end_ms - self.config.start_ms
        return np.clip((np.asarray(at_ms, dtype=np.float64) - self.config.start_ms) / span, 0, 1)

    # --- ground truth -----------------------------------------------------------------

    def preference_vectors(self, users: np.ndarray, at_ms: np.ndarray | int) -> np.ndarray:
        """Latent preference of each user (index) at a time: on the way from start to end."""
        f = (
            self.period_fraction(at_ms)[..., None]
            if np.ndim(at_ms)
            else self.period_fraction(at_ms)
        )
        return _normalize((1.0 - f) * self.user_start[users] + f * self.user_end[users])

    def click_logits(
        self, users: np.ndarray, items: np.ndarray, at_ms: np.ndarray | int
    ) -> np.ndarray:
        """Logit of a click for pairs (users[n], items[n]) at `at_ms` (scalar or per pair)."""
        prefs = self.preference_vectors(np.asarray(users), at_ms)
        affinity = np.einsum("nd,nd->n", prefs, self.item_vectors[np.asarray(items)])
        return (
            self.config.affinity_sharpness * affinity
            + 0.5 * self.item_log_popularity[np.asarray(items)]
            - self.config.click_offset
        )

    def click_probability_by_index(
        self, users: np.ndarray, items: np.ndarray, at_ms: np.ndarray | int
    ) -> np.ndarray:
        """Probability that user `users[n]` clicks item `items[n]` when shown it at `at_ms`."""
        return _sigmoid(self.click_logits(users, items, at_ms))

    def click_probability(
        self, user_ids: Sequence[str], item_ids: Sequence[str], at_ms: np.ndarray | int
    ) -> np.ndarray:
        """`click_probability_by_index` for external ids; an unknown id is a KeyError."""
        users = np.array([self._user_position[u] for u in user_ids], dtype=np.int64)
        items = np.array([self._item_position[i] for i in item_ids], dtype=np.int64)
        return self.click_probability_by_index(users, items, at_ms)

    def user_index(self, user_id: str) -> int:
        return self._user_position[user_id]

    def item_index(self, item_id: str) -> int:
        return self._item_position[item_id]

    # --- the interaction log ----------------------------------------------------------

    def interactions(self) -> Interactions:
        """Sample the interaction log of the whole period (chronological order)."""
        c = self.config
        rng = np.random.default_rng([c.seed, 1])
        sessions_per_user = np.maximum(1, rng.poisson(c.sessions_per_user, size=c.users))
        session_user = np.repeat(np.arange(c.users, dtype=np.int64), sessions_per_user)
        n_sessions = len(session_user)
        session_start = rng.uniform(0.0, 1.0, size=n_sessions)
        max_length = min(c.items, int(np.ceil(4 * c.session_length)))
        session_length = np.minimum(
            max_length, 1 + rng.poisson(max(c.session_length - 1.0, 0.0), size=n_sessions)
        )

        users_out, items_out, ts_out, session_out, dwell_out = [], [], [], [], []
        span_ms = self.end_ms - c.start_ms
        for lo in range(0, n_sessions, _SESSION_CHUNK):
            hi = min(lo + _SESSION_CHUNK, n_sessions)
            users = session_user[lo:hi]
            start_ms = c.start_ms + (session_start[lo:hi] * span_ms).astype(np.int64)
            prefs = self.preference_vectors(users, start_ms)
            # The session leans towards one category the user likes right now.
            category_logits = c.affinity_sharpness * prefs @ self.category_centres.T
            focus = _sample_rows(rng, category_logits)
            intent = _normalize(prefs + c.session_focus * self.category_centres[focus])
            logits = c.affinity_sharpness * intent @ self.item_vectors.T + self.item_log_popularity
            # Gumbel top-k: a draw without replacement, in order of choice.
            perturbed = logits + rng.gumbel(size=logits.shape)
            top = np.argpartition(-perturbed, max_length - 1, axis=1)[:, :max_length]
            order = np.argsort(-np.take_along_axis(perturbed, top, axis=1), axis=1, kind="stable")
            chosen = np.take_along_axis(top, order, axis=1)
            for row in range(hi - lo):
                length = int(session_length[lo + row])
                items = chosen[row, :length]
                affinity = intent[row] @ self.item_vectors[items].T
                dwell = np.clip(
                    np.exp(np.log(20_000.0) + 1.5 * affinity + 0.5 * rng.standard_normal(length)),
                    500,
                    600_000,
                ).astype(np.int64)
                gaps = rng.exponential(5_000.0, size=length).astype(np.int64)
                offsets = np.concatenate([[0], np.cumsum(dwell + gaps)[:-1]])
                users_out.append(np.full(length, users[row], dtype=np.int32))
                items_out.append(items.astype(np.int32))
                ts_out.append(start_ms[row] + offsets)
                session_out.append(np.full(length, lo + row, dtype=np.int32))
                dwell_out.append(dwell.astype(np.int32))

        log = Interactions(
            user_ids=list(self.user_ids),
            item_ids=list(self.item_ids),
            item_category=self.item_category.copy(),
            category_names=list(self.category_names),
            user=np.concatenate(users_out),
            item=np.concatenate(items_out),
            timestamp_ms=np.concatenate(ts_out).astype(np.int64),
            session=np.concatenate(session_out),
            dwell_ms=np.concatenate(dwell_out),
        )
        return log.sorted_by_time()


def _sample_rows(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """One categorical draw per row of `logits` (Gumbel-max)."""
    return np.argmax(logits + rng.gumbel(size=logits.shape), axis=1)


SYNTHETIC_CONFIG_FILE = "synthetic.json"
INTERACTIONS_FILE = "interactions.npz"


def write_synthetic_dataset(config: SyntheticConfig, directory: Path) -> Interactions:
    """Generate the log of `config` into `directory` (interactions plus the config that
    regenerates the ground truth) and return it."""
    world = SyntheticWorld(config)
    log = world.interactions()
    directory.mkdir(parents=True, exist_ok=True)
    log.save(directory / INTERACTIONS_FILE)
    (directory / SYNTHETIC_CONFIG_FILE).write_text(config.to_json() + "\n")
    return log


def load_synthetic_world(directory: Path) -> SyntheticWorld:
    """The ground truth of a dataset written by `write_synthetic_dataset`."""
    return SyntheticWorld(
        SyntheticConfig.from_json((directory / SYNTHETIC_CONFIG_FILE).read_text())
    )
