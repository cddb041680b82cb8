"""Near-duplicate search over 64-bit dHashes, without comparing every pair (multi-index hashing).

Two hashes within Hamming distance `max_distance` agree exactly on at least one of `max_distance + 1`
disjoint bands of their bits (pigeonhole: each differing bit spoils one band at most). So the earlier
images worth comparing with an image are those that share one of its band values: a lookup per band in a
dictionary, instead of a pass over every earlier image. Each candidate is then checked exactly as the
all-pairs search did (distance, colour gap, different bytes), and the closest earliest match is kept, so
the result is the same list; the test suite compares the two on planted near duplicates.

The cost is one lookup per image and band plus the candidates that share a band value: about linear for
photographs. Many images with an identical hash band (a folder of flat colour cards) make the candidate
lists long, and the search tends back to comparing those pairs, as the all-pairs search always did.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

HASH_BITS = 64


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of `max_distance + 1` disjoint bit ranges covering the 64-bit hash, as even as can be."""
    count = max_distance + 1
    out, start = [], 0
    for k in range(count):
        width = HASH_BITS // count + (1 if k < HASH_BITS % count else 0)
        out.append((start, (1 << width) - 1))
        start += width
    return out


def near_duplicate_pairs(
    hashes: Sequence[int],
    colours: Sequence[bytes],
    digests: Sequence[str],
    max_distance: int,
    max_colour_gap: int,
) -> list[tuple[int, int, int]]:
    """(j, i, distance) for each j that nearly matches an earlier i (i < j): dHash distance at most
    `max_distance`, every colour-signature byte within `max_colour_gap`, and different bytes (`digests`
    differ: identical files are exact duplicates, not near ones). i is the closest match, the earliest among
    equally close ones. Lists are in the order of the images, which the caller sorts by path."""
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, not {max_distance}")
    layout = bands(max_distance)
    index: list[defaultdict[int, list[int]]] = [defaultdict(list) for _ in layout]
    out = []
    for j, h in enumerate(hashes):
        keys = [(h >> shift) & mask for shift, mask in layout]
        candidates = set()
        for table, key in zip(index, keys, strict=True):
            candidates.update(table.get(key, ()))
        best: tuple[int, int] | None = None  # (distance, i)
        for i in candidates:
            distance = (hashes[i] ^ h).bit_count()
            if distance > max_distance or digests[i] == digests[j]:
                continue
            if max(abs(a - b) for a, b in zip(colours[i], colours[j], strict=True)) > max_colour_gap:
                continue
            if best is None or (distance, i) < best:
                best = (distance, i)
        if best is not None:
            out.append((j, best[1], best[0]))
        for table, key in zip(index, keys, strict=True):
            table[key].append(j)
    return out
