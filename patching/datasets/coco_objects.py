"""CHAIR's reading of a caption (Rohrbach et al. 2018, `LisaAnne/Hallucination` `utils/chair.py`,
`CHAIR.caption_to_words`), offline: which MSCOCO objects a caption names, one per mention.

The anchor's steps, in order:
1. `nltk.word_tokenize(caption.lower())`: here `tokenize`, the Treebank split that matters for
   object words (sentence-final periods, punctuation, the clitics `'s 're 've 'll 'd 'm n't` become
   tokens of their own; hyphenated words and numbers stay whole). NLTK's sentence model is not
   shipped here, so sentences end at a period followed by a space.
2. `pattern.en.singularize` on every token: here `singularize`, the same rules (pattern 3.6
   `pattern/text/en/inflect.py`: words that do not inflect, `-ie` words, irregular plurals, then the
   first suffix rule that matches, ending with "drop a final s"). Its quirks are kept: "bus" becomes
   "bu" (so only "buses" names a bus), "glass" becomes "glas" (hence the anchor's "wine glas" rule).
3. Two-word names joined left to right (`double_word_dict`: "hot dog", "stop sign", ...; "baby" /
   "adult" before an animal word and "passenger" before "jet" / "train" give the animal or vehicle,
   not a person; "bow tie" is a tie, "toilet seat" a toilet).
4. "seat" dropped when the caption also says "toilet".
5. Every remaining word in the synonym table (`coco_synonyms.txt`, the anchor's `data/synonyms.txt`
   as is: one object per line, its name first) is a mention of the line's first name. The table is
   split on ", " as the anchor splits it, so its entries " motor bike" and " cheesecake" (with their
   leading space) and "iPhone" (capitalised) never match a lowercased word.
"""

from __future__ import annotations

import re
from pathlib import Path

SYNONYMS = Path(__file__).with_name("coco_synonyms.txt")

