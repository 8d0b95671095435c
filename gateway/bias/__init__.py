"""The sampling-bias mark: where the upstream takes `logit_bias`, its sampling favours a keyed list of tokens."""

from .green import SCHEME, GreenList, Vocabulary, VocabularyError, detect, green_list, green_test
from .mark import SamplingBias

__all__ = [
    "SCHEME",
    "GreenList",
    "SamplingBias",
    "Vocabulary",
    "VocabularyError",
    "detect",
    "green_list",
    "green_test",
]
