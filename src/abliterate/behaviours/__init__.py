"""What a behaviour is: profiles and prompt sources (bundled data lives in abliterate/data)."""

from abliterate.behaviours.profiles import Profile, bundled_profiles, load_profile
from abliterate.behaviours.prompts import PromptSplits, SplitSizes, bundled, load_source, make_splits

__all__ = [
    "bundled",
    "bundled_profiles",
    "load_profile",
    "load_source",
    "make_splits",
    "Profile",
    "PromptSplits",
    "SplitSizes",
]
