"""Prompt lookup (bild/lookup.py): drafts copied from the context."""

from __future__ import annotations

from bild.lookup import lookup


def test_the_latest_earlier_occurrence_of_the_longest_suffix_wins():
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(seq, (3, 2), 4) == [7, 8, 5, 2]  # "2 3" last stood before "7 8 ..."; no earlier "5 2 3"
    assert lookup(seq, (2,), 2) == [7, 8]
    assert lookup([4, 5, 6, 4, 5], (2,), 10) == [6, 4, 5]


def test_longer_sizes_are_tried_first():
    seq = [1, 2, 3, 4, 0, 2, 3, 5, 0, 1, 2, 3]
    assert lookup(seq, (3, 2), 2) == [4, 0]  # "1 2 3" matches at the start
    assert lookup(seq, (2, 3), 2) == [5, 0]  # "2 3" first: its latest occurrence


def test_no_match_no_room_or_no_sizes_propose_nothing():
    assert lookup([1, 2, 3, 4], (2, 1), 5) == []
    assert lookup([1, 2, 1, 2], (2,), 0) == []
    assert lookup([1, 2, 1, 2], (), 5) == []
    assert lookup([7], (1,), 5) == []


def test_a_repeating_token_continues_itself():
    assert lookup([3, 3, 3], (1,), 4) == [3]
