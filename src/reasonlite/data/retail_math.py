"""Seeded compositional retail word problems that can measure transfer.

A problem is a story *family* (a store's inventory, a checkout, a wholesale order, a food bank...) plus a chain of
2-4 *operations* (sell per day x days, a delivery of boxes, returns, split among branches, price x quantity, a %
discount, % tax, a coupon, shipping, tiered prices, unit conversion, change due...). The family and its operation
sequence are the problem's *structure*; every family lists the structures it allows. Numbers and nouns are drawn per
question; a *phrasing* (0-6) picks the wording of every sentence and the clause order, independently of the numbers,
so one draw can be written seven ways with the same answer. Every sentence has N_VARIANTS (12) wordings: 0-2 for the
training phrasings, 3 only for the reworded ones, 4-11 only under ``vary_wording``, where each training sentence
draws its own wording from the first ``n_wordings`` of TRAINING_WORDINGS (6 by default: 0-2 and 4-6; up to 11 adds
7-11). Optional irrelevant sentences (GSM-IC style distractors) are added from a separate random stream and never
enter the solution.

Each operation records its solution as named steps (``variable = expression`` plus one sentence of arithmetic). The
same steps produce all three gold signals, so they cannot disagree: the PAL program (givens as named variables,
``return answer``), the chain of thought (ending "The answer is X.") and the exact answer (fractions). Draws whose
values are not clean (whole units, whole cents) are redrawn.

Splits (``retail_math_splits``):
  ``train``                 training families, training phrasings (0-4);
  ``test``                  the same structures and phrasings, never a train question (a hash of the question
                            reserves it for test, whatever ``n_train`` is);
  ``test_heldout_families`` families never trained on: new story contexts that recombine trained operations;
  ``test_reworded``         training structures in the phrasings never trained on (5-6: new wordings, the question
                            first or the facts reordered).
``test_heldout_templates`` is kept as an alias of ``test_heldout_families``.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

from reasonlite.answers import eval_arithmetic, format_number
from reasonlite.data.example import Example

T = TypeVar("T")

__all__ = [
    "DEFAULT_HELDOUT_FAMILIES", "DEFAULT_HELDOUT_TEMPLATES", "FAMILIES", "PHRASINGS", "REWORDED_PHRASINGS",
    "STRUCTURES", "TEMPLATES", "TRAIN_PHRASINGS", "generate_retail_math", "retail_math_splits",
]

STORES = [
    "Maple Street Market", "Corner Grocer", "Harbor Hardware", "Bright Books", "Sunny Side Deli", "Green Leaf Garden",
    "Pixel Electronics", "Oak & Iron Outfitters", "Northside Pharmacy", "Riverbend Pet Supply", "Summit Sports",
    "Old Town Toys", "Lakeside Florist", "Cedar Office Supply", "Golden Spoon Kitchenware",
]
# (plural, singular, container)
COUNT_ITEMS = [
    ("notebooks", "notebook", "carton"), ("light bulbs", "light bulb", "case"), ("cans of soup", "can of soup", "case"),
    ("tennis balls", "tennis ball", "crate"), ("pens", "pen", "box"), ("candles", "candle", "box"),
    ("water bottles", "water bottle", "pallet"), ("bags of dog food", "bag of dog food", "pallet"),
    ("jars of honey", "jar of honey", "crate"), ("toy cars", "toy car", "carton"), ("batteries", "battery", "box"),
    ("flower pots", "flower pot", "crate"), ("coffee mugs", "coffee mug", "case"), ("pairs of socks", "pair of socks", "box"),
]
# (bulk good, small pack noun, bulk unit, small unit, factor, pack sizes)
BULK_GOODS = [
    ("coffee beans", "bag", "kilogram", "grams", 1000, (100, 125, 200, 250, 500)),
    ("rice", "bag", "kilogram", "grams", 1000, (200, 250, 500)),
    ("flour", "sack", "kilogram", "grams", 1000, (250, 500)),
    ("mixed nuts", "pouch", "kilogram", "grams", 1000, (100, 125, 200, 250)),
    ("olive oil", "bottle", "liter", "milliliters", 1000, (250, 500)),
    ("orange juice", "carton", "liter", "milliliters", 1000, (200, 250, 500)),
    ("ribbon", "spool", "meter", "centimeters", 100, (20, 25, 50)),
    ("garden hose", "coil", "meter", "centimeters", 100, (20, 25, 50)),
]
BAKERIES = ["Blue Door Bakery", "Sunrise Bakehouse", "Crumb & Co.", "Golden Crust Bakery", "Little Oven Cafe"]
BAKED_GOODS = [("muffins", "muffin", "tray"), ("croissants", "croissant", "tray"), ("bagels", "bagel", "basket"),
               ("cookies", "cookie", "tray"), ("rolls", "roll", "basket"), ("scones", "scone", "tray")]
WHOLESALERS = ["Metro Wholesale", "Valley Supply Co.", "Prime Depot", "Allied Distributors", "Keystone Trade Supply"]
BUYERS = ["a customer", "a teacher", "a shopper", "a parent", "a regular customer"]
BULK_BUYERS = [("a school", "classrooms", "classroom"), ("a hotel", "floors", "floor"),
               ("an office", "departments", "department"), ("a summer camp", "cabins", "cabin")]
# held-out contexts: nouns that never appear in a training family
FOOD_BANKS = ["Eastside Food Bank", "Hope Community Pantry", "Riverside Food Shelf", "Unity Food Bank"]
PANTRY_ITEMS = [("cans of beans", "can of beans", "crate"), ("boxes of cereal", "box of cereal", "carton"),
                ("jars of peanut butter", "jar of peanut butter", "case"), ("bags of pasta", "bag of pasta", "sack")]
CLUBS = ["the Lincoln School band", "the Maple Grove scout troop", "the Westfield soccer club", "the Oakdale drama club"]
FUNDRAISER_GOODS = [("cupcakes", "cupcake", "tray"), ("candy bars", "candy bar", "box"),
                    ("brownies", "brownie", "tray"), ("lemon bars", "lemon bar", "tray")]
# vary_vocabulary: wider pools for the story words that become variable names (units_{damaged}, sold_per_{period},
# {container}s_delivered, {recipients}), drawn per training question; none is a held-out family's word (a test checks)
VOCAB_SELLS = [("sells", "sold"), ("ships out", "shipped out"), ("gives away", "given away"), ("uses up", "used up"),
               ("moves", "moved"), ("rents out", "rented out"), ("loans out", "loaned out")]
VOCAB_PERIODS = ["day", "week", "hour", "month", "shift"]
VOCAB_DAMAGED = ["damaged", "broken", "spoiled", "dented", "cracked", "torn", "faulty", "stale", "burnt", "scratched"]
VOCAB_CONTAINERS = ["box", "case", "carton", "crate", "pallet", "bin", "tote", "bundle", "basket", "tray"]
VOCAB_RECIPIENTS = [("branches", "branch"), ("outlets", "outlet"), ("kiosks", "kiosk"), ("locations", "location"),
                    ("warehouses", "warehouse"), ("stalls", "stall"), ("vans", "van"), ("counters", "counter")]



def _vary_vocabulary(words: dict[str, str], rng: random.Random) -> dict[str, str]:
    """``words`` with the verb, period, damage word, container and (a store's) recipients drawn from the VOCAB_
    pools, so the student reads a variable's name off the question instead of recalling one of a few it trained on.
    Wholesale buyers keep their own recipients (a hotel's floors), so the stories stay sensible."""
    sells, sold = rng.choice(VOCAB_SELLS)
    varied = {**words, "sells": sells, "sold": sold, "period": rng.choice(VOCAB_PERIODS),
              "damaged": rng.choice(VOCAB_DAMAGED), "container": rng.choice(VOCAB_CONTAINERS)}
    if words["recipients"] == "branches":
        varied["recipients"], varied["recipient"] = rng.choice(VOCAB_RECIPIENTS)
    return varied


# wordings per sentence: 0-2 training phrasings, 3 only the reworded ones, 4-11 only vary_wording, of which
# n_wordings picks the first n of TRAINING_WORDINGS (6, the default: 0-2 and 4-6, sessions 9-11's; up to 11 adds 7-11)
N_VARIANTS = 12
TRAINING_WORDINGS: list[int] = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]  # every wording but the reworded split's (3)
DEFAULT_N_WORDINGS = 6
VARIED_WORDINGS: list[int] = TRAINING_WORDINGS[:DEFAULT_N_WORDINGS]  # drawn per sentence under vary_wording
PHRASINGS: list[int] = list(range(7))
TRAIN_PHRASINGS: list[int] = [0, 1, 2, 3, 4]  # wording p % 3; the question comes first in 3 and 4
REWORDED_PHRASINGS: list[int] = [5, 6]  # wording 3, count changes reversed; 5 asks first, 6 states the start after them
_QUESTION_FIRST = (3, 4, 5)
_COMMUTING = {"sell_days", "delivery", "returns", "damaged"}  # count changes whose order does not matter


class _Redraw(Exception):
    """The drawn numbers give an unclean value; draw again."""


class _Solution:
    """Records givens and steps; every value is exact and checked for cleanliness as it is computed."""

    def __init__(self, words: dict[str, str]) -> None:
        self.words = words
        self.values: dict[str, Fraction] = {}
        self.money: set[str] = set()
        self.givens: list[str] = []
        self.steps: list[tuple[str, str, str]] = []  # (variable, expression, sentence)

    def mark(self) -> tuple[dict[str, Fraction], set[str], int, int]:
        return dict(self.values), set(self.money), len(self.givens), len(self.steps)

    def reset(self, mark: tuple[dict[str, Fraction], set[str], int, int]) -> None:
        values, money, n_givens, n_steps = mark
        self.values, self.money = dict(values), set(money)
        del self.givens[n_givens:], self.steps[n_steps:]

    def given(self, name: str, value: Fraction | int | str, money: bool = False) -> str:
        value = Fraction(value)
        if value <= 0:
            raise _Redraw(f"given {name} = {value}")
        self.values[name] = value
        self.givens.append(name)
        if money:
            self.money.add(name)
        return self.show(name)

    def step(self, name: str, expr: str, sentence: str, money: bool = False, **refs: str) -> None:
        """``refs`` name the variables behind placeholders such as ``{prev}``; ``{out}`` is the new value."""
        value = eval_arithmetic(expr, self.values)
        clean = (value * 100).denominator == 1 if money else value.denominator == 1
        if not clean or value <= 0:
            raise _Redraw(f"{name} = {value}")
        self.values[name] = value
        if money:
            self.money.add(name)
        shown = {k: self.show(k) for k in self.values}
        shown.update({alias: self.show(var) for alias, var in refs.items()}, out=self.show(name))
        self.steps.append((name, expr, _cap(sentence.format(**self.words, **shown))))

    def show(self, name: str) -> str:
        return _show(self.values[name], name in self.money)

    def program(self) -> str:
        lines = [f"    {name} = {format_number(self.values[name])}" for name in self.givens]
        for name, expr, _ in self.steps:
            # money is computed in floats inside the program; rounding to cents removes 0.1+0.2 style noise
            expr = f"round({expr}, 2)" if name == "answer" and name in self.money else expr
            lines.append(f"    {name} = {expr}")
        return "def solution():\n" + "\n".join(lines) + "\n    return answer\n"

    def rationale(self) -> str:
        return " ".join(sentence for _, _, sentence in self.steps) + f" The answer is {self.answer()}."

    def answer(self) -> str:
        return format_number(self.values["answer"])


def _show(value: Fraction, money: bool) -> str:
    if money:
        return f"${value.numerator // value.denominator}" if value.denominator == 1 else f"${float(value):.2f}"
    return format_number(value)


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _money(rng: random.Random, low: float, high: float, step: str = "0.25") -> Fraction:
    """A price between low and high dollars in multiples of ``step`` (quarters keep percentages clean)."""
    unit = Fraction(step)
    return unit * rng.randint(int(Fraction(low) / unit), int(Fraction(high) / unit))


def _clean_choice(rng: random.Random, options: list[int], ok: Callable[[int], bool]) -> int:
    """A random option among those that keep the arithmetic clean (redraw when none does)."""
    good = [o for o in options if ok(o)]
    if not good:
        raise _Redraw("no clean option")
    return rng.choice(good)


def _cents(value: Fraction) -> bool:
    return (value * 100).denominator == 1


# ---------------------------------------------------------------------------------------------------------------
# Operations. Each draws its givens into `s`, records its steps from the running value `cur` into `out`, and returns
# the N_VARIANTS wordings of its fact sentence (numbers already written in; the family's nouns filled in later).
# ---------------------------------------------------------------------------------------------------------------
Op = Callable[[random.Random, _Solution, str, str], list[str]]


def _sell_days(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    period = s.words["period"]
    n = s.given(f"sold_per_{period}", rng.randint(3, 25))
    d = s.given(f"{period}s", rng.randint(2, 7))
    s.step("units_sold", f"sold_per_{period} * {period}s", "{place} {sells} {a} * {b} = {out} {items}.",
           a=f"sold_per_{period}", b=f"{period}s")
    s.step(out, f"{cur} - units_sold", "That leaves {prev} - {units_sold} = {out} {items}.", prev=cur)
    return [f"{{place}} {{sells}} {n} {{items}} each {period} for {d} {period}s.",
            f"For the next {d} {period}s, {{place}} {{sells}} {n} {{items}} per {period}.",
            f"Over {d} {period}s, {n} {{items}} are {{sold}} every {period}.",
            f"{n} {{items}} went out each {period}, and this went on for {d} {period}s.",
            f"Sales ran at {n} {{items}} per {period}, for {d} {period}s in a row.",
            f"For {d} straight {period}s, {{place}} {{sells}} {n} {{items}} a {period}.",
            f"Every {period} for {d} {period}s, {n} {{items}} are {{sold}}.",
            f"Across {d} {period}s, {{place}} {{sells}} {n} {{items}} per {period}.",
            f"In each of {d} {period}s, {{place}} {{sells}} {n} {{items}}.",
            f"{d} {period}s go by, and in every one of them {{place}} {{sells}} {n} {{items}}.",
            f"{{place}} {{sells}} {n} {{items}} per {period} over a stretch of {d} {period}s.",
            f"{{place}} {{sells}} {{items}} at a rate of {n} per {period} for {d} {period}s."]


def _delivery(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    box = s.words["container"]
    boxes = _plural(box)
    b = s.given(f"{boxes}_delivered", rng.randint(2, 9))
    k = s.given(f"units_per_{box}", rng.choice([6, 10, 12, 20, 24, 25]))
    s.step("units_delivered", f"{boxes}_delivered * units_per_{box}",
           "The delivery brings {a} * {b} = {out} {items}.", a=f"{boxes}_delivered", b=f"units_per_{box}")
    s.step(out, f"{cur} + units_delivered", "Now there are {prev} + {units_delivered} = {out} {items}.", prev=cur)
    return [f"Then a delivery of {b} {boxes} arrived, each holding {k} {{items}}.",
            f"{{place}} received {b} {boxes} with {k} {{items}} in each.",
            f"A shipment came in: {b} {boxes} of {k} {{items}} apiece.",
            f"Each of the {b} {boxes} unloaded later held {k} {{items}}.",
            f"Next, {k} {{items}} came in each of {b} {boxes}.",
            f"A truck dropped off {b} {boxes}, and every {box} had {k} {{items}} inside.",
            f"{{place}} got a delivery: {b} {boxes}, {k} {{items}} per {box}.",
            f"{b} {boxes} were delivered, with {k} {{items}} packed in every {box}.",
            f"In came {b} {boxes} of {{items}}, {k} to a {box}.",
            f"The supplier sent {b} {boxes}; each {box} contained {k} {{items}}.",
            f"{k} {{items}} fit in a {box}, and {b} full {boxes} were delivered.",
            f"A delivery added {b} {boxes} to the stock, every one of them holding {k} {{items}}."]


def _returns(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    r = s.given("units_returned", rng.randint(2, 15))
    s.step(out, f"{cur} + units_returned", "With the returns, {prev} + {units_returned} = {out} {items}.", prev=cur)
    return [f"Customers returned {r} {{items}}, which went back into stock.",
            f"{r} {{items}} were returned and put back on the shelf.",
            f"Later, {r} returned {{items}} were added back.",
            f"Back into stock went {r} {{items}} that shoppers had returned.",
            f"Shoppers brought back {r} {{items}}, and these were restocked.",
            f"{r} {{items}} came back as returns and were put back in stock.",
            f"Then {r} {{items}} were returned to {{place}} and restocked.",
            f"Returns added {r} {{items}} back to the stock.",
            f"A few customers brought {r} {{items}} back, and they went up for sale again.",
            f"The store took back {r} returned {{items}} and restocked them.",
            f"A total of {r} {{items}} were returned, and all of them could be sold again.",
            f"Thanks to returns, the stock went up by {r} {{items}}."]


def _damaged(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    name = f"units_{s.words['damaged']}"
    r = s.given(name, rng.randint(2, 20))
    s.step(out, f"{cur} - {name}", "Removing the {damaged} ones leaves {prev} - {r} = {out} {items}.", prev=cur, r=name)
    return [f"{r} {{items}} were found {{damaged}} and thrown away.",
            f"{{place}} threw out {r} {{damaged}} {{items}}.",
            f"Of those, {r} {{items}} turned out to be {{damaged}} and were removed.",
            f"{r} {{items}} had to be discarded as {{damaged}}.",
            f"Sadly, {r} {{items}} were {{damaged}} and had to be thrown out.",
            f"{{place}} removed {r} {{items}} because they were {{damaged}}.",
            f"A check found {r} {{damaged}} {{items}}, which were discarded.",
            f"It turned out that {r} of the {{items}} were {{damaged}}, so they were thrown away.",
            f"Staff found {r} {{damaged}} {{items}} and got rid of them.",
            f"Because they were {{damaged}}, {r} {{items}} went in the trash.",
            f"The {{damaged}} {{items}}, {r} in all, were pulled from the shelves.",
            f"{r} {{items}} could not be sold because they were {{damaged}}, so they were removed."]


def _split(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    name = s.words["recipients"]
    b = s.given(name, _clean_choice(rng, list(range(2, 9)), lambda k: s.values[cur] % k == 0))
    s.step(out, f"{cur} / {name}", "Each {recipient} gets {prev} / {b} = {out} {items}.", prev=cur, b=name)
    return [f"The {{items}} are then shared equally among {b} {{recipients}}.",
            f"Next, {{place}} splits them evenly between {b} {{recipients}}.",
            f"After that, all of them are divided equally among {b} {{recipients}}.",
            f"Equal shares of what remains go to each of {b} {{recipients}}.",
            f"Everything left is then divided evenly among {b} {{recipients}}.",
            f"{b} {{recipients}} then share them equally.",
            f"Then they are handed out in equal parts to {b} {{recipients}}.",
            f"All the {{items}} are then divided into {b} equal parts, one for each of the {{recipients}}.",
            f"The {{items}} get shared out evenly, with {b} {{recipients}} each taking the same number.",
            f"Afterwards, all of the {{items}} go to {b} {{recipients}} in equal numbers.",
            f"To finish, the {{items}} are sent out to {b} {{recipients}}, the same number to each.",
            f"The {{items}} are then spread evenly across {b} {{recipients}}."]


def _price_qty(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    p = s.given("price_each", _money(rng, 0.5, 15), money=True)
    s.step(out, f"{cur} * price_each", "At {price_each} each, {prev} {items} come to {prev} * {price_each} = {out}.",
           money=True, prev=cur)
    return [f"Each {{item}} costs {p}.", f"The price is {p} per {{item}}.", f"They are priced at {p} each.",
            f"One {{item}} goes for {p}.",
            f"A single {{item}} sells for {p}.",
            f"Each one is priced at {p}.",
            f"They cost {p} apiece.",
            f"{p} is what each {{item}} costs.",
            f"Every {{item}} is sold at {p}.",
            f"Per {{item}}, the price is {p}.",
            f"It costs {p} to buy one {{item}}.",
            f"Each {{item}} has a price tag of {p}."]


def _bulk_tier(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    t = s.given("first_tier_units", _clean_choice(rng, [10, 20, 25, 50], lambda k: k < s.values[cur]))
    f = s.given("full_price", _money(rng, 1, 9), money=True)
    c = s.given("bulk_price", s.values["full_price"] - _money(rng, 0.25, 1), money=True)
    s.step("extra_units", f"{cur} - first_tier_units",
           "Beyond the first {first_tier_units}, there are {prev} - {first_tier_units} = {out} more {items}.", prev=cur)
    s.step("extra_cost", "extra_units * bulk_price", "They cost {extra_units} * {bulk_price} = {out}.", money=True)
    s.step(out, "first_tier_units * full_price + extra_cost",
           "With the first {first_tier_units} at {full_price}: {first_tier_units} * {full_price} + {extra_cost} = {out}.",
           money=True)
    return [f"The first {t} {{items}} cost {f} each, and every {{item}} after that costs {c}.",
            f"Pricing is tiered: {f} each for the first {t}, then {c} each beyond that.",
            f"{{items}} cost {f} apiece up to {t}, and only {c} apiece for the rest.",
            f"Beyond the first {t} {{items}}, which are {f} each, the price drops to {c} each.",
            f"Each of the first {t} {{items}} costs {f}; any more cost {c} each.",
            f"The price is {c} per {{item}} after the first {t}, which cost {f} each.",
            f"Up to {t} {{items}} are charged at {f} each, and the rest at {c} each.",
            f"For the first {t} {{items}} the price is {f} each, while every extra {{item}} is {c}.",
            f"{f} is charged for each of the first {t} {{items}}, and {c} for every {{item}} after those.",
            f"Once {t} {{items}} have been bought at {f} each, every additional {{item}} costs just {c}.",
            f"Under the tiered pricing, each of the first {t} {{items}} costs {f} and every later {{item}} costs {c}.",
            f"The first {t} {{items}} are billed at {f} apiece, with a lower price of {c} for each {{item}} beyond them."]


def _unit_conversion(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    w = s.words
    small, big, pack, packs = w["small"], w["big"], w["pack"], w["packs"]
    s.given(f"{small}_per_{big}", int(w["factor"]))
    size = s.given(f"{small}_per_{pack}", rng.choice([int(x) for x in w["pack_sizes"].split(",")]))
    s.step(f"total_{small}", f"{cur} * {small}_per_{big}", "{prev} {big}s is {prev} * {f} = {out} {small}.",
           prev=cur, f=f"{small}_per_{big}")
    s.step(out, f"total_{small} / {small}_per_{pack}", "That fills {t} / {size} = {out} {packs}.",
           t=f"total_{small}", size=f"{small}_per_{pack}")
    return [f"It repacks everything into {packs} of {size} {small} each.",
            f"The {{good}} is divided into {packs} holding {size} {small} apiece.",
            f"Each {pack} it fills holds {size} {small}.",
            f"{size} {small} go into every {pack} it fills.",
            f"Then everything is packed into {packs} that hold {size} {small} each.",
            f"It is portioned into {packs}, {size} {small} to a {pack}.",
            f"Every {pack} gets filled with {size} {small}.",
            f"All of it is then repacked, {size} {small} per {pack}.",
            f"It fills {packs} with {size} {small} in each one.",
            f"Everything gets split into {packs}, and each {pack} takes {size} {small}.",
            f"The whole amount is measured out into {packs}, with {size} {small} going into each.",
            f"Using {packs} that take {size} {small} each, it repacks all of it."]


def _discount(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    pct = s.given("discount_percent", _clean_choice(rng, [10, 15, 20, 25, 30, 40, 50],
                                                    lambda p: _cents(s.values[cur] * p / 100)))
    s.step("discount", f"{cur} * discount_percent / 100", "The discount is {prev} * {discount_percent}% = {out}.",
           money=True, prev=cur)
    s.step(out, f"{cur} - discount", "After the discount: {prev} - {discount} = {out}.", money=True, prev=cur)
    return [f"A {pct}% discount is applied to the total.", f"The total is then reduced by {pct}%.",
            f"There is a {pct}%-off sale on the whole amount.", f"On top of that, the amount is cut by {pct} percent.",
            f"The total then gets {pct}% off.",
            f"A sale takes {pct}% off the whole amount.",
            f"Then {pct} percent is knocked off the total.",
            f"A discount then lowers the whole amount by {pct}%.",
            f"The total is discounted by {pct}%.",
            f"Because of a sale, {pct}% comes off the total.",
            f"A {pct} percent discount is given on the full amount.",
            f"Everything is then marked down by {pct}%."]


def _coupon(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    c = s.given("coupon_value", rng.randint(1, 10), money=True)
    s.step(out, f"{cur} - coupon_value", "The coupon brings it to {prev} - {coupon_value} = {out}.", money=True,
           prev=cur)
    return [f"A {c} coupon is then used.", f"Then {c} comes off with a coupon.", f"After that, a coupon saves {c}.",
            f"A coupon worth {c} is redeemed next.",
            f"Then a coupon takes {c} off.",
            f"{c} is saved with a coupon after that.",
            f"A coupon then lowers the amount by {c}.",
            f"A coupon for {c} off is applied.",
            f"Using a coupon cuts {c} from the amount.",
            f"With a coupon, the price goes down by {c}.",
            f"A coupon knocks {c} off what is owed.",
            f"After a coupon is used, {c} less is owed."]


def _tax(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    t = s.given("tax_percent", _clean_choice(rng, [4, 5, 6, 8, 10, 12, 15, 20],
                                             lambda p: _cents(s.values[cur] * p / 100)))
    s.step("tax", f"{cur} * tax_percent / 100", "Tax is {prev} * {tax_percent}% = {out}.", money=True, prev=cur)
    s.step(out, f"{cur} + tax", "With tax: {prev} + {tax} = {out}.", money=True, prev=cur)
    return [f"Sales tax of {t}% is added.", f"Then {t}% tax is charged on that amount.",
            f"A {t}% sales tax applies to what is left.", f"Tax at {t} percent is added next.",
            f"Then a {t}% sales tax is added on.",
            f"{t}% sales tax is charged next.",
            f"Sales tax adds {t}% to that amount.",
            f"The amount also carries sales tax of {t}%.",
            f"A sales tax raises the amount by {t}%.",
            f"There is {t}% tax to pay on top.",
            f"The sales tax rate is {t}%, and it is added to that amount.",
            f"{t} percent is added on top for sales tax."]


def _shipping(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    f = s.given("shipping_fee", _money(rng, 5, 30, "0.5"), money=True)
    s.step(out, f"{cur} + shipping_fee", "Adding shipping: {prev} + {shipping_fee} = {out}.", money=True, prev=cur)
    return [f"A shipping fee of {f} is added.", f"Delivery then costs an extra {f}.",
            f"The supplier also charges {f} for shipping.", f"Shipping adds {f} more.",
            f"Then {f} is added for shipping.",
            f"On top of that, shipping costs {f}.",
            f"There is also a {f} shipping charge.",
            f"Shipping the order costs another {f}.",
            f"Delivery is charged on top, at {f}.",
            f"To have it shipped, there is an extra charge of {f}.",
            f"The shipping fee comes to {f}.",
            f"Freight costs {f}, which is added to the bill."]


def _change_due(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    bills = [b for b in (20, 50, 100, 200, 500, 1000) if b > s.values[cur]][:2]
    if not bills:
        raise _Redraw("total too large for a bill")
    b = s.given("amount_paid", rng.choice(bills), money=True)
    s.step(out, f"amount_paid - {cur}", "The change is {amount_paid} - {prev} = {out}.", money=True, prev=cur)
    return [f"{{buyer}} pays with a {b} bill.", f"{{buyer}} hands over {b}.", f"Payment is made with {b} in cash.",
            f"{b} in cash is handed to the cashier.",
            f"{{buyer}} pays using a {b} bill.",
            f"To pay, {{buyer}} gives the cashier {b}.",
            f"{{buyer}} pays in cash with {b}.",
            f"{{buyer}} settles up with a {b} bill.",
            f"{{buyer}} puts down {b} to pay.",
            f"{{buyer}} offers a {b} bill as payment.",
            f"{{buyer}} uses {b} to pay for it all.",
            f"{{buyer}} pulls out a {b} bill to pay."]


def _split_cost(rng: random.Random, s: _Solution, cur: str, out: str) -> list[str]:
    name = s.words["recipients"]
    n = s.given(name, _clean_choice(rng, list(range(2, 9)), lambda k: _cents(s.values[cur] / k)))
    s.step(out, f"{cur} / {name}", "Each {recipient}'s share is {prev} / {n} = {out}.", money=True, prev=cur, n=name)
    return [f"The amount is split equally among {n} {{recipients}}.",
            f"{n} {{recipients}} then share the amount equally.",
            f"Each of {n} {{recipients}} pays an equal share of it.",
            f"The money is then divided evenly across {n} {{recipients}}.",
            f"That cost is shared evenly by {n} {{recipients}}.",
            f"Then the total is divided equally among {n} {{recipients}}.",
            f"{n} {{recipients}} split the cost equally.",
            f"The cost is shared so that {n} {{recipients}} all pay the same.",
            f"Equal amounts are paid by each of {n} {{recipients}}.",
            f"The bill is split {n} ways among the {{recipients}}, in equal parts.",
            f"{n} {{recipients}} chip in equally to cover it.",
            f"The total is paid in {n} equal parts, one by each of the {{recipients}}."]


OPS: dict[str, Op] = {
    "sell_days": _sell_days, "delivery": _delivery, "returns": _returns, "damaged": _damaged, "split": _split,
    "price_qty": _price_qty, "bulk_tier": _bulk_tier, "unit_conversion": _unit_conversion, "discount": _discount,
    "coupon": _coupon, "tax": _tax, "shipping": _shipping, "change_due": _change_due, "split_cost": _split_cost,
}
# steps each operation writes; a cap on their sum keeps question + program near the first generator's length
# (students are trained with train.max_length around 256-384 tokens)
_STEPS = {"sell_days": 2, "delivery": 2, "returns": 1, "damaged": 1, "split": 1, "price_qty": 1, "bulk_tier": 3,
          "unit_conversion": 2, "discount": 2, "coupon": 1, "tax": 2, "shipping": 1, "change_due": 1, "split_cost": 1}
_MAX_STEPS = 5
# name of each operation's result when it is not the last one (the last one is `answer`)
_RESULT = {"sell_days": "units_after_sales", "delivery": "units_after_delivery", "returns": "units_after_returns",
           "damaged": "units_after_removal", "split": "units_each", "price_qty": "subtotal", "bulk_tier": "order_cost",
           "unit_conversion": "packs_filled", "discount": "after_discount", "coupon": "after_coupon",
           "tax": "total_with_tax", "shipping": "total_with_shipping", "change_due": "change",
           "split_cost": "share_each"}

# ---------------------------------------------------------------------------------------------------------------
# Starts (the first given) and questions, N_VARIANTS wordings each.
# ---------------------------------------------------------------------------------------------------------------
_INTROS = {
    "stock": ["{place} had {n} {items}.", "At the start, {place} had {n} {items}.", "There were {n} {items} at {place}.",
              "{place} began with {n} {items} on hand.",
              "{place} started out with {n} {items}.", "There were {n} {items} in stock at {place} at first.",
              "{n} {items} were on hand at {place} to begin with.",
              "Before any changes, {place} stocked {n} {items}.",
              "Originally, {n} {items} sat on the shelves at {place}.",
              "The opening count at {place} was {n} {items}.",
              "In the beginning, {place} kept {n} {items} in its inventory.",
              "Initially, {place} held {n} {items}."],
    "purchase": ["{buyer} buys {n} {items} at {place}.", "At {place}, {buyer} picks up {n} {items}.",
                 "{buyer} orders {n} {items} from {place}.", "{n} {items} are bought by {buyer} at {place}.",
                 "{buyer} gets {n} {items} at {place}.", "{buyer} is buying {n} {items} from {place}.",
                 "At {place}, {n} {items} are picked up by {buyer}.",
                 "{buyer} visits {place} and leaves with {n} {items}.",
                 "From {place}, {buyer} purchases {n} {items}.",
                 "{buyer} goes to {place} and buys {n} {items}.",
                 "There is an order at {place} from {buyer} for {n} {items}.",
                 "{buyer} needs {n} {items} and buys them at {place}."],
    "bulk": ["{place} buys {n} {big}s of {good}.", "A shipment of {n} {big}s of {good} reaches {place}.",
             "{place} orders {n} {big}s of {good}.", "{n} {big}s of {good} were bought by {place}.",
             "{place} gets {n} {big}s of {good}.", "{n} {big}s of {good} are ordered by {place}.",
             "{place} takes in {n} {big}s of {good}.",
             "{place} purchases {n} {big}s of {good} in bulk.",
             "{place} stocks up on {n} {big}s of {good}.",
             "In total, {place} brings in {n} {big}s of {good}.",
             "{place} has {n} {big}s of {good} delivered.",
             "The bulk purchase at {place} is {n} {big}s of {good}."],
}
_QUESTIONS = {
    "count_left": ["How many {items} does {place} have now?", "How many {items} are left at the end?",
                   "What is the final number of {items}?", "Find how many {items} {place} ends up with.",
                   "How many {items} are there at the end?", "How many {items} remain?",
                   "What number of {items} does {place} end with?",
                   "At the end, how many {items} does {place} have?",
                   "What is the count of {items} at {place} now?",
                   "How many {items} are left at {place} after all this?",
                   "Once everything is done, how many {items} does {place} hold?",
                   "{place} now has how many {items}?"],
    "count_each": ["How many {items} does each {recipient} get?", "How many {items} go to each {recipient}?",
                   "What is one {recipient}'s share of {items}, as a count?",
                   "Work out the number of {items} per {recipient}.",
                   "How many {items} does one {recipient} receive?",
                   "What is the number of {items} each {recipient} gets?", "Each {recipient} gets how many {items}?",
                   "How many {items} will a single {recipient} get?",
                   "What is the count of {items} that every {recipient} receives?",
                   "How many {items} are there for each {recipient}?",
                   "How many {items} end up at every {recipient}?",
                   "For one {recipient}, how many {items} is that?"],
    "money_total": ["How many dollars is the final amount?", "What is the total, in dollars?",
                    "How much money is that in all, in dollars?", "Give the final amount in dollars.",
                    "What is the final total in dollars?", "How many dollars does it come to?",
                    "Find the final cost in dollars.",
                    "In dollars, what does it all add up to?",
                    "Adding it all up, how many dollars is it?",
                    "What does it cost altogether, in dollars?",
                    "What dollar amount does this come to?",
                    "The final amount is how many dollars?"],
    "money_change": ["How many dollars of change are due?", "How much change comes back, in dollars?",
                     "What is the change in dollars?", "Find the change owed, in dollars.",
                     "How many dollars come back as change?", "What change is owed, in dollars?",
                     "Work out the change in dollars.",
                     "In dollars, how much change should be given back?",
                     "What amount of change is returned, in dollars?",
                     "The change due is how many dollars?",
                     "How many dollars does the cashier give back?",
                     "After paying, how much change is received, in dollars?"],
    "money_each": ["How many dollars is each {recipient}'s share?", "How much does one {recipient} get, in dollars?",
                   "What is the share per {recipient} in dollars?", "Find each {recipient}'s part, in dollars.",
                   "What is each {recipient}'s share in dollars?", "How many dollars is one {recipient}'s part?",
                   "Find the dollar share of each {recipient}.",
                   "In dollars, how much does every {recipient} pay?",
                   "What does a single {recipient} owe, in dollars?",
                   "How many dollars fall to each {recipient}?",
                   "Each {recipient}'s share comes to how many dollars?",
                   "What amount in dollars does one {recipient} cover?"],
}
_QUESTION_AFTER = {"split": "count_each", "change_due": "money_change", "split_cost": "money_each",
                   "price_qty": "money_total", "bulk_tier": "money_total", "discount": "money_total",
                   "coupon": "money_total", "tax": "money_total", "shipping": "money_total"}
_DISTRACTORS = ["{other} sold {k} {items} last week.", "{k} people work or volunteer at {place}.",
                "{place} is open {h} hours a day.", "The parking lot nearby has {k} spaces.",
                "A regular visitor comes by {h} times a month.", "{place} has been around for {h} years.",
                "Another shop down the road has {k} {items}.", "The manager's phone number ends in {k}."]


def _combos(ops: list[str]) -> list[tuple[str, ...]]:
    """Every subset of ``ops``, each kept in the given order."""
    return [c for r in range(len(ops) + 1) for c in itertools.combinations(ops, r)]


def _chains(*groups: list[tuple[str, ...]]) -> tuple[tuple[str, ...], ...]:
    """Concatenations of one choice per group with 2-4 operations and at most _MAX_STEPS steps in all."""
    chains = (sum(parts, ()) for parts in itertools.product(*groups))
    return tuple(c for c in chains if 2 <= len(c) <= 4 and sum(_STEPS[op] for op in c) <= _MAX_STEPS)


@dataclass(frozen=True)
class _Family:
    start: str  # key of _INTROS
    start_given: str  # variable name of the first given ("{big}" is filled in)
    start_range: tuple[int, int, int]  # randint low, high and a multiplier
    words: Callable[[random.Random], dict[str, str]]
    structures: tuple[tuple[str, ...], ...]


def _store_words(rng: random.Random) -> dict[str, str]:
    items, item, box = rng.choice(COUNT_ITEMS)
    return {"place": rng.choice(STORES), "items": items, "item": item, "container": box, "sells": "sells",
            "sold": "sold", "period": "day", "damaged": "damaged", "recipients": "branches", "recipient": "branch",
            "buyer": rng.choice(BUYERS)}


def _wholesale_words(rng: random.Random) -> dict[str, str]:
    buyer, recipients, recipient = rng.choice(BULK_BUYERS)
    return {**_store_words(rng), "place": rng.choice(WHOLESALERS), "buyer": buyer, "recipients": recipients,
            "recipient": recipient}


def _repack_words(rng: random.Random) -> dict[str, str]:
    good, pack, big, small, factor, sizes = rng.choice(BULK_GOODS)
    return {**_store_words(rng), "good": good, "pack": pack, "big": big, "small": small, "factor": str(factor),
            "pack_sizes": ",".join(map(str, sizes)), "packs": _plural(pack), "items": f"{_plural(pack)} of {good}",
            "item": f"{pack} of {good}"}


def _bakery_words(rng: random.Random) -> dict[str, str]:
    items, item, box = rng.choice(BAKED_GOODS)
    return {**_store_words(rng), "place": rng.choice(BAKERIES), "items": items, "item": item, "container": box,
            "period": "hour", "damaged": "burnt"}


def _food_bank_words(rng: random.Random) -> dict[str, str]:
    items, item, box = rng.choice(PANTRY_ITEMS)
    recipients, recipient = rng.choice([("shelters", "shelter"), ("churches", "church"), ("schools", "school")])
    return {"place": rng.choice(FOOD_BANKS), "items": items, "item": item, "container": box, "sells": "hands out",
            "sold": "handed out", "period": "day", "damaged": "expired", "recipients": recipients,
            "recipient": recipient, "buyer": "a volunteer"}


def _fundraiser_words(rng: random.Random) -> dict[str, str]:
    items, item, box = rng.choice(FUNDRAISER_GOODS)
    recipients, recipient = rng.choice([("teams", "team"), ("classes", "class"), ("trips", "trip")])
    return {"place": rng.choice(CLUBS), "items": items, "item": item, "container": box, "sells": "sells",
            "sold": "sold", "period": "day", "damaged": "squashed", "recipients": recipients,
            "recipient": recipient, "buyer": "a parent"}


_NOTHING: list[tuple[str, ...]] = [()]
FAMILY_SPECS: dict[str, _Family] = {
    "store_inventory": _Family("stock", "starting_stock", (10, 60, 10), _store_words, _chains(
        _combos(["sell_days", "delivery", "returns", "damaged"]), _NOTHING + [("split",)])),
    "checkout": _Family("purchase", "quantity", (2, 12, 1), _store_words, _chains(
        [("price_qty",)], _combos(["discount", "coupon", "tax"]), _NOTHING + [("change_due",)])),
    "wholesale_order": _Family("purchase", "quantity", (30, 200, 1), _wholesale_words, _chains(
        [("bulk_tier",)], _combos(["discount", "tax", "shipping"]), _NOTHING + [("split_cost",)])),
    "repack_bulk": _Family("bulk", "{big}s_bought", (3, 30, 1), _repack_words, _chains(
        [("unit_conversion",)], _combos(["damaged", "split"]), _NOTHING + [("price_qty",), ("price_qty", "discount")])),
    "bakery_shift": _Family("stock", "starting_stock", (40, 240, 1), _bakery_words, _chains(
        _combos(["delivery", "sell_days", "damaged"]), _NOTHING + [("price_qty",), ("price_qty", "discount")])),
    # held out by default: new story contexts that recombine operations the training families use
    "food_bank": _Family("stock", "starting_stock", (10, 60, 10), _food_bank_words, _chains(
        _combos(["delivery", "sell_days", "damaged"]), _NOTHING + [("split",)])),
    "fundraiser": _Family("stock", "starting_stock", (30, 150, 1), _fundraiser_words, _chains(
        _combos(["delivery", "damaged"]), [("price_qty",)], _combos(["discount"]), _NOTHING + [("split_cost",)])),
}
FAMILIES: list[str] = list(FAMILY_SPECS)
DEFAULT_HELDOUT_FAMILIES: list[str] = ["food_bank", "fundraiser"]
STRUCTURES: list[str] = [f"{f}:{'+'.join(ops)}" for f, spec in FAMILY_SPECS.items() for ops in spec.structures]
TEMPLATES = FAMILIES  # the old name: a template is now a family
DEFAULT_HELDOUT_TEMPLATES = DEFAULT_HELDOUT_FAMILIES
_MAX_DRAWS = 200
_OP_TRIES = 20
_TEST_BUCKETS = 8  # one question in 8 (by hash) is reserved for `test`, so train can never contain it


@dataclass
class _Problem:
    ops: tuple[str, ...]  # in the order the question states them
    solution: _Solution
    base_question: str  # without distractors
    question: str
    distractors: int


def _reorder_free_runs(items: Sequence[T], op_of: Callable[[T], str], reorder: Callable[[list[T]], list[T]]) -> list[T]:
    """``items`` with each run of consecutive order-free count changes (_COMMUTING) passed through ``reorder``."""
    runs = itertools.groupby(items, key=lambda x: op_of(x) in _COMMUTING)
    return [x for free, run in runs for x in (reorder(list(run)) if free else run)]


def _render(spec: _Family, ops: tuple[str, ...], phrasing: int, intro: str, facts: list[tuple[str, list[str]]],
            words: dict[str, str], vary: random.Random | None = None, vary_order: bool = True,
            n_wordings: int = DEFAULT_N_WORDINGS) -> list[str]:
    """Sentences of the question (the question sentence last or first), for one phrasing. With ``vary`` (a training
    question under vary_wording) every sentence draws its own wording from the first ``n_wordings`` of
    TRAINING_WORDINGS (the default's are VARIED_WORDINGS) and, with ``vary_order``,
    a third of the time the start is stated after the order-free count changes (which ``_draw`` already shuffled):
    no sentence frame or position tells the student which number is which."""
    variant = phrasing % 3 if phrasing in TRAIN_PHRASINGS else 3
    drawn = TRAINING_WORDINGS[:n_wordings]  # a choice over the same 6-element list as before keeps the default's draws

    def wording() -> int:
        return vary.choice(drawn) if vary is not None else variant

    sentences = [(op, variants[wording()]) for op, variants in facts]
    if phrasing in REWORDED_PHRASINGS:  # reverse each run of count changes whose order does not matter
        sentences = _reorder_free_runs(sentences, lambda x: x[0], lambda run: run[::-1])
    body = [_INTROS[spec.start][wording()].format(**words, n=intro)] + [text.format(**words) for _, text in sentences]
    if phrasing == 6 or (vary is not None and vary_order and vary.random() < 1 / 3):
        # the starting amount is stated after the count changes (their order does not matter)
        run = next((k for k, op in enumerate(ops) if op not in _COMMUTING), len(ops))
        body = body[1: run + 1] + body[:1] + body[run + 1:]
    question = _QUESTIONS[_QUESTION_AFTER.get(ops[-1], "count_left")][wording()].format(**words)
    first = phrasing in _QUESTION_FIRST
    return [_cap(x) for x in ([question] + body if first else body + [question])]


def _draw(family: str, ops: tuple[str, ...], phrasing: int, rng: random.Random,
          distractor_rng: random.Random | None = None, distractors: float = 0.0,
          vary: random.Random | None = None, vary_order: bool = True,
          vocabulary: random.Random | None = None, n_wordings: int = DEFAULT_N_WORDINGS) -> _Problem:
    """One problem; for given ``ops`` the numbers and nouns depend on ``rng`` only, never on the phrasing or the
    distractors. A wording draw ``vary`` with ``vary_order`` first shuffles each run of order-free count changes in
    ``ops``, so the question states them and the program computes them in the same (random) order. A draw
    ``vocabulary`` replaces the story words that name variables (``_vary_vocabulary``); ``n_wordings`` is how many
    wordings ``vary`` draws from (``_render``)."""
    _check_n_wordings(n_wordings)
    spec = FAMILY_SPECS[family]
    if vary is not None and vary_order:
        ops = tuple(_reorder_free_runs(ops, lambda op: op, lambda run: vary.sample(run, len(run))))
    for _ in range(_MAX_DRAWS):
        words = spec.words(rng)
        if vocabulary is not None:
            words = _vary_vocabulary(words, vocabulary)
        s = _Solution(words)
        low, high, mult = spec.start_range
        try:
            cur = spec.start_given.format(**words)
            intro = s.given(cur, rng.randint(low, high) * mult)
            facts = []
            for k, op in enumerate(ops):
                out = "answer" if k == len(ops) - 1 else _RESULT[op]
                for _ in range(_OP_TRIES):
                    mark = s.mark()
                    try:
                        facts.append((op, OPS[op](rng, s, cur, out)))
                        break
                    except _Redraw:
                        s.reset(mark)
                else:
                    raise _Redraw(f"{op} found no clean numbers")
                cur = out
        except _Redraw:
            continue
        sentences = _render(spec, ops, phrasing, intro, facts, words, vary, vary_order, n_wordings)
        base = " ".join(sentences)
        n_distractors = 0
        if distractor_rng is not None and distractors > 0 and distractor_rng.random() < distractors:
            n_distractors = distractor_rng.choice([1, 1, 2])
            facts_at = range(1, len(sentences)) if phrasing in _QUESTION_FIRST else range(len(sentences) - 1)
            for text in distractor_rng.sample(_DISTRACTORS, n_distractors):
                other = distractor_rng.choice([p for p in STORES + BAKERIES if p != words["place"]])
                line = _cap(text.format(**words, other=other, k=distractor_rng.randint(2, 90),
                                        h=distractor_rng.randint(3, 12)))
                sentences.insert(distractor_rng.randint(facts_at.start, facts_at.stop), line)
        return _Problem(ops, s, base, " ".join(sentences), n_distractors)
    raise RuntimeError(f"structure {family}:{'+'.join(ops)} found no clean numbers in {_MAX_DRAWS} draws; "
                       "widen its ranges")


def _check_n_wordings(n_wordings: int) -> None:
    if not DEFAULT_N_WORDINGS <= n_wordings <= len(TRAINING_WORDINGS):
        raise ValueError(f"n_wordings must be {DEFAULT_N_WORDINGS}-{len(TRAINING_WORDINGS)} (the training wordings "
                         f"{TRAINING_WORDINGS}), got {n_wordings}")


def _reserved_for_test(question: str) -> bool:
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % _TEST_BUCKETS == 0


Picker = Callable[[int, random.Random], tuple[str, tuple[str, ...], int]]


def _generate(n: int, rng: random.Random, pick: Picker, prefix: str, avoid: set[str], distractors: float = 0.0,
              test_bucket: bool | None = None, vary_wording: bool = False, vary_order: bool = True,
              vary_vocabulary: bool = False, n_wordings: int = DEFAULT_N_WORDINGS) -> list[Example]:
    """``n`` distinct problems; ``test_bucket`` True/False keeps only questions reserved / not reserved for test;
    ``vary_wording`` draws every sentence's wording per question from ``n_wordings`` wordings and, with
    ``vary_order``, its clause order (see ``_render``); ``vary_vocabulary`` draws the story words that name variables
    (``_vary_vocabulary``)."""
    _check_n_wordings(n_wordings)
    examples: list[Example] = []
    seen = set(avoid)
    distractor_rng = random.Random(f"{prefix}:distractors")
    wording_rng = random.Random(f"{prefix}:wording")
    vocabulary_rng = random.Random(f"{prefix}:vocabulary")  # its own stream: the other draws stay as they were
    for i in range(n):
        family, ops, phrasing = pick(i, rng)
        for _ in range(_MAX_DRAWS * (_TEST_BUCKETS if test_bucket else 1)):
            # one distractor stream per question, so adding distractors never changes the problem itself
            vary = random.Random(wording_rng.random()) if vary_wording else None
            vocabulary = random.Random(vocabulary_rng.random()) if vary_vocabulary else None
            p = _draw(family, ops, phrasing, rng, random.Random(distractor_rng.random()), distractors, vary,
                      vary_order, vocabulary, n_wordings)
            if p.base_question in seen:
                continue
            if test_bucket is not None and _reserved_for_test(p.base_question) != test_bucket:
                continue
            break
        else:
            raise RuntimeError(f"structure {family}:{'+'.join(ops)} keeps repeating questions; ask for fewer examples")
        seen.add(p.base_question)
        s = p.solution
        examples.append(Example(
            id=f"{prefix}-{i}", question=p.question, answer=s.answer(), rationale=s.rationale(), program=s.program(),
            domain="retail",
            metadata={"template": family, "family": family, "structure": f"{family}:{'+'.join(ops)}",
                      "ops": list(p.ops), "phrasing": phrasing, "distractors": p.distractors, "steps": len(s.steps),
                      "source": "retail_math", **({"varied_wording": True} if vary_wording else {}),
                      # recorded only when off, so the default's generated data stays byte-identical
                      **({"varied_order": False} if vary_wording and not vary_order else {}),
                      **({"n_wordings": n_wordings} if vary_wording and n_wordings != DEFAULT_N_WORDINGS else {}),
                      **({"varied_vocabulary": True} if vary_vocabulary else {})},
        ))
    return examples


def _check_families(families: list[str] | None, what: str = "families") -> list[str]:
    chosen = list(FAMILIES if families is None else families)
    unknown = [f for f in chosen if f not in FAMILY_SPECS]
    if unknown or not chosen:
        raise ValueError(f"unknown or empty retail-math {what} {unknown or chosen}; choose from {FAMILIES}")
    return chosen


def _structure_cycle(families: list[str], phrasings: list[int], rng: random.Random) -> Picker:
    """Round-robin over the families' structures in a seeded order (every structure shows up once n >= their
    number); a random phrasing each time."""
    structures = [(f, ops) for f in families for ops in FAMILY_SPECS[f].structures]
    rng.shuffle(structures)

    def pick(i: int, r: random.Random) -> tuple[str, tuple[str, ...], int]:
        family, ops = structures[i % len(structures)]
        return family, ops, r.choice(phrasings)

    return pick


def generate_retail_math(n: int, seed: int = 0, templates: list[str] | None = None, *,
                         families: list[str] | None = None, phrasings: list[int] | None = None,
                         distractors: float = 0.0) -> list[Example]:
    """``n`` distinct retail word problems with gold program, rationale and answer; same seed, same list.

    Families take turns (``templates`` is the old name of ``families``); each question gets a random structure of
    its family and a random phrasing (default: the training phrasings). ``distractors`` is the probability that a
    question carries 1-2 irrelevant sentences.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chosen = _check_families(families if families is not None else templates)
    allowed = TRAIN_PHRASINGS if phrasings is None else phrasings
    if not allowed or any(p not in PHRASINGS for p in allowed):
        raise ValueError(f"phrasings {allowed} must be a non-empty subset of {PHRASINGS}")

    def pick(i: int, r: random.Random) -> tuple[str, tuple[str, ...], int]:
        family = chosen[i % len(chosen)]
        return family, r.choice(FAMILY_SPECS[family].structures), r.choice(allowed)

    return _generate(n, random.Random(f"retail-math:{seed}"), pick, f"retail-{seed}", set(), distractors)


def retail_math_splits(n_train: int, n_test: int, seed: int = 0, heldout_families: list[str] | None = None,
                       n_test_heldout: int | None = None, n_test_reworded: int | None = None,
                       distractors: float = 0.0, heldout_templates: list[str] | None = None,
                       vary_wording: bool = False, vary_order: bool = True,
                       vary_vocabulary: bool = False, n_wordings: int = DEFAULT_N_WORDINGS) -> dict[str, list[Example]]:
    """train / test / test_heldout_families / test_reworded (see the module docstring); no eval question is a train
    question. ``n_test_heldout`` and ``n_test_reworded`` default to ``n_test``; ``heldout_templates`` is the old
    name of ``heldout_families``. ``test_heldout_templates`` is the same list as ``test_heldout_families``.
    ``vary_wording`` varies the training questions' wording and (with ``vary_order``) clause order (``_render``);
    ``vary_vocabulary`` draws the training stories' variable-naming words from wider pools (``_vary_vocabulary``);
    ``n_wordings`` (6-11, with ``vary_wording``) is how many training wordings each sentence draws from (``_render``).
    The eval splits are the same either way, so runs with and without them are measured on the same questions.
    """
    _check_n_wordings(n_wordings)
    if heldout_families is None:
        heldout_families = heldout_templates
    heldout = _check_families(DEFAULT_HELDOUT_FAMILIES if heldout_families is None else heldout_families,
                              "heldout_families")
    trained = [f for f in FAMILIES if f not in heldout]
    if not trained:
        raise ValueError("heldout_families holds every family; leave at least one for training")

    def split(name: str, n: int, families: list[str], phrasings: list[int], avoid: set[str],
              test_bucket: bool | None, train: bool = False) -> list[Example]:
        rng = random.Random(f"retail-math:{seed}:{name}")
        return _generate(n, rng, _structure_cycle(families, phrasings, rng), f"retail-{seed}-{name}", avoid,
                         distractors, test_bucket, train and vary_wording, vary_order, train and vary_vocabulary,
                         n_wordings if train else DEFAULT_N_WORDINGS)

    train = split("train", n_train, trained, TRAIN_PHRASINGS, set(), False, train=True)
    train_questions = {e.question for e in train}
    test = split("test", n_test, trained, TRAIN_PHRASINGS, train_questions, True)
    heldout_test = split("heldout", n_test if n_test_heldout is None else n_test_heldout, heldout, TRAIN_PHRASINGS,
                         train_questions, None)
    reworded = split("reworded", n_test if n_test_reworded is None else n_test_reworded, trained,
                     REWORDED_PHRASINGS, train_questions, None)
    return {"train": train, "test": test, "test_heldout_families": heldout_test, "test_reworded": reworded,
            "test_heldout_templates": heldout_test}


def retail_math_dev(n: int, seed: int = 0, n_test_avoided: int = 1000) -> list[Example]:
    """``n`` dev questions for tuning (e.g. `slm-fusion merge-tune`): trained families and phrasings, drawn from the
    questions reserved for test (so no training set of any size holds them) and disjoint from the first
    ``n_test_avoided`` questions of the test split, which stays the measurement."""
    trained = [f for f in FAMILIES if f not in DEFAULT_HELDOUT_FAMILIES]
    test = retail_math_splits(0, n_test_avoided, seed=seed, n_test_heldout=0, n_test_reworded=0)["test"]
    rng = random.Random(f"retail-math:{seed}:dev")
    return _generate(n, rng, _structure_cycle(trained, TRAIN_PHRASINGS, rng), f"retail-{seed}-dev",
                     {e.question for e in test}, 0.0, True)

