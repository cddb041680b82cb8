"""A small, real CLIP tokenizer built offline for the tiny base models.

It is byte-level BPE exactly like CLIP's (lowercasing, CLIP's pre-tokenizer split, "</w>" word endings,
<|startoftext|> / <|endoftext|>, 77 tokens), so the stock `CLIPTokenizer` loads it from a model folder. The
vocabulary holds every byte (so nothing is ever unknown) plus one whole-word token for each word in WORDS;
merges are derived so each of those words becomes a single token. Everything is a pure function of WORDS,
so the files are byte-identical on every run.
"""

from __future__ import annotations

from functools import cache

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
EOW = "</w>"

# The caption schema of the sample data and specs (the trigger, views, colours, finishes, parts) first,
# then common English words for free-form prompts. Order matters: it fixes token ids. Only letters:
# CLIP's pre-tokenizer splits "three-quarter" into "three", "-", "quarter".
_WORD_TEXT = """
hdaesth front side three quarter top view views sage green coral red slate blue cream white charcoal gray grey
mustard yellow dusty pink teal body matte glossy finish dome flat lid transparent reservoir lit dark round
wide screen screens two one four button buttons light warm beige pale off mist blush background studio shadow
render renders turntable photo photograph image picture style design aesthetic hardware object device seam
grip accent water tank shoulder shoulders rounded plain soft floor highlight rim reflection orthographic a an
the and or of in on at to with without for from by as is are be it its this that these those there here not no
yes all any some each every more most less few many much very so too also only just than then color colors
colour colours black brown orange purple violet gold silver bronze beige tan navy olive lime cyan magenta
ivory gradient tone tones shade shades bright dim shiny metallic plastic wood wooden glass metal ceramic paper
fabric leather rubber stone concrete smooth rough textured clean simple minimal modern classic vintage retro
industrial product appliance machine coffee kettle toaster lamp speaker camera phone radio clock watch bottle
cup mug bowl plate chair table desk shelf box case cover handle knob dial switch panel display led icon logo
label text number numbers small large big tiny huge tall short long thin thick narrow left right center centre
middle upper lower inner outer back bottom corner edge surface shape form line lines curve curved straight
square circle circular oval sphere cube cylinder cone triangle rectangle pattern stripe stripes dot dots grid
close closeup up down detail details high low quality best worst resolution sharp focus blurry blur noise
grain lighting sunlight daylight night day morning evening indoor outdoor scene room kitchen office home house
building city street road tree trees grass flower flowers sky cloud clouds sun moon star stars sea ocean river
lake mountain hill field forest garden park beach sand snow rain person people man woman child boy girl face
hand hands eye eyes hair head arm arms leg legs standing sitting walking running holding looking wearing open
closed empty full new old young clean dirty wet dry hot cold art artwork painting drawing sketch illustration
digital concept realistic photorealistic cinematic portrait landscape still life product shot angle
perspective isometric overhead above below beside behind under over near far inside outside between around
against through into onto across along white red green blue one two three four five six seven eight nine ten
first second third make made making show shows showing look looks use used using have has had do does did can
could will would should may might must get got take taken see seen give given put set keep let begin end start
stop
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


def _unique(words: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for word in words:
        if not word.isalpha() or not word.isascii() or word != word.lower():
            raise ValueError(f"tokenizer word {word!r} must be lowercase ASCII letters")
        seen.setdefault(word, None)
    return tuple(seen)


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE as CLIP applies it: merge the lowest-ranked adjacent pair (leftmost first) until none apply."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
        ranked = [(rank, i) for rank, i in pairs if rank is not None]
        if not ranked:
            break
        _, i = min(ranked)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


@cache
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary (bytes, bytes+</w>, merged tokens, specials) and the merges that build WORDS.

    Each word is first run through the merges so far; whatever pieces remain are joined left to right by
    new merges ranked after every existing one. Adding lower-priority merges never changes how an earlier
    word tokenizes, so every word in WORDS ends as one token.
    """
    base = _bytes_to_unicode()
    tokens = base + [c + EOW for c in base]
    ranks: dict[tuple[str, str], int] = {}
    for word in _unique(WORDS):
        pieces = _bpe(list(word[:-1]) + [word[-1] + EOW], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(ranks)
            tokens.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1]] + pieces[2:]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, list(ranks)


def build_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The tiny models' CLIP tokenizer; SDXL's second tokenizer pads with "!" as the real one does."""
    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MAX_LENGTH)
