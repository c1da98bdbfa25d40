"""Seeded multi-step retail word problems (inventory, pricing, discounts, tax, units, returns...).

Each template draws numbers, writes the question, and records its solution as named steps
(``variable = expression`` plus one sentence of arithmetic). The same steps produce all three gold signals, so they
cannot disagree: the PAL program (readable variable names, ``return answer``), the chain of thought (ending
"The answer is X.") and the exact answer (computed with fractions). Draws whose intermediate values are not clean
(whole units, whole cents) are rejected and redrawn, so answers are integers or 2-decimal money.

Splits: ``train`` and ``test`` share templates but never a question; ``test_heldout_templates`` uses only templates
kept out of training, to measure transfer to unseen problem shapes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from fractions import Fraction

from reasonlite.answers import eval_arithmetic, format_number
from reasonlite.data.example import Example

__all__ = ["DEFAULT_HELDOUT_TEMPLATES", "TEMPLATES", "generate_retail_math", "retail_math_splits"]

STORES = [
    "Maple Street Market", "Corner Grocer", "Harbor Hardware", "Bright Books", "Sunny Side Deli", "Green Leaf Garden",
    "Pixel Electronics", "Oak & Iron Outfitters", "Blue Door Bakery", "Northside Pharmacy", "Riverbend Pet Supply",
    "Summit Sports", "Old Town Toys", "Lakeside Florist", "Cedar Office Supply", "Golden Spoon Kitchenware",
]
# (plural, singular, container)
COUNT_ITEMS = [
    ("notebooks", "notebook", "carton"), ("light bulbs", "light bulb", "case"), ("cans of soup", "can of soup", "case"),
    ("tennis balls", "tennis ball", "crate"), ("pens", "pen", "box"), ("candles", "candle", "box"),
    ("water bottles", "water bottle", "pallet"), ("bags of dog food", "bag of dog food", "pallet"),
    ("jars of honey", "jar of honey", "crate"), ("toy cars", "toy car", "carton"), ("batteries", "battery", "box"),
    ("flower pots", "flower pot", "crate"), ("coffee mugs", "coffee mug", "case"), ("socks", "pair of socks", "box"),
]
# (bulk good, small pack noun, bulk unit, small unit, factor)
BULK_GOODS = [
    ("coffee beans", "bag", "kilogram", "grams", 1000), ("rice", "bag", "kilogram", "grams", 1000),
    ("flour", "sack", "kilogram", "grams", 1000), ("mixed nuts", "pouch", "kilogram", "grams", 1000),
    ("olive oil", "bottle", "liter", "milliliters", 1000), ("orange juice", "carton", "liter", "milliliters", 1000),
    ("ribbon", "spool", "meter", "centimeters", 100), ("garden hose", "coil", "meter", "centimeters", 100),
]


class _Redraw(Exception):
    """The drawn numbers give an unclean value; draw again."""


class _Solution:
    """Records givens and steps; every value is exact and checked for cleanliness as it is computed."""

    def __init__(self) -> None:
        self.values: dict[str, Fraction] = {}
        self.money: set[str] = set()
        self.givens: list[str] = []
        self.steps: list[tuple[str, str, str]] = []  # (variable, expression, sentence)
        self.question = ""

    def given(self, name: str, value: Fraction | float | str, money: bool = False) -> str:
        self.values[name] = Fraction(value)
        self.givens.append(name)
        if money:
            self.money.add(name)
        return self.show(name)

    def step(self, name: str, expr: str, sentence: str, money: bool = False) -> None:
        value = eval_arithmetic(expr, self.values)
        clean = (value * 100).denominator == 1 if money else value.denominator == 1
        if not clean or value < 0 or (name == "answer" and value == 0):
            raise _Redraw(f"{name} = {value}")
        if any(self.values[g] < 0 for g in self.givens):
            raise _Redraw("a given quantity came out negative")
        self.values[name] = value
        if money:
            self.money.add(name)
        self.steps.append((name, expr, sentence.format(**{k: self.show(k) for k in self.values})))

    def show(self, name: str) -> str:
        value = self.values[name]
        if name in self.money:
            return f"${value.numerator // value.denominator}" if value.denominator == 1 else f"${float(value):.2f}"
        return format_number(value)

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


def _money(rng: random.Random, low: float, high: float, step: str = "0.25") -> Fraction:
    """A price between low and high dollars in multiples of ``step`` (quarters keep percentages clean)."""
    unit = Fraction(step)
    return unit * rng.randint(int(Fraction(low) / unit), int(Fraction(high) / unit))


# ---------------------------------------------------------------------------------------------------------------
# Templates: each draws numbers into `s` and returns the question text.
# ---------------------------------------------------------------------------------------------------------------

def _restock_inventory(rng: random.Random, s: _Solution) -> str:
    store, (items, _, box) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    start = s.given("starting_stock", rng.randint(8, 40) * 10)
    daily = s.given("sold_per_day", rng.randint(5, 30))
    days = s.given("days", rng.randint(3, 7))
    boxes = s.given("boxes_delivered", rng.randint(2, 9))
    per_box = s.given("units_per_box", rng.choice([12, 20, 24, 25, 36, 48]))
    s.step("units_sold", "sold_per_day * days",
           "The store sells {sold_per_day} * {days} = {units_sold} " + items + ".")
    s.step("units_left", "starting_stock - units_sold",
           "That leaves {starting_stock} - {units_sold} = {units_left} " + items + ".")
    s.step("units_delivered", "boxes_delivered * units_per_box",
           "The delivery brings {boxes_delivered} * {units_per_box} = {units_delivered} " + items + ".")
    s.step("answer", "units_left + units_delivered", "Now there are {units_left} + {units_delivered} = {answer}.")
    return (f"{store} had {start} {items} in stock. It sold {daily} {items} each day for {days} days. Then a delivery "
            f"of {boxes} {box}s arrived, each holding {per_box} {items}. How many {items} does {store} have now?")


def _discount_then_tax(rng: random.Random, s: _Solution) -> str:
    store, (items, item, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    price = s.given("price_each", _money(rng, 2, 40), money=True)
    qty = s.given("quantity", rng.randint(2, 12))
    pct = s.given("discount_percent", rng.choice([10, 15, 20, 25, 30, 40, 50]))
    tax = s.given("tax_percent", rng.choice([4, 5, 6, 8, 10]))
    s.step("subtotal", "quantity * price_each", "The {quantity} " + items + " cost {quantity} * {price_each} = "
           "{subtotal}.", money=True)
    s.step("discount", "subtotal * discount_percent / 100",
           "The discount is {subtotal} * {discount_percent}% = {discount}.", money=True)
    s.step("discounted_total", "subtotal - discount", "After the discount: {subtotal} - {discount} = "
           "{discounted_total}.", money=True)
    s.step("tax", "discounted_total * tax_percent / 100",
           "Tax is {discounted_total} * {tax_percent}% = {tax}.", money=True)
    s.step("answer", "discounted_total + tax", "The total is {discounted_total} + {tax} = {answer}.", money=True)
    return (f"At {store}, one {item} costs {price}. A customer buys {qty} {items} during a {pct}%-off sale. Sales tax "
            f"of {tax}% is added after the discount. How many dollars does the customer pay in total?")


def _unit_conversion_packs(rng: random.Random, s: _Solution) -> str:
    store = rng.choice(STORES)
    good, pack, big, small, factor = rng.choice(BULK_GOODS)
    amount = s.given("bulk_amount", rng.randint(3, 30))
    s.given(f"{small}_per_{big}", factor)
    size = s.given("pack_size", rng.choice([100, 125, 200, 250, 500]) if factor == 1000 else rng.choice([20, 25, 50]))
    price = s.given("pack_price", _money(rng, 1, 12, "0.5"), money=True)
    s.step(f"total_{small}", f"bulk_amount * {small}_per_{big}",
           "{bulk_amount} " + big + "s is {bulk_amount} * {" + f"{small}_per_{big}" + "} = {total_" + small + "} "
           + small + ".")
    s.step("packs", f"total_{small} / pack_size",
           "That fills {total_" + small + "} / {pack_size} = {packs} " + pack + "s.")
    s.step("answer", "packs * pack_price", "Selling them brings in {packs} * {pack_price} = {answer}.", money=True)
    return (f"{store} buys {amount} {big}s of {good} and repacks it into {pack}s of {size} {small} each. Each {pack} "
            f"sells for {price}. If every {pack} is sold, how many dollars does the store take in?")


def _split_stock(rng: random.Random, s: _Solution) -> str:
    store, (items, _, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    branches = rng.randint(3, 8)
    per_branch = rng.randint(10, 60)  # drawn first so the split comes out whole
    reserved = s.given("reserved_online", rng.randint(2, 20) * 5)
    total = s.given("total_units", per_branch * branches + s.values["reserved_online"])
    s.given("branches", branches)
    s.step("units_to_share", "total_units - reserved_online",
           "After the online reserve, {total_units} - {reserved_online} = {units_to_share} " + items + " remain.")
    s.step("answer", "units_to_share / branches", "Each branch gets {units_to_share} / {branches} = {answer}.")
    return (f"{store} received {total} {items}. It keeps {reserved} for online orders and splits the rest equally "
            f"among its {branches} branches. How many {items} does each branch get?")


def _bulk_pricing(rng: random.Random, s: _Solution) -> str:
    store, (items, item, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    first = s.given("first_tier_units", rng.choice([10, 20, 25, 50]))
    full = s.given("full_price", _money(rng, 1, 9), money=True)
    cheap = s.given("bulk_price", s.values["full_price"] - _money(rng, 0.25, 1), money=True)
    qty = s.given("units_bought", s.values["first_tier_units"] + rng.randint(5, 80))
    s.step("extra_units", "units_bought - first_tier_units",
           "Beyond the first {first_tier_units}, there are {units_bought} - {first_tier_units} = {extra_units} "
           "more " + items + ".")
    s.step("first_tier_cost", "first_tier_units * full_price",
           "The first {first_tier_units} cost {first_tier_units} * {full_price} = {first_tier_cost}.", money=True)
    s.step("extra_cost", "extra_units * bulk_price",
           "The rest cost {extra_units} * {bulk_price} = {extra_cost}.", money=True)
    s.step("answer", "first_tier_cost + extra_cost",
           "Altogether {first_tier_cost} + {extra_cost} = {answer}.", money=True)
    return (f"{store} sells {items} for {full} each for the first {first}, and {cheap} each for every {item} after "
            f"that. A school orders {qty} {items}. How many dollars does the order cost?")


def _profit_margin(rng: random.Random, s: _Solution) -> str:
    store, (items, item, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    cost = s.given("unit_cost", _money(rng, 2, 30, "0.5"), money=True)
    markup = s.given("markup_percent", rng.choice([20, 25, 30, 40, 50, 60, 100]))
    units = s.given("units_sold", rng.randint(10, 120))
    s.step("markup_per_unit", "unit_cost * markup_percent / 100",
           "The markup is {unit_cost} * {markup_percent}% = {markup_per_unit} per " + item + ".", money=True)
    s.step("selling_price", "unit_cost + markup_per_unit",
           "So each sells for {unit_cost} + {markup_per_unit} = {selling_price}.", money=True)
    s.step("revenue", "selling_price * units_sold",
           "Revenue is {selling_price} * {units_sold} = {revenue}.", money=True)
    s.step("total_cost", "unit_cost * units_sold", "Cost is {unit_cost} * {units_sold} = {total_cost}.", money=True)
    s.step("answer", "revenue - total_cost", "Profit is {revenue} - {total_cost} = {answer}.", money=True)
    return (f"{store} buys {items} for {cost} each and prices them with a {markup}% markup. It sells {units} {items}. "
            f"How many dollars of profit does it make on them?")


def _returns_refund(rng: random.Random, s: _Solution) -> str:
    store, (items, _, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    price = s.given("price_each", _money(rng, 3, 50, "0.5"), money=True)
    sold = s.given("units_sold", rng.randint(20, 150))
    returned = s.given("units_returned", rng.randint(2, 15))
    fee = s.given("restocking_fee", _money(rng, 0.5, 3, "0.5"), money=True)
    s.step("revenue", "units_sold * price_each", "Sales bring in {units_sold} * {price_each} = {revenue}.", money=True)
    s.step("refund_each", "price_each - restocking_fee",
           "Each return refunds {price_each} - {restocking_fee} = {refund_each}.", money=True)
    s.step("refunds", "units_returned * refund_each",
           "Refunds total {units_returned} * {refund_each} = {refunds}.", money=True)
    s.step("answer", "revenue - refunds", "The store keeps {revenue} - {refunds} = {answer}.", money=True)
    return (f"{store} sold {sold} {items} at {price} each. Later {returned} of them were returned; the store refunds "
            f"the price minus a {fee} restocking fee per item. How many dollars does the store keep?")


def _successive_discounts(rng: random.Random, s: _Solution) -> str:
    store, (_, item, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    price = s.given("original_price", _money(rng, 10, 200, "1"), money=True)
    first = s.given("first_discount_percent", rng.choice([10, 20, 25, 50]))
    second = s.given("second_discount_percent", rng.choice([10, 20, 25, 50]))
    s.step("first_discount", "original_price * first_discount_percent / 100",
           "The first discount is {original_price} * {first_discount_percent}% = {first_discount}.", money=True)
    s.step("after_first", "original_price - first_discount",
           "The price drops to {original_price} - {first_discount} = {after_first}.", money=True)
    s.step("second_discount", "after_first * second_discount_percent / 100",
           "The second discount is {after_first} * {second_discount_percent}% = {second_discount}.", money=True)
    s.step("answer", "after_first - second_discount",
           "The final price is {after_first} - {second_discount} = {answer}.", money=True)
    return (f"A premium {item} at {store} is priced at {price}. It is marked {first}% off, and at the register "
            f"another {second}% is taken off the reduced price. What is the final price in dollars?")


def _shelf_restock_cases(rng: random.Random, s: _Solution) -> str:
    store, (items, _, box) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    case = rng.choice([6, 8, 10, 12, 24])
    on_shelf = s.given("on_shelf", rng.randint(3, 40))
    capacity = s.given("shelf_capacity", s.values["on_shelf"] + case * rng.randint(2, 12))
    s.given("units_per_case", case)
    cost = s.given("case_cost", _money(rng, 5, 60, "0.5"), money=True)
    s.step("empty_spaces", "shelf_capacity - on_shelf",
           "The shelf has room for {shelf_capacity} - {on_shelf} = {empty_spaces} more " + items + ".")
    s.step("cases_needed", "empty_spaces / units_per_case",
           "That takes {empty_spaces} / {units_per_case} = {cases_needed} " + box + "s.")
    s.step("answer", "cases_needed * case_cost", "They cost {cases_needed} * {case_cost} = {answer}.", money=True)
    return (f"A shelf at {store} holds {capacity} {items} and currently has {on_shelf}. {items.capitalize()} come in "
            f"{box}s of {case} that cost {cost} per {box}. How many dollars does it cost to fill the shelf exactly?")


def _unit_price_savings(rng: random.Random, s: _Solution) -> str:
    store, (items, item, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    small_n = s.given("small_pack_count", rng.choice([2, 4, 5]))
    big_n = s.given("big_pack_count", s.values["small_pack_count"] * rng.choice([3, 4, 5, 6]))
    small_p = s.given("small_pack_price", _money(rng, 2, 15, "0.5"), money=True)
    big_p = s.given("big_pack_price", s.values["small_pack_price"] * s.values["big_pack_count"]
                    / s.values["small_pack_count"] - _money(rng, 1, 6, "0.5"), money=True)
    needed = s.given("units_needed", s.values["big_pack_count"] * rng.randint(1, 4))
    s.step("small_unit_price", "small_pack_price / small_pack_count",
           "The small pack costs {small_pack_price} / {small_pack_count} = {small_unit_price} per " + item + ".",
           money=True)
    s.step("big_unit_price", "big_pack_price / big_pack_count",
           "The big pack costs {big_pack_price} / {big_pack_count} = {big_unit_price} per " + item + ".", money=True)
    s.step("saving_per_unit", "small_unit_price - big_unit_price",
           "Each " + item + " saves {small_unit_price} - {big_unit_price} = {saving_per_unit}.", money=True)
    s.step("answer", "saving_per_unit * units_needed",
           "For {units_needed} " + items + " that is {saving_per_unit} * {units_needed} = {answer}.", money=True)
    return (f"{store} sells {items} in packs of {small_n} for {small_p} or packs of {big_n} for {big_p}. How many "
            f"dollars are saved by buying {needed} {items} in big packs instead of small packs?")


def _weekly_sales_average(rng: random.Random, s: _Solution) -> str:
    store, (items, _, _) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    days = ["monday", "tuesday", "wednesday", "thursday", "friday"][: rng.randint(3, 5)]
    for day in days:
        s.given(f"{day}_sales", rng.randint(10, 90))
    names = [f"{day}_sales" for day in days]
    s.given("days", len(days))
    s.step("total_sales", " + ".join(names),
           "Total sales are " + " + ".join("{" + n + "}" for n in names) + " = {total_sales}.")
    s.step("answer", "total_sales / days", "The daily average is {total_sales} / {days} = {answer}.")
    listing = ", ".join(f"{s.show(n)} on {d.capitalize()}" for n, d in zip(names, days))
    return f"{store} sold {items} as follows: {listing}. On average, how many {items} did it sell per day?"


def _change_due(rng: random.Random, s: _Solution) -> str:
    store = rng.choice(STORES)
    (items_a, _, _), (items_b, _, _) = rng.sample(COUNT_ITEMS, 2)
    qa = s.given("quantity_a", rng.randint(2, 6))
    pa = s.given("price_a", _money(rng, 1, 9), money=True)
    qb = s.given("quantity_b", rng.randint(2, 5))
    pb = s.given("price_b", _money(rng, 1, 12), money=True)
    paid = s.given("amount_paid", rng.choice([50, 100]), money=True)
    s.step("cost_a", "quantity_a * price_a", "The " + items_a + " cost {quantity_a} * {price_a} = {cost_a}.",
           money=True)
    s.step("cost_b", "quantity_b * price_b", "The " + items_b + " cost {quantity_b} * {price_b} = {cost_b}.",
           money=True)
    s.step("total_cost", "cost_a + cost_b", "Together that is {cost_a} + {cost_b} = {total_cost}.", money=True)
    s.step("answer", "amount_paid - total_cost", "The change is {amount_paid} - {total_cost} = {answer}.", money=True)
    return (f"At {store}, a customer buys {qa} {items_a} at {pa} each and {qb} {items_b} at {pb} each, paying with a "
            f"{paid} bill. How many dollars of change should the customer get?")


def _reorder_quantity(rng: random.Random, s: _Solution) -> str:
    store, (items, _, box) = rng.choice(STORES), rng.choice(COUNT_ITEMS)
    per_box = rng.choice([6, 10, 12, 20, 24])
    weeks = s.given("weeks", rng.randint(2, 6))
    weekly = s.given("weekly_demand", rng.randint(4, 30) * 5)
    boxes = rng.randint(2, 15)  # drawn first so the shortfall is a whole number of boxes
    stock = s.given("current_stock", s.values["weeks"] * s.values["weekly_demand"] - boxes * per_box)
    s.given("units_per_box", per_box)
    s.step("demand", "weekly_demand * weeks", "Demand is {weekly_demand} * {weeks} = {demand} " + items + ".")
    s.step("shortfall", "demand - current_stock", "The shortfall is {demand} - {current_stock} = {shortfall}.")
    s.step("answer", "shortfall / units_per_box", "That is {shortfall} / {units_per_box} = {answer} " + box + "s.")
    return (f"{store} expects to sell {weekly} {items} per week for the next {weeks} weeks and has {stock} in stock. "
            f"{items.capitalize()} are ordered in {box}s of {per_box}. How many {box}s must it order to meet demand "
            "exactly?")


_TEMPLATE_FUNCS: dict[str, Callable[[random.Random, _Solution], str]] = {
    "restock_inventory": _restock_inventory,
    "discount_then_tax": _discount_then_tax,
    "unit_conversion_packs": _unit_conversion_packs,
    "split_stock": _split_stock,
    "bulk_pricing": _bulk_pricing,
    "profit_margin": _profit_margin,
    "returns_refund": _returns_refund,
    "successive_discounts": _successive_discounts,
    "shelf_restock_cases": _shelf_restock_cases,
    "unit_price_savings": _unit_price_savings,
    "weekly_sales_average": _weekly_sales_average,
    "change_due": _change_due,
    "reorder_quantity": _reorder_quantity,
}
TEMPLATES: list[str] = list(_TEMPLATE_FUNCS)
DEFAULT_HELDOUT_TEMPLATES: list[str] = ["unit_price_savings", "returns_refund"]
_MAX_DRAWS = 200


def _check_templates(templates: list[str] | None) -> list[str]:
    chosen = list(TEMPLATES if templates is None else templates)
    unknown = [t for t in chosen if t not in _TEMPLATE_FUNCS]
    if unknown or not chosen:
        raise ValueError(f"unknown or empty retail-math templates {unknown or chosen}; choose from {TEMPLATES}")
    return chosen


def _draw(template: str, rng: random.Random) -> _Solution:
    for _ in range(_MAX_DRAWS):
        s = _Solution()
        try:
            question = _TEMPLATE_FUNCS[template](rng, s)
        except _Redraw:
            continue
        s.question = question
        return s
    raise RuntimeError(f"template {template!r} found no clean numbers in {_MAX_DRAWS} draws; widen its ranges")


def _generate(n: int, rng: random.Random, templates: list[str], prefix: str, avoid: set[str]) -> list[Example]:
    examples: list[Example] = []
    seen = set(avoid)
    for i in range(n):
        template = templates[i % len(templates)]  # round-robin keeps templates balanced in any n
        for _ in range(_MAX_DRAWS):
            s = _draw(template, rng)
            if s.question not in seen:
                break
        else:
            raise RuntimeError(f"template {template!r} keeps repeating questions; ask for fewer examples")
        seen.add(s.question)
        examples.append(Example(
            id=f"{prefix}-{i}",
            question=s.question,
            answer=s.answer(),
            rationale=s.rationale(),
            program=s.program(),
            domain="retail",
            metadata={"template": template, "steps": len(s.steps), "source": "retail_math"},
        ))
    return examples


def generate_retail_math(n: int, seed: int = 0, templates: list[str] | None = None) -> list[Example]:
    """``n`` distinct retail word problems with gold program, rationale and answer; same seed, same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _generate(n, random.Random(f"retail-math:{seed}"), _check_templates(templates), f"retail-{seed}", set())


def retail_math_splits(n_train: int, n_test: int, seed: int = 0, heldout_templates: list[str] | None = None,
                       n_test_heldout: int | None = None) -> dict[str, list[Example]]:
    """Train / test (same templates, new questions) / test_heldout_templates (templates never trained on).

    ``n_test_heldout`` sizes the held-out-template split (default: ``n_test``).
    """
    heldout = _check_templates(DEFAULT_HELDOUT_TEMPLATES if heldout_templates is None else heldout_templates)
    seen_templates = [t for t in TEMPLATES if t not in heldout]
    if not seen_templates:
        raise ValueError("heldout_templates holds every template; leave at least one for training")
    train = _generate(n_train, random.Random(f"retail-math:{seed}:train"), seen_templates, f"retail-{seed}-train",
                      set())
    test = _generate(n_test, random.Random(f"retail-math:{seed}:test"), seen_templates, f"retail-{seed}-test",
                     {e.question for e in train})
    n_heldout = n_test if n_test_heldout is None else n_test_heldout
    heldout_test = _generate(n_heldout, random.Random(f"retail-math:{seed}:heldout"), heldout,
                             f"retail-{seed}-heldout", set())
    return {"train": train, "test": test, "test_heldout_templates": heldout_test}
