"""From prompts to activations to directions: batching, capture, first-token scoring, direction estimators."""

from abliterate.measure.capture import Activations
from abliterate.measure.directions import Direction, DirectionSet, combine, mean_diff, projected, slerp
from abliterate.measure.first_token import first_token_logprobs, kl_divergence, refusal_scores

__all__ = [
    "Activations",
    "combine",
    "Direction",
    "DirectionSet",
    "first_token_logprobs",
    "kl_divergence",
    "mean_diff",
    "projected",
    "refusal_scores",
    "slerp",
]
