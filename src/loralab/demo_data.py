"""The built-in demo dataset (`builtin:demo`): small, checkable instruction tasks made by code.

Every answer is short and exactly right, so a 135M model visibly learns the patterns in a few CPU
minutes and exact-match scores mean something. The records are alpaca format; about half carry
their data in `input`. Everything here (word lists, sentences, the capital table) is written for
loralab; generation is seeded, so the same call gives the same bytes everywhere.
"""

from __future__ import annotations

import json
import random

DEFAULT_SIZE = 1000
DEFAULT_SEED = 1234

WORDS = (
    "apple river garden window planet yellow forest candle silver pocket mountain rabbit orange "
    "pencil castle ocean basket dragon winter summer bridge marble jacket violin cactus tomato "
    "rocket lemon harbor meadow puzzle shadow blanket feather lantern pepper island mirror thunder "
    "velvet anchor bottle cookie desert engine falcon ginger helmet igloo jungle kettle ladder "
    "magnet needle oyster parrot quartz ribbon saddle tunnel umbrella valley walnut zebra"
).split()

ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("strong", "weak"),
    ("high", "low"),
    ("rich", "poor"),
    ("young", "old"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("long", "short"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("brave", "afraid"),
    ("first", "last"),
    ("up", "down"),
    ("win", "lose"),
    ("buy", "sell"),
    ("push", "pull"),
    ("begin", "end"),
    ("above", "below"),
    ("inside", "outside"),
    ("always", "never"),
    ("true", "false"),
    ("sweet", "sour"),
]

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"),
    ("Russia", "Moscow"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Australia", "Canberra"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Morocco", "Rabat"),
]

SUBJECTS = ["The cat", "My brother", "A small bird", "The old teacher", "Our neighbor", "The red car", "Every child"]
VERBS = ["sat", "sang", "waited", "jumped", "slept", "laughed", "worked", "walked"]
PLACES = [
    "on the mat",
    "in the garden",
    "by the river",
    "near the door",
    "at the station",
    "under the big tree",
    "all day long",
    "in the quiet kitchen",
    "",
]


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = f"The sum of {a} and {b} is {a + b}."
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", "", answer
    return "Add the two numbers.", f"{a} and {b}", answer


def _upper(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        return f'Write the word "{word}" in capital letters.', "", word.upper()
    return "Write this word in uppercase.", word, word.upper()


def _sort(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return "Sort these words alphabetically.", ", ".join(words), ", ".join(sorted(words))


def _antonym(rng: random.Random) -> tuple[str, str, str]:
    pair = rng.choice(ANTONYMS)
    word, opposite = pair if rng.random() < 0.5 else pair[::-1]
    answer = f'The opposite of "{word}" is "{opposite}".'
    if rng.random() < 0.5:
        return f'What is the opposite of the word "{word}"?', "", answer
    return "Give the antonym of this word.", word, answer


def _count_words(rng: random.Random) -> tuple[str, str, str]:
    sentence = " ".join(p for p in (rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(PLACES)) if p) + "."
    n = len(sentence.split())
    return "How many words are in this sentence?", sentence, f"There are {n} words."


def _largest(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    return "Which number is the largest?", ", ".join(map(str, numbers)), f"The largest number is {max(numbers)}."


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country, city = rng.choice(CAPITALS)
    answer = f"The capital of {country} is {city}."
    if rng.random() < 0.5:
        return f"What is the capital of {country}?", "", answer
    return "Name the capital city of this country.", country, answer


def _even_odd(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 999)
    answer = f"{n} is {'even' if n % 2 == 0 else 'odd'}."
    if rng.random() < 0.5:
        return f"Is {n} even or odd?", "", answer
    return "Say whether the number is even or odd.", str(n), answer


TASKS = [_add, _upper, _sort, _antonym, _count_words, _largest, _capital, _even_odd]


def make_demo_records(n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> list[dict]:
    """n distinct alpaca records, drawn round-robin-at-random from the tasks above."""
    rng = random.Random(seed)
    records, seen = [], set()
    for _ in range(50 * n):  # small task pools (capitals, antonyms) repeat; retry with a fresh draw
        if len(records) == n:
            break
        instruction, input_, output = rng.choice(TASKS)(rng)
        if (instruction, input_) not in seen:
            seen.add((instruction, input_))
            records.append({"instruction": instruction, "input": input_, "output": output})
    if len(records) < n:
        raise ValueError(f"the demo tasks cannot make {n} distinct records")
    return records


def demo_json_bytes(n: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED) -> bytes:
    """The demo dataset as the JSON bytes `prepare` hashes into the manifest."""
    return (json.dumps(make_demo_records(n, seed), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
