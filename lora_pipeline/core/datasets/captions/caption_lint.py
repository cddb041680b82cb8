"""Linting a caption set: trigger placement, empty and shared captions, vocabulary and banned words.

The captions linted are already normalised (tags.normalise_caption: one line, tags split on the separator)
and compare with the trigger case-insensitively. Words, for the vocabulary and banned-word rules, are runs
of letters/digits that may be joined by '-' or "'" ("three-quarter" is one word) and compare
case-insensitively.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

from lora_pipeline.core.datasets.captions.tags import is_trigger, split_tags
from lora_pipeline.core.datasets.problems import Problem, problem
from lora_pipeline.core.datasets.spec import DatasetSpec
from lora_pipeline.core.errors import is_control, printable

_WORD = re.compile(r"\w+(?:[-']\w+)*")

# Caption words that say an image shows writing, which flip_aug would mirror.
TEXT_WORDS = re.compile(r"\b(text|texts|logo|logos|lettering|letters?|words?|writing|written|label|labels|"
                        r"signage|sign|typography|font|wordmark|brand name|inscription|numbers?|digits?)\b",
                        re.IGNORECASE)


def control_problem(image: str, text: str, scope: str) -> Problem | None:
    """A blocking `caption_control_character` error when a caption file's text (as read, before it is joined into
    one line) holds a control character (errors.is_control: ESC, CR, NUL ...): it would stay in the trained
    caption and act on the terminal of whoever prints it. Line ends (LF, CRLF) and tabs are plain text."""
    found = sorted({ch for ch in text.replace("\r\n", "\n") if ch not in "\n\t" and is_control(ch)})
    if not found:
        return None
    shown = ", ".join(printable(ch) for ch in found)
    message = f"the caption holds control characters ({shown}); remove them from the caption file"
    return problem(image, "caption_control_character", "error", message, scope)


def words(text: str) -> list[str]:
    """Lower-cased words of a text, in order (see the module docstring)."""
    return _WORD.findall(text.lower())


def phrase_pattern(phrase: str) -> re.Pattern[str]:
    """Case-insensitive whole-word match for a word or phrase: "product" does not match "production"."""
    body = r"\s+".join(re.escape(part) for part in phrase.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def lint_captions(
    captions: Mapping[str, str], spec: DatasetSpec
) -> tuple[list[Problem], dict[str, Any], dict[str, dict[str, int]]]:
    """Check final (normalised, trigger-placed) captions against the spec's caption rules.

    `captions` maps snapshot image paths to caption text; problems name those paths, scoped to the
    snapshot. Returns (problems, lint stats, kohya ss_tag_frequency). Rules: the trigger is the first
    tag (`trigger_not_first`, error); a caption with no tag besides the trigger is `empty_caption`
    (error); each banned word or phrase found is a `banned_word` error; with a vocabulary, one
    `out_of_vocabulary` warning per caption lists its unknown words (the trigger tag and plain numbers
    are exempt); a caption used by more than `shared_caption_limit` images is a `shared_caption`
    warning on each. With the spec's `flip_aug`, a caption that mentions writing (TEXT_WORDS) is a
    `flip_mirrors_text` warning, since a flip mirrors it. In the stats, `oov_terms` and `banned_hits` count
    captions, not occurrences.
    """
    rules = spec.captions
    scope = f"dataset:{spec.name}"
    vocabulary = {word for entry in rules.vocabulary for word in words(entry)}
    banned = [(word, phrase_pattern(word)) for word in rules.banned]
    problems: list[Problem] = []
    oov_terms: Counter[str] = Counter()
    banned_hits: Counter[str] = Counter()
    frequency: Counter[str] = Counter()
    tag_counts: list[int] = []
    by_text: dict[str, list[str]] = defaultdict(list)
    empty = 0
    mirrored = 0

    for path, caption in sorted(captions.items()):
        tags = split_tags(caption)
        tag_counts.append(len(tags))
        frequency.update(tag.lower() for tag in tags)  # kohya lower-cases tags for ss_tag_frequency
        content = [tag for tag in tags if not is_trigger(tag, spec.trigger)]
        if not content:
            empty += 1
            message = "the caption has no tag besides the trigger"
            problems.append(problem(path, "empty_caption", "error", message, scope))
        else:
            by_text[caption].append(path)
            if not is_trigger(tags[0], spec.trigger):
                problems.append(
                    problem(
                        path,
                        "trigger_not_first",
                        "error",
                        f"the first tag is '{tags[0]}', not the trigger '{spec.trigger}'"
                        " (or set captions.prepend_trigger: true)",
                        scope,
                    )
                )
        for word, pattern in banned:
            if pattern.search(caption):
                banned_hits[word] += 1
                message = f"the caption uses the banned word '{word}'"
                problems.append(problem(path, "banned_word", "error", message, scope))
        mention = TEXT_WORDS.search(caption) if spec.flip_aug else None
        if mention:
            mirrored += 1
            message = (f"the caption mentions '{mention.group(0)}' and the spec's flip_aug mirrors images "
                       "left-right, so writing would be learned mirrored")
            problems.append(problem(path, "flip_mirrors_text", "warning", message, scope))
        if vocabulary:
            unknown = [w for tag in content for w in words(tag) if w not in vocabulary and not w.isdigit()]
            terms = list(dict.fromkeys(unknown))
            if terms:
                oov_terms.update(terms)
                problems.append(
                    problem(
                        path,
                        "out_of_vocabulary",
                        "warning",
                        f"words not in captions.vocabulary: {', '.join(terms)}",
                        scope,
                    )
                )

    shared = []
    for caption, paths in sorted(by_text.items(), key=lambda item: (-len(item[1]), item[0])):
        if len(paths) > rules.shared_caption_limit:
            shared.append({"caption": caption, "count": len(paths), "files": paths})
            message = (
                f"the same caption is used by {len(paths)} images (limit {rules.shared_caption_limit}),"
                " so the model cannot tell them apart"
            )
            problems.extend(problem(p, "shared_caption", "warning", message, scope) for p in paths)

    lint = {
        "captions": len(captions),
        "empty": empty,
        "oov_terms": dict(oov_terms.most_common()),
        "banned_hits": dict(banned_hits.most_common()),
        "shared_captions": shared,
        "tags_per_caption": {
            "min": min(tag_counts, default=0),
            "max": max(tag_counts, default=0),
            "mean": round(statistics.fmean(tag_counts), 2) if tag_counts else 0.0,
        },
    }
    if spec.flip_aug:  # only then: captions.json of a spec without flip_aug stays as it was
        lint["flip_mirrors_text"] = mirrored
    tag_frequency = {spec.class_folder: dict(sorted(frequency.items(), key=lambda item: (-item[1], item[0])))}
    return problems, lint, tag_frequency
