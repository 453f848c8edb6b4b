"""From prompts to activations to directions: batching, capture, first-token scoring, direction estimators."""
