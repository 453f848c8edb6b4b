"""The pipeline: a run's config, its resolved context, its stages, and the apply/eval flows the CLI calls."""
