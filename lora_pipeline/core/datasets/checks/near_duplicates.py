"""Near-duplicate search over 64-bit dHashes, without comparing every pair (multi-index hashing).

The hash is cut into 4 bands of 16 bits. Two hashes within Hamming distance d differ in at most d // 4 bits
of at least one band (pigeonhole: were every band off by more, the distance would exceed d). So the earlier
images worth comparing with an image are those whose value in some band is within d // 4 bits (1 bit for the
threshold of 6) of its own: 4 x 17 dictionary lookups per image instead of a pass over every earlier image.
Each candidate is then checked exactly as the all-pairs search did (distance, colour gap, different bytes),
and the closest, earliest match is kept: the result is the same list (the test suite compares the two on
planted near duplicates).

Cost: the lookups, plus the candidates that share a band value by chance, about n / 65,536 per lookup for
unrelated photos (a few per image at 20,000 images), plus the real near duplicates. A batch of many
near-identical images (a folder of flat colour cards) makes the candidate lists long, and the search tends
back to comparing those pairs, as the all-pairs search always did.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations

HASH_BITS = 64
BANDS = 4


def bands(count: int = BANDS) -> list[tuple[int, int]]:
    """(shift, mask) of `count` disjoint bit ranges covering the 64-bit hash, as even as can be."""
    out, start = [], 0
    for k in range(count):
        width = HASH_BITS // count + (1 if k < HASH_BITS % count else 0)
        out.append((start, (1 << width) - 1))
        start += width
    return out


def flips(width: int, radius: int) -> list[int]:
    """Every XOR mask of at most `radius` set bits among `width` bits (0 first)."""
    return [sum(1 << b for b in bits) for r in range(radius + 1) for bits in combinations(range(width), r)]


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
    layout = bands()
    near = [flips(mask.bit_length(), max_distance // len(layout)) for _, mask in layout]
    index: list[defaultdict[int, list[int]]] = [defaultdict(list) for _ in layout]
    out = []
    for j, h in enumerate(hashes):
        keys = [(h >> shift) & mask for shift, mask in layout]
        candidates: set[int] = set()
        for table, key, masks in zip(index, keys, near, strict=True):
            for flip in masks:
                if found := table.get(key ^ flip):
                    candidates.update(found)
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