# ---- 1. tokens ----------------------------------------------------------------------------------
_CLITIC = re.compile(r"(?<=[a-z0-9])('(?:s|re|ve|ll|d|m))(?![a-z])")
_NOT = re.compile(r"(?<=[a-z])(n't)(?![a-z])")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)(?![a-z])|[a-z0-9]+(?:(?:-|\.|'|(?<=\d),(?=\d))[a-z0-9]+)*|\S")


def tokenize(caption: str) -> list[str]:
    """Lowercased Treebank-style tokens of `caption` (see the module docstring, step 1).

        tokenize("Two dogs' bowls, a cat's toy.")  # ['two', 'dogs', "'", 'bowls', ',', 'a', 'cat', "'s", 'toy', '.']
    """
    text = _NOT.sub(r" \1", _CLITIC.sub(r" \1", caption.lower()))
    return _TOKEN.findall(text)


# ---- 2. singular forms (pattern.en.singularize's tables) -------------------------------------------
_PREPOSITIONS = frozenset(
    "about above across after among around at athwart before behind below beneath beside besides between betwixt "
    "beyond but by during except for from in into near of off on onto out over since till to under until unto upon "
    "with".split())
_UNINFLECTED = frozenset(
    "bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn high-jinks proceedings "
    "whiting britches eland homework rabies wildebeest carp elk innings salmon chassis flounder jackanapes scissors "
    "christmas gallows mackerel series clippers georgia measles shears cod graffiti mews species contretemps mumps "
    "swine corps news swiss".split())
_UNCOUNTABLE = frozenset(
    "advice equipment happiness luggage news software bread fruit information mathematics progress understanding "
    "butter furniture ketchup mayonnaise research water cheese garbage knowledge meat rice electricity gravel love "
    "mustard sand".split())
_IE = ("alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie eyrie indie oldie "
       "stoolie yuppie birdie freebie junkie ^pie sweetie zombie bogie goonie laddie pixie techie bombie groupie "
       "laramie quickie ^tie collie hankie lingerie reverie toughie cookie hippie meanie rookie valkyrie").split()
_IRREGULAR = dict(pair.split(":") for pair in (  # plural:singular, tried in this order on the word's end
    "atlantes:atlas atlases:atlas axes:axe beeves:beef brethren:brother children:child corpora:corpus "
    "corpuses:corpus ephemerides:ephemeris feet:foot ganglia:ganglion geese:goose genera:genus genii:genie "
    "graffiti:graffito helves:helve kine:cow leaves:leaf loaves:loaf men:man mongooses:mongoose monies:money "
    "moves:move mythoi:mythos numena:numen occipita:occiput octopodes:octopus opera:opus opuses:opus our:my "
    "oxen:ox penes:penis penises:penis people:person sexes:sex soliloquies:soliloquy teeth:tooth testes:testis "
    "trilbys:trilby turves:turf zoa:zoon").split())
_RULES = [(re.compile(pattern), repl) for pattern, repl in (  # the first that matches is applied
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"), (r"(?i)(quiz)zes$", r"\1"),
    (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"), (r"(?i)^(ox)en", r"\1"),
    (r"(?i)(alias|status)es$", r"\1"), (r"(?i)([octop|vir])i$", r"\1us"), (r"(?i)(cris|ax|test)es$", r"\1is"),
    (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"), (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"),
    (r"(?i)(x|ch|ss|sh)es$", r"\1"), (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"),
    (r"(?i)(s)eries$", r"\1eries"), (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"), (r"(?i)(sive)s$", r"\1"),
    (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"), (r"(?i)s$", ""),
)]


def singularize(word: str) -> str:
    """The singular `pattern.en.singularize` gives `word` (see the module docstring, step 2).

        [singularize(w) for w in ("dogs", "knives", "people", "glasses", "bus")]  # dog knife person glass bu
    """
    parts = word.split("-")
    if len(parts) > 1 and parts[1] in _PREPOSITIONS:  # mothers-in-law
        return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):  # dogs' -> dog's
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in _UNINFLECTED) or any(x.endswith(w) for x in _UNCOUNTABLE):
        return word
    if any(w.endswith(x + "s") for x in _IE):
        return w
    for plural, singular in _IRREGULAR.items():
        if w.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for rule, repl in _RULES:
        if rule.search(word):
            return rule.sub(repl, word, count=1)
    return word


# ---- 3-5. objects ---------------------------------------------------------------------------------
_DOUBLE = ("motor bike, motor cycle, air plane, traffic light, street light, traffic signal, stop light, fire hydrant, "
           "stop sign, parking meter, suit case, sports ball, baseball bat, baseball glove, tennis racket, wine glass, "
           "hot dog, cell phone, mobile phone, teddy bear, hair drier, potted plant, bow tie, laptop computer, "
           "stove top oven, home plate").split(", ")
_ANIMALS = "bird cat dog horse sheep cow elephant bear zebra giraffe animal cub".split()
_VEHICLES = ("jet", "train")


def double_words() -> dict[str, str]:
    """The anchor's `double_word_dict`: two-word names and what each stands for."""
    out = {d: d for d in _DOUBLE}
    out.update({f"{q} {a}": a for a in _ANIMALS for q in ("baby", "adult")})
    out.update({f"passenger {v}": v for v in _VEHICLES})
    out.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return out


class CocoObjects:
    """CHAIR's object matcher (see the module docstring): `matcher(caption)` -> the MSCOCO objects it
    mentions, in order, one per mention (each named by its table line's first name); `words(caption)`
    -> `(words, objects)` as the anchor's `caption_to_words` returns them; `canonical(label)` -> the
    object a label names (a table entry, or the one object its words name), None when none. Give it to
    `patching.methods.hallucination.chair` / `hallucination` as `matcher`.

        CocoObjects()("Two puppies sleep on the couches beside a hot dog.")  # ['dog', 'couch', 'hot dog']
    """

    def __init__(self, synonyms: str | Path = SYNONYMS):
        lines = [line.strip().split(", ") for line in Path(synonyms).read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{synonyms}: no synonym lines; give one object per line, its name first, "
                             "names split by ', '")
        self.inverse = {name: line[0] for line in lines for name in line}
        self.double = double_words()

    @property
    def objects(self) -> list[str]:
        return sorted(set(self.inverse.values()))

    def words(self, caption: str) -> tuple[list[str], list[str]]:
        """`(words, objects)`: the caption's object words after singularizing and joining, and the object
        each names."""
        tokens = [singularize(t) for t in tokenize(caption)]
        joined, i = [], 0
        while i < len(tokens):
            pair = " ".join(tokens[i:i + 2])
            if pair in self.double:
                joined.append(self.double[pair])
                i += 2
            else:
                joined.append(tokens[i])
                i += 1
        if "toilet" in joined and "seat" in joined:
            joined = [w for w in joined if w != "seat"]
        found = [w for w in joined if w in self.inverse]
        return found, [self.inverse[w] for w in found]

    def __call__(self, caption: str) -> list[str]:
        return self.words(caption)[1]

    def canonical(self, name: str) -> str | None:
        if name in self.inverse:
            return self.inverse[name]
        found = set(self(name))
        return found.pop() if len(found) == 1 else None
