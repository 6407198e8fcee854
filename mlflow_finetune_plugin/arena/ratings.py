"""Arena ratings: Bradley-Terry ratings of models from pairwise votes, with bootstrap 95% intervals.

The method of Chatbot Arena (FastChat `fastchat/serve/monitor/elo_analysis.py`, `compute_elo_mle_with_tie` and
`get_bootstrap_result_elo_mle_with_tie`): P(A beats B) = 1 / (1 + 10 ** ((R_B - R_A) / 400)); the ratings
maximize the likelihood of the votes, a tie counting as half a win each way; the 95% interval of each rating
is the 2.5th to 97.5th percentile over fits to the votes resampled with replacement. On the Elo-like scale,
1000 is the average of the rated models. Pure numpy/scipy: nothing here knows about MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mlflow_finetune_plugin.errors import FinetuneError

SCALE, BASE, INIT_RATING = 400.0, 10.0, 1000.0
ROUNDS = 1000          # bootstrap resamples, as the Arena's leaderboard uses
MIN_VOTES = 10         # rated votes a model needs before its interval is trusted to separate it from another
# A weak Gaussian prior on the (natural-scale) ratings: it keeps them finite when a model won every vote,
# where the maximum-likelihood rating is infinite; with votes both ways it moves a rating by far less than a
# point.
_PRIOR = 1e-3
_ALPHA = np.log(BASE)


@dataclass(frozen=True)
class Battle:
    """One vote between two models: `outcome` 1.0 when A won, 0.0 when B won, 0.5 for a tie."""

    model_a: str
    model_b: str
    outcome: float


@dataclass
class Rating:
    model: str
    rating: float           # the fit to all votes
    lower: float            # 95% bootstrap interval
    upper: float
    votes: int              # rated votes the model took part in
    # 1 + the number of models rated clearly above it (their interval above its interval)
    rank: int = 1

    @property
    def interval(self) -> str:
        return f"[{self.lower:.0f}, {self.upper:.0f}]"


@dataclass
class Leaderboard:
    ratings: list[Rating] = field(default_factory=list)   # best first
    rounds: int = ROUNDS
    seed: int = 0
    min_votes: int = MIN_VOTES

    def get(self, model: str) -> Rating | None:
        return next((r for r in self.ratings if r.model == model), None)

    def too_few(self, rating: Rating | None) -> bool:
        return rating is None or rating.votes < self.min_votes

    def separation(self, first: str, second: str) -> tuple[str | None, str]:
        """(the model rated clearly above the other, or None when the votes cannot tell them apart; why)."""
        a, b = self.get(first), self.get(second)
        short = [f"{m} has {r.votes if r else 0}" for m, r in ((first, a), (second, b)) if self.too_few(r)]
        if short:
            return None, (f"too few votes to separate: {', '.join(short)} (at least {self.min_votes} each "
                          "needed)")
        top, low = (a, b) if a.rating >= b.rating else (b, a)
        if top.lower > low.upper:
            return top.model, f"{top.model} ahead: {top.interval} above {low.interval}"
        return None, f"too few votes to separate: 95% intervals overlap ({a.interval} and {b.interval})"


def rate(battles: list[Battle], rounds: int = ROUNDS, seed: int = 0,
         min_votes: int = MIN_VOTES) -> Leaderboard:
    """Bradley-Terry ratings of every model in `battles` with bootstrap intervals; the same votes and seed
    give the same table. A battle of a model against itself says nothing and is left out."""
    if rounds < 100:
        raise FinetuneError(
            f"bootstrap rounds={rounds}: a 95% interval needs at least 100 resamples (default "
            f"{ROUNDS})")
    board = Leaderboard(rounds=rounds, seed=seed, min_votes=min_votes)
    battles = [b for b in battles if b.model_a != b.model_b]
    if not battles:
        return board
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    index = {m: i for i, m in enumerate(models)}
    rows = np.array([(index[b.model_a], index[b.model_b], 2 * b.outcome) for b in battles], dtype=np.int64)
    # Identical votes become one row with a count: the fit and every resample work on the counts.
    unique, counts = np.unique(rows, axis=0, return_counts=True)
    matchups, outcomes, weights = unique[:, :2], unique[:, 2] / 2.0, counts.astype(np.float64)
    design = np.zeros((len(matchups), len(models)))
    design[np.arange(len(matchups)), matchups[:, 0]] = 1.0
    design[np.arange(len(matchups)), matchups[:, 1]] = -1.0
    point = _fit(design, outcomes, weights[None, :])[0]
    # Resampling the votes with replacement = drawing the counts of the distinct votes from a multinomial.
    resampled = np.random.default_rng(seed).multinomial(len(battles), weights / weights.sum(), size=rounds)
    lower, upper = np.percentile(_elo(_fit(design, outcomes, resampled.astype(np.float64), start=point)),
                                 [2.5, 97.5], axis=0)
    votes = np.bincount(matchups.ravel(), weights=np.repeat(weights, 2), minlength=len(models))
    board.ratings = sorted((Rating(m, float(_elo(point)[i]), float(lower[i]), float(upper[i]), int(votes[i]))
                            for i, m in enumerate(models)), key=lambda r: (-r.rating, r.model))
    for r in board.ratings:
        r.rank = 1 + sum(other.lower > r.upper for other in board.ratings)
    return board


def _elo(natural: np.ndarray) -> np.ndarray:
    return SCALE * natural + INIT_RATING


def _fit(design: np.ndarray, outcomes: np.ndarray, weights: np.ndarray,
         start: np.ndarray | None = None) -> np.ndarray:
    """Natural-scale ratings maximizing the (weakly regularized) Bradley-Terry likelihood, one row per row of
    `weights` (counts of the distinct votes); each row sums to zero. `design` has +1 for model A, -1 for model
    B.

    The fits are independent, so they are solved as one problem: one optimizer run instead of one per
    resample."""
    from scipy.optimize import minimize

    n_fits, n_models = len(weights), design.shape[1]
    x0 = np.tile(np.zeros(n_models) if start is None else start, n_fits)
    result = minimize(_loss_and_grad, x0, args=(design, outcomes, weights), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-9, "ftol": 1e-15, "maxiter": 10_000})
    return result.x.reshape(n_fits, n_models)


def _loss_and_grad(flat, design, outcomes, weights):
    """Negative log-likelihood and its gradient; outcome 0.5 is half a win and half a loss."""
    from scipy.special import expit, log_expit

    ratings = flat.reshape(len(weights), design.shape[1])
    logits = _ALPHA * ratings @ design.T
    loss = -(weights * (outcomes * log_expit(logits) + (1 - outcomes) * log_expit(-logits))).sum()
    grad = (-_ALPHA * weights * (outcomes - expit(logits))) @ design
    return loss + 0.5 * _PRIOR * (flat @ flat), (grad + _PRIOR * ratings).ravel()
