"""A run resolved once: the behaviour profile, the prompt splits (templated, with the prefix and suffix; the
search's held-out check prompts among them) and the run's judge, read from the config a single time and handed,
frozen, to every stage of :mod:`abliterate.run.pipeline` (measure, choose, evaluate, save) instead of each stage
loading them again."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from abliterate.behaviours.profiles import Profile, load_profile, profile_splits
from abliterate.behaviours.prompts import PromptSplits, SplitSizes
from abliterate.evaluate.judge import Judge
from abliterate.run.config import RunConfig
from abliterate.select.sweep import Method, SweepSettings


@dataclass(frozen=True)
class RunContext:
    """What a run works on, resolved from ``cfg``: its profile, its (behaviour side, plain side) prompt splits
    and, for a run that evaluates, its judge."""

    cfg: RunConfig
    profile: Profile
    harmful: PromptSplits  # the behaviour side (for refusal: the harmful prompts)
    harmless: PromptSplits  # the plain side
    judge: Judge | None = None  # the final evaluation's; None where nothing is evaluated (measure)

    @property
    def methods(self) -> list[Method]:
        """The sweep's direction methods (slerp with the config's ``slerp_t``)."""
        return methods_of(self.cfg)

    @property
    def is_refusal(self) -> bool:
        return self.profile.name == "refusal"

    def sweep_settings(self) -> SweepSettings:
        """The config's sweep: its methods, layers and filters, preferring the best induction for goal induce."""
        cfg = self.cfg
        return SweepSettings(
            methods=tuple(self.methods),
            layers=cfg.layers,
            skip_last=cfg.skip_last,
            kl_threshold=cfg.kl_threshold,
            min_induce=cfg.min_induce,
            min_bypass_drop=cfg.min_bypass_drop,
            batch_size=cfg.batch_size,
            prefer="induce" if self.profile.goal == "induce" else "bypass",
        )

    def with_judge(self) -> RunContext:
        """This context with its final-evaluation judge (a judge model is loaded here)."""
        return replace(self, judge=judge_for(self.cfg, self.profile))


def methods_of(cfg: RunConfig) -> list[Method]:
    return [Method(m, {"t": cfg.slerp_t} if m == "slerp" else {}) for m in cfg.methods]


def resolve(cfg: RunConfig, profile: Profile | None = None, *, judge: bool = False) -> RunContext:
    """Load ``cfg``'s behaviour profile (unless given), its judge when ``judge``, and its prompt splits."""
    profile = profile or load_profile(cfg.behaviour)
    final = judge_for(cfg, profile) if judge else None
    harmful, harmless = splits_for(cfg, profile)
    return RunContext(cfg, profile, harmful, harmless, final)


def judge_for(cfg: RunConfig, profile: Profile) -> Judge:
    """The final-evaluation judge: ``cfg.judge`` when it is not the default ``marker``, else the behaviour
    profile's judge (its markers; a judge model loaded on ``cfg.device``)."""
    from abliterate.evaluate.llm_judges import judge_from_spec

    spec = cfg.judge if cfg.judge != "marker" else profile.judge
    if spec == "marker":
        return profile.marker_judge()
    settings: dict[str, Any] = profile.judge_settings()
    labels = cfg.judge_labels or settings.pop("labels", None)
    settings.pop("labels", None)
    load = {"device": cfg.device, "dtype": cfg.dtype, "trust_remote_code": cfg.trust_remote_code}
    return judge_from_spec(spec, labels=labels, batch_size=cfg.batch_size, **settings, **load)


def splits_for(cfg: RunConfig, profile: Profile) -> tuple[PromptSplits, PromptSplits]:
    """(behaviour side, plain side) prompts: for refusal the harmful and harmless sets; with the search's front
    check on, each with up to ``search.check_prompts`` held-out check prompts (see :func:`make_splits`)."""
    sc = cfg.search
    n_check = sc.check_prompts if sc.enabled and sc.verify_top else 0
    sizes = SplitSizes(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed, cfg.prompt_prefix, cfg.prompt_suffix, n_check)
    return profile_splits(profile, sizes, harmful=cfg.harmful, harmless=cfg.harmless)
