"""Generator of the shipped sample corpus: short English texts from a small grammar.

The corpus must be license-clean, small (< 1 MB) and still real enough text that a byte-level
model visibly learns spelling, words and some structure (counting, sums, recurring
characters). Everything here is original; `python -m xmoe.data.storygen` rewrites
`corpus/stories.jsonl`, and a test checks the shipped file matches this generator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CORPUS_FILE = Path(__file__).with_name("corpus") / "stories.jsonl"
SEED = 20261128
NUM_DOCUMENTS = 1000

NAMES = "Mira Tomas Ada Ravi Lena Oskar Nia Felix Yara Ben Ines Kofi Hana Emil Sofia Juno Pavel Lila Arun Greta".split()
ANIMALS = "fox heron badger otter sparrow goat hedgehog owl beaver crow lizard mole rabbit swan toad wolf".split()
PLACES = [
    "the harbor",
    "the old mill",
    "the market",
    "the quiet valley",
    "the library",
    "the orchard",
    "the bridge",
    "the bakery",
    "the lighthouse",
    "the station",
    "the river bank",
    "the hill",
    "the workshop",
    "the garden",
    "the school",
    "the forest edge",
]
OBJECTS = "lantern map kettle compass basket letter violin ladder blanket clock kite notebook hammer bell key boat".split()
ADJECTIVES = "small old bright heavy blue red green quiet broken shiny warm wooden tiny strange round golden".split()
COLORS = "red blue green yellow white black grey brown orange purple".split()
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = ["rain", "snow", "fog", "wind", "sunshine", "thunder", "frost", "clouds"]
FEELINGS = "happy tired curious worried proud sleepy calm surprised".split()
WALK_VERBS = "walked ran hurried wandered cycled drove".split()
FIND_VERBS = "found lost carried painted repaired opened dropped bought".split()
SAYINGS = [
    "We should go home before dark",
    "I think the {obj} is mine",
    "Look at the {animal}",
    "It is colder than yesterday",
    "Let us meet at {place}",
    "Where did you put the {obj}",
    "The {animal} is faster than it looks",
    "Nobody has seen the {obj} since {season}",
]
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(rng: random.Random, template: str) -> str:
    return template.format(
        obj=rng.choice(OBJECTS),
        animal=rng.choice(ANIMALS),
        place=rng.choice(PLACES),
        season=rng.choice(SEASONS),
    )


def _story(rng: random.Random) -> str:
    hero, friend = rng.sample(NAMES, 2)
    obj, adj, place = rng.choice(OBJECTS), rng.choice(ADJECTIVES), rng.choice(PLACES)
    lines = [
        f"In the {rng.choice(SEASONS)}, {hero} {rng.choice(WALK_VERBS)} to {place} with "
        f"{_a(adj)} {obj}.",
        f"There {hero} met {friend}, who looked {rng.choice(FEELINGS)}.",
    ]
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.35:
            saying = _fill(rng, rng.choice(SAYINGS))
            lines.append(f'"{saying}," said {rng.choice([hero, friend])}.')
        elif kind < 0.7:
            animal = rng.choice(ANIMALS)
            lines.append(
                f"{_a(animal).capitalize()} watched them from {rng.choice(PLACES)} "
                f"while {friend} {rng.choice(FIND_VERBS)} the {obj}."
            )
        else:
            lines.append(f"The {obj} was {rng.choice(COLORS)} and {rng.choice(ADJECTIVES)}.")
    lines.append(
        f"When the {rng.choice(WEATHER)} came, {hero} and {friend} went home {rng.choice(FEELINGS)}."
    )
    return " ".join(lines)


def _sums(rng: random.Random) -> str:
    lines = ["Today we practise adding small numbers."]
    for _ in range(rng.randint(3, 7)):
        a, b = rng.randint(0, 10), rng.randint(0, 10)
        lines.append(
            f"{NUMBER_WORDS[a].capitalize()} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}."
        )
    n = rng.randint(3, 9)
    items = rng.choice(OBJECTS)
    lines.append(
        f"{rng.choice(NAMES)} counted the {items}s: " + ", ".join(NUMBER_WORDS[1 : n + 1]) + "."
    )
    return " ".join(lines)


def _weather(rng: random.Random) -> str:
    day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])
    lo = rng.randint(-5, 15)
    hi = lo + rng.randint(2, 12)
    return (
        f"Weather for {day}: {rng.choice(WEATHER)} in the morning and {rng.choice(WEATHER)} later. "
        f"The low is {lo} degrees and the high is {hi} degrees. "
        f"Near {rng.choice(PLACES)} the wind is {rng.choice(['light', 'strong', 'gentle', 'gusty'])}."
    )


def _letter(rng: random.Random) -> str:
    writer, reader = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    return (
        f"Dear {reader},\nI hope you are well. The {obj} you left at {rng.choice(PLACES)} is safe "
        f"with me. Yesterday I saw {_a(rng.choice(ANIMALS))} near {rng.choice(PLACES)}, and it "
        f"made me think of you. Come in {rng.choice(SEASONS)} and bring the "
        f"{rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}.\nYours, {writer}"
    )


def _list(rng: random.Random) -> str:
    who = rng.choice(NAMES)
    things = rng.sample(OBJECTS, rng.randint(3, 6))
    body = "\n".join(f"- {_a(rng.choice(ADJECTIVES))} {t}" for t in things)
    return f"Things {who} packed for the trip to {rng.choice(PLACES)}:\n{body}"


KINDS = [(_story, 5), (_sums, 2), (_weather, 2), (_letter, 1), (_list, 1)]


def generate(seed: int = SEED, count: int = NUM_DOCUMENTS) -> list[str]:
    rng = random.Random(seed)
    makers = [m for m, w in KINDS for _ in range(w)]
    docs = []
    for _ in range(count):
        paragraphs = [rng.choice(makers)(rng) for _ in range(rng.randint(1, 3))]
        docs.append("\n\n".join(paragraphs))
    return docs


def corpus_lines(seed: int = SEED, count: int = NUM_DOCUMENTS) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in generate(seed, count))


if __name__ == "__main__":
    CORPUS_FILE.parent.mkdir(exist_ok=True)
    CORPUS_FILE.write_text(corpus_lines(), encoding="utf-8")
    print(f"wrote {CORPUS_FILE} ({CORPUS_FILE.stat().st_size} bytes)")
