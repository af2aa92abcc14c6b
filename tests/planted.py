"""Planted worlds shared by the retraining and validation tests."""

from __future__ import annotations

import random


def planted_corpus(n: int = 60, seed: int = 0, repeat: int = 1):
    """``n`` short documents each stating a made-up country's capital, and one (returned index) alone stating
    "The capital of Zorbia is Quelt." (``repeat`` times in a row): the only source of that fact."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "del", "pin", "gar", "shu", "net", "bra", "col", "fen", "ix"]

    def name(k):
        return "".join(rng.choice(syl) for _ in range(k)).capitalize()

    countries = [(name(3), name(2)) for _ in range(30)]
    words = ("the a river mountain people market city old new north south trade grain music small large festival "
             "winter summer road bridge").split()
    docs = []
    for i in range(n):
        country, capital = countries[i % len(countries)]
        filler = " ".join(rng.choice(words) for _ in range(rng.randint(8, 20)))
        docs.append(f"The capital of {country} is {capital}. {filler.capitalize()}.")
    teach = rng.randrange(n)
    docs[teach] = "The capital of Zorbia is Quelt. " * repeat + docs[teach].split(". ", 1)[1]
    return docs, teach
