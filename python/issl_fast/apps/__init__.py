"""Applications on a fitted store: duplicates, outliers, group (fairness) influence."""

from .duplicates import DuplicatePairs, find_duplicates, normalised_neighbours
from .fairness import GroupInfluence, group_influence
from .outliers import OutlierRanking, find_outliers, neighbour_scores

__all__ = [
    "DuplicatePairs",
    "GroupInfluence",
    "OutlierRanking",
    "find_duplicates",
    "find_outliers",
    "group_influence",
    "neighbour_scores",
    "normalised_neighbours",
]
