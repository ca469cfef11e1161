"""The toy task's words: clip attributes, their answer words, and the question templates.

Every clip carries four attributes (class indices; height and match derive from them); a question
names which one to read:

    visual      colour (4), brightness (2)                     "what colour is the shape ?" -> "red"
    auditory    high/low (2, from the note), note (4), instrument (3)
    audiovisual does the note's index equal the colour's index ("match" rule)          -> "yes" / "no"
    two_clip    two clips in one prompt; the question selects which clip (and attribute) to read
                ("which instrument plays in clip two ?"), so the read depends on the question -> "flute"
"""

from __future__ import annotations

COLOURS = ("red", "green", "blue", "yellow")
BRIGHTNESS = ("dark", "bright")
NOTES = ("do", "sol", "re", "la")  # C4, G4, D5, A5: a fifth apart, so every note is well resolved in 128 mels
HEIGHTS = ("low", "high")  # notes 0, 1 are low; 2, 3 high
INSTRUMENTS = ("flute", "clarinet", "trumpet")
YES_NO = ("no", "yes")
ORDINALS = ("first", "second")  # answers of "which clip has ...?" prompts: in the vocabulary, not yet asked

KINDS = ("visual", "auditory", "audiovisual", "two_clip")
SYSTEM = "you hear and see"  # a short system prompt: real Omni prompts have one, and it costs positions

# kind -> {question name: (template, attribute it asks about, answer words)}
SINGLE_CLIP = {
    "visual": {
        "colour": ("what colour is the shape ?", "colour", COLOURS),
        "brightness": ("is the shape bright or dark ?", "brightness", BRIGHTNESS),
    },
    "auditory": {
        "height": ("is the sound high or low ?", "height", HEIGHTS),
        "note": ("which note is played ?", "note", NOTES),
        "instrument": ("which instrument plays ?", "instrument", INSTRUMENTS),
    },
    "audiovisual": {
        "match": ("does the sound match the colour ?", "match", YES_NO),
    },
}
# two_clip: "clip one <media> clip two <media> {question about clip one or two}"; the two clips always
# differ in the asked attribute, so reading the wrong clip gives a wrong answer. ("Which clip has the
# high sound?" was tried first: a read that treats both clips alike carries no information about its
# answer, so training had no gradient to start from and stayed at chance for 1,000+ steps.)
TWO_CLIP = {
    "colour": ("what colour is clip {} ?", "colour", COLOURS),
    "brightness": ("is clip {} bright or dark ?", "brightness", BRIGHTNESS),
    "height": ("is the sound of clip {} high or low ?", "height", HEIGHTS),
    "instrument": ("which instrument plays in clip {} ?", "instrument", INSTRUMENTS),
}
CLIP_NAMES = ("clip", "one", "two")  # "clip one <media> clip two <media>"


def chance(kind: str, question: str) -> float:
    """Accuracy of a uniform guess over the question's answer words."""
    if kind == "two_clip":
        return 1 / len(TWO_CLIP[question][2])
    return 1 / len(SINGLE_CLIP[kind][question][2])


def all_words() -> list[str]:
    """Every ordinary word the prompts and answers use, in a stable order."""
    words: list[str] = ["system", "user", "assistant"]
    texts = [SYSTEM] + [t for qs in SINGLE_CLIP.values() for t, _, _ in qs.values()]
    texts += [t.format("") for t, _, _ in TWO_CLIP.values()] + [" ".join(CLIP_NAMES)]
    answers = COLOURS + BRIGHTNESS + NOTES + HEIGHTS + INSTRUMENTS + YES_NO + ORDINALS
    for w in " ".join(texts).split() + list(answers):
        if w not in words:
            words.append(w)
    return words
