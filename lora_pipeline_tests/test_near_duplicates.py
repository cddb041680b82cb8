"""The multi-index near-duplicate search gives the all-pairs search's findings, on planted near duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from lora_pipeline.core.datasets.checks.near_duplicates import HASH_BITS, bands, flips, near_duplicate_pairs
from lora_pipeline.core.datasets.checks.validation import NEAR_DUPLICATE_COLOUR, NEAR_DUPLICATE_DISTANCE


def all_pairs(hashes, colours, digests, max_distance, max_colour_gap):
    """The search validation.py ran before (issue 14): each image against every earlier one, in numpy. (The
    colour gap is computed for the pairs within the hash distance only: the same matches, 50x less work.)"""
    h = np.array(hashes, dtype=np.uint64)
    c = np.array([list(x) for x in colours], dtype=np.int16)
    d = np.array(digests)
    out = []
    for j in range(1, len(h)):
        distance = np.bitwise_count(h[:j] ^ h[j])
        close = np.flatnonzero((distance <= max_distance) & (d[:j] != d[j]))
        candidates = close[np.abs(c[close] - c[j]).max(axis=1) <= max_colour_gap]
        if candidates.size:
            best = candidates[np.argmin(distance[candidates])]
            out.append((j, int(best), int(distance[best])))
    return out


def planted(n: int, seed: int):
    """n random hashes and colour signatures; a third of them copies of an earlier one with 0-9 flipped bits
    (around the threshold of 6), colours moved by up to +-30 (around 24), some with identical bytes."""
    rng = np.random.default_rng(seed)
    hashes = [int(x) for x in rng.integers(0, 2**63, n, dtype=np.uint64) * 2 + rng.integers(0, 2, n, dtype=np.uint64)]
    colours = [bytes(rng.integers(40, 216, 48, dtype=np.uint8)) for _ in range(n)]
    digests = [f"sha{i}" for i in range(n)]
    for j in range(1, n):
        if rng.random() < 1 / 3:
            i = int(rng.integers(max(0, j - 50) if rng.random() < 0.5 else 0, j))  # near and far originals
            flips = rng.choice(HASH_BITS, int(rng.integers(0, 10)), replace=False)
            hashes[j] = hashes[i] ^ sum(1 << int(b) for b in flips)
            shift = rng.integers(-30, 31, 48) if rng.random() < 0.3 else rng.integers(-12, 13, 48)
            colours[j] = bytes(np.clip(np.frombuffer(colours[i], np.uint8) + shift, 0, 255).astype(np.uint8))
            if rng.random() < 0.05:
                digests[j] = digests[i]  # the same file twice: an exact duplicate, never a near one
    return hashes, colours, digests


@pytest.mark.parametrize("n, seed", [(1000, 1), (5000, 2)])
def test_multi_index_search_equals_the_all_pairs_search(n, seed):
    hashes, colours, digests = planted(n, seed)
    args = (hashes, colours, digests, NEAR_DUPLICATE_DISTANCE, NEAR_DUPLICATE_COLOUR)
    expected = all_pairs(*args)
    assert near_duplicate_pairs(*args) == expected
    distances = {d for _, _, d in expected}
    assert len(expected) > n // 10 and distances == set(range(NEAR_DUPLICATE_DISTANCE + 1))  # a real test


def test_ties_go_to_the_earliest_image_and_identical_bytes_are_skipped():
    base = 0x0123456789ABCDEF
    hashes = [base, base ^ 0b11, base ^ 0b1, base ^ 0b1, base]
    colours = [bytes(48)] * 5
    digests = ["a", "b", "c", "d", "a"]
    # 2 is closest to 0 and 1 (distance 1 each): 0 wins; 3 equals 2 (distance 0); 4 has 0's bytes, so its
    # nearest other file is 2 (distance 1, earlier than 3)
    assert near_duplicate_pairs(hashes, colours, digests, 6, 24) == [(1, 0, 2), (2, 0, 1), (3, 2, 0), (4, 2, 1)]


@pytest.mark.parametrize("count", [1, 4, 7, 64])
def test_bands_cover_every_bit_once(count):
    layout = bands(count)
    covered = [shift + k for shift, mask in layout for k in range(mask.bit_length())]
    assert len(layout) == count and sorted(covered) == list(range(HASH_BITS))


def test_flips_are_every_mask_within_the_radius():
    assert flips(4, 1) == [0, 1, 2, 4, 8] and len(flips(16, 2)) == 1 + 16 + 120


@pytest.mark.parametrize("distance", [0, 3, 9])
def test_other_thresholds_equal_the_all_pairs_search_too(distance):
    hashes, colours, digests = planted(600, distance)
    args = (hashes, colours, digests, distance, NEAR_DUPLICATE_COLOUR)
    assert near_duplicate_pairs(*args) == all_pairs(*args)
