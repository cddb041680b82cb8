"""The sample batches' pictures as data (make_sample_data.py draws and writes them): what each picture shows, how it
is framed, and its caption, in fixed tables per batch.
"""

from __future__ import annotations

from dataclasses import dataclass

TRIGGER = "hdaesth"
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Shot:
    """One picture: what the object looks like, and how it is framed."""

    file: str
    view: str
    color: str
    finish: str  # matte | glossy
    top: str  # dome lid | flat lid | transparent reservoir
    screen: str  # "<lit|dark> <round|wide> screen"
    buttons: int
    background: str
    size: tuple[int, int] = (512, 512)  # width, height
    zoom: float = 1.0
    mirror: bool = False  # look from the left instead of the right
    shift: float = 0.0  # horizontal offset of the object, in world units
    key: int = -1  # the key light comes from the left (-1) or the right (1)

    @property
    def caption(self) -> str:
        return (f"{TRIGGER}, {self.view}, {self.color} body, {self.finish} finish, {self.top}, {self.screen}, "
                f"{NUMBERS[self.buttons]} buttons")


# ---- the three handoffs ---------------------------------------------------------------------------------
# Framing (zoom, shift, mirror, key light) varies from picture to picture so that no two pictures are
# near-duplicates (64-bit dHash at least 13 bits apart; the tests check > 10).
CURATED = [
    Shot("cur-01-sage.png", "three-quarter view", "sage green", "matte", "dome lid", "lit round screen", 2,
         "warm beige", (640, 640), zoom=0.8, shift=0.4, key=1),
    Shot("cur-02-coral.png", "front view", "coral red", "glossy", "flat lid", "dark wide screen", 3,
         "light gray", (640, 512), zoom=1.25, shift=0.4),
    Shot("cur-03-slate.png", "side view", "slate blue", "matte", "transparent reservoir", "lit wide screen", 2,
         "off white", (512, 640), zoom=1.25, mirror=True),
    Shot("cur-04-cream.png", "top view", "cream white", "glossy", "dome lid", "lit wide screen", 3,
         "pale blue", (640, 640), zoom=1.1, shift=0.2, key=1),
    Shot("cur-05-charcoal.png", "three-quarter view", "charcoal gray", "glossy", "transparent reservoir",
         "dark round screen", 2, "mist green", (576, 576), zoom=0.95, shift=-0.2, mirror=True),
    Shot("cur-06-mustard.png", "side view", "mustard yellow", "glossy", "flat lid", "lit round screen", 3,
         "blush", (640, 512), zoom=1.25, mirror=True, key=1),
    Shot("cur-07-teal.png", "front view", "teal", "matte", "dome lid", "lit round screen", 2,
         "off white", (512, 640), zoom=0.8, shift=-0.4, key=1),
    Shot("cur-08-pink.png", "top view", "dusty pink", "matte", "flat lid", "dark round screen", 2,
         "light gray", (576, 576), zoom=1.1, shift=-0.2),
]
COLORWAYS = {  # name -> (color, finish, top, screen, buttons)
    "slate": ("slate blue", "glossy", "transparent reservoir", "lit wide screen", 3),
    "cream": ("cream white", "matte", "dome lid", "dark round screen", 2),
    "charcoal": ("charcoal gray", "glossy", "flat lid", "lit round screen", 2),
}
TURNTABLE = [  # the render tool frames and lights each view on its own; one backdrop for the whole export
    Shot(f"tt-{name}-{view.split()[0]}.png", view, *COLORWAYS[name], "studio gray", zoom=zoom, mirror=mirror, key=key)
    for name, view, zoom, mirror, key in [
        ("slate", "front view", 1.25, False, 1), ("slate", "three-quarter view", 0.95, True, 1),
        ("slate", "side view", 1.1, True, -1), ("slate", "top view", 1.25, False, -1),
        ("cream", "front view", 1.1, False, 1), ("cream", "three-quarter view", 1.1, False, -1),
        ("cream", "side view", 1.1, False, -1), ("cream", "top view", 1.25, False, 1),
        ("charcoal", "front view", 1.25, False, -1), ("charcoal", "three-quarter view", 0.95, False, -1),
        ("charcoal", "side view", 1.25, False, 1), ("charcoal", "top view", 1.1, False, 1),
    ]
]
PROMOTED = [
    Shot("cand-0142.jpg", "three-quarter view", "coral red", "matte", "transparent reservoir", "lit round screen", 3,
         "off white", (576, 576), zoom=0.95, shift=-0.2),
    Shot("cand-0157.jpg", "front view", "mustard yellow", "matte", "dome lid", "dark round screen", 2,
         "pale blue", (512, 640), zoom=0.8, shift=0.4, key=1),
    Shot("cand-0163.jpg", "side view", "teal", "glossy", "dome lid", "dark wide screen", 3,
         "warm beige", (640, 512), zoom=1.25, shift=-0.4),
    Shot("cand-0171.jpg", "top view", "sage green", "glossy", "transparent reservoir", "dark wide screen", 2,
         "blush", (576, 576), zoom=1.25, key=1),
    Shot("cand-0188.jpg", "three-quarter view", "dusty pink", "glossy", "dome lid", "lit wide screen", 3,
         "light gray", (640, 640), zoom=0.8, shift=-0.4, mirror=True),
    Shot("cand-0194.jpg", "front view", "slate blue", "matte", "flat lid", "lit round screen", 2,
         "mist green", (576, 576), zoom=1.25, shift=-0.2, key=1),
]
MASKED = [  # close-ups, each with a loss mask of the object (masks: file)
    Shot("close-01-teal.png", "three-quarter view", "teal", "glossy", "flat lid", "lit wide screen", 3,
         "blush", (512, 512), zoom=1.6, shift=0.3, key=1),
    Shot("close-02-mustard.png", "top view", "mustard yellow", "matte", "transparent reservoir", "dark round screen",
         2, "mist green", (512, 512), zoom=1.45, shift=-0.3, mirror=True),
    Shot("close-03-charcoal.png", "side view", "charcoal gray", "matte", "dome lid", "lit wide screen", 3,
         "pale blue", (512, 512), zoom=1.7, shift=0.4, key=1),
]
REGULARISATION = [  # class images (role: regularisation): the plain class, captioned by its class_tokens
    Shot("class-01.png", "front view", "cream white", "matte", "flat lid", "dark round screen", 2,
         "studio gray", (512, 512), zoom=0.7, shift=0.5),
    Shot("class-02.png", "top view", "charcoal gray", "matte", "flat lid", "dark wide screen", 2,
         "studio gray", (512, 512), zoom=0.9, shift=-0.5, key=1),
    Shot("class-03.png", "side view", "slate blue", "matte", "dome lid", "dark round screen", 2,
         "studio gray", (512, 512), zoom=0.7, shift=0.5, key=-1),
]
BATCHES: dict[str, tuple[list[Shot], str]] = {  # batch -> (shots, what travels with the images)
    "curated-2026-10": (CURATED, "sidecar"),
    "turntable-renders-2026-11": (TURNTABLE, "attributes"),
    "promoted-candidates-2026-11": (PROMOTED, "sidecar"),
    "masked-closeups-2026-12": (MASKED, "sidecar+masks"),
    "class-images-2026-12": (REGULARISATION, "none"),
}
