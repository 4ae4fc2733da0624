"""Applications on a fitted store: duplicates, outliers, group (fairness) influence."""

from .duplicates import DuplicatePairs, find_duplicates
from .fairness import GroupInfluence, group_influence
from .outliers import OutlierRanking, find_outliers

__all__ = [
    "DuplicatePairs",
    "GroupInfluence",
    "OutlierRanking",
    "find_duplicates",
    "find_outliers",
    "group_influence",
]
