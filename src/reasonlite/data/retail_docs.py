"""Seeded retail documents, and questions answered from them: look facts up, then do the arithmetic.

A *world* is one small retail chain. Its documents are short markdown files (~60-150 tokens, so each is ONE chunk in a
vector store and a gold source is a whole document):
  catalog-<product>.md     a product's catalog page: name, SKU, unit price, case size;
  promotions-<chain>-<category>-<page>.md  offers, five products a page: a member discount % or "buy N, get 1 free";
  stock-<store>.md         a store's stock report: units on hand per product it carries;
  policies-<store>.md      a store's return policy (restocking fee % on opened items) and price match (% of the
                           difference taken off on top).
A world's facts depend on the seed and the world's name only, never on how many questions are asked, so the folder
`write_retail_docs` fills for `slm-fusion store ingest` stays the same whatever `n_train`.

A question names a product (and a store) and a quantity; the numbers it needs live only in the documents. Each
question *kind* looks its facts up and records named steps with retail_math's step recorder, so the gold PAL program
(looked-up facts and given quantities as named variables, `return answer`), the chain of thought (the lookups, then
the arithmetic, ending "The answer is X.") and the exact answer cannot disagree. `Example.context` holds the
documents the question needs (its gold sources) and `metadata["lookups"]` the facts read from them. There are 18
kinds: the 7 CLASSIC_KINDS (the default) and, with `kinds="all"` (`data.kinds: all`), 11 more that read the same
facts in other combinations (units in cases, a budget's units, two products' total, two stores' stock, a
delivery...), so that a held-out kind recombines trained lookups and steps.

Splits (`retail_docs_splits`):
  ``train``               the train world, training kinds;
  ``test``                the test world (products, prices, stores never in training), the same kinds: a student
                          that memorised training facts instead of reading the sources fails here;
  ``test_heldout_kinds``  the test world, question kinds never trained on (default: stock_value and price_match,
                          which combine lookups the training kinds make on their own).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from reasonlite.data.example import Example, Source

# retail_math's recorder: givens and steps, each value exact and checked clean; one record gives program, CoT, answer
from reasonlite.data.retail_math import _Redraw, _Solution

__all__ = ["CLASSIC_KINDS", "DEFAULT_HELDOUT_KINDS", "KINDS", "WORLDS", "retail_docs_corpus", "retail_docs_splits",
           "write_retail_docs"]

# Invented brand names: a product is "<brand> <item>", one brand per product, so a name never repeats across worlds.
BRANDS = [
    "Aria", "Nova", "Contour", "Lumo", "Brio", "Zephyr", "Orla", "Kiva", "Tessa", "Milo", "Vela", "Quill", "Ember",
    "Juno", "Solis", "Piper", "Halden", "Rhea", "Nimbus", "Corvo", "Larkin", "Fenna", "Isla", "Dorian", "Marlo",
    "Sable", "Tarin", "Yara", "Vesta", "Opal", "Cleo", "Bram", "Alder", "Wren", "Sorrel", "Indra", "Pavo", "Kestrel",
    "Lyra", "Tova", "Ciro", "Elio", "Maren", "Nyla", "Rook", "Saffi", "Thea", "Ulla", "Vida", "Zola", "Arlo", "Calla",
]
# (item, plural, category, unit price range in dollars, case sizes, one-line description)
ITEMS = [
    ("kettle", "kettles", "kitchen", (18, 60), (4, 6), "A 1.7 liter electric kettle with auto shut-off."),
    ("mug", "mugs", "kitchen", (3, 12), (12, 24), "A 350 ml stoneware mug, dishwasher safe."),
    ("toaster", "toasters", "kitchen", (20, 70), (4, 6), "A two-slice toaster with a defrost setting."),
    ("teapot", "teapots", "kitchen", (12, 40), (6, 8), "A glass teapot with a steel infuser."),
    ("frying pan", "frying pans", "kitchen", (15, 55), (6, 10), "A 28 cm non-stick frying pan."),
    ("desk lamp", "desk lamps", "home", (15, 65), (4, 8), "An LED desk lamp with three brightness levels."),
    ("candle", "candles", "home", (4, 18), (12, 24), "A soy wax candle that burns for about 40 hours."),
    ("pillow", "pillows", "home", (10, 40), (6, 10), "A medium-firm pillow with a washable cover."),
    ("towel", "towels", "home", (5, 25), (10, 20), "A cotton bath towel, 70 by 140 cm."),
    ("plant pot", "plant pots", "home", (4, 22), (8, 12), "A ceramic plant pot with a drainage hole."),
    ("notebook", "notebooks", "office", (2, 10), (20, 24), "An A5 notebook with 120 dotted pages."),
    ("backpack", "backpacks", "office", (25, 80), (4, 6), "A 20 liter backpack with a laptop sleeve."),
    ("water bottle", "water bottles", "office", (8, 30), (12, 24), "A 750 ml insulated steel water bottle."),
    ("stapler", "staplers", "office", (5, 20), (10, 12), "A full-strip stapler for up to 25 sheets."),
]
PROMOTIONS_PER_PAGE = 5
STREETS = ["Elm St", "Harbor Rd", "Maple Ave", "Mill Lane", "Oak St", "River Rd", "Station Sq", "Hill St",
           "Park Ave", "Bay Rd", "Court St", "Lake Dr"]


@dataclass(frozen=True)
class WorldSpec:
    chain: str
    products: int
    stores: int
    carried: int  # products each store stocks (its stock report's lines)


WORLDS: dict[str, WorldSpec] = {"train": WorldSpec("Brightmart", 28, 4, 8),
                                "test": WorldSpec("Valuco", 20, 3, 8)}


@dataclass(frozen=True)
class Product:
    name: str
    plural: str
    sku: str
    category: str
    unit_price: Fraction
    case_size: int
    description: str
    member_discount: int | None  # % off for members; None when the product's offer is buy-N-get-1
    buy_n: int | None  # "buy N, get 1 free"; None when the offer is a member discount


@dataclass(frozen=True)
class Store:
    name: str  # "Elm St"
    stock: dict[str, int]  # product name -> units on hand
    restocking_fee: int  # % kept from refunds of opened items
    price_match_extra: int  # % of the price difference taken off on top of matching


@dataclass
class World:
    name: str
    chain: str
    products: list[Product]
    stores: list[Store]
    documents: dict[str, Source]  # "catalog:<product>", "promotions:<product>" (its page), "stock:<store>",
    #                               "policies:<store>"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _money(value: Fraction) -> str:
    return f"${float(value):.2f}"


# ---------------------------------------------------------------------------------------------------------------
# Worlds and their documents
# ---------------------------------------------------------------------------------------------------------------

def _split_among_worlds(names: Sequence[str], seed: int, what: str) -> dict[str, list[str]]:
    """Disjoint slices of `names` per world (one seeded shuffle): `what` is 'products' (brands) or 'stores'
    (streets), the WorldSpec count each world takes."""
    pool = list(names)
    random.Random(f"retail-docs:{seed}:{'brands' if what == 'products' else 'streets'}").shuffle(pool)
    out, start = {}, 0
    for name, spec in WORLDS.items():
        count = getattr(spec, what)
        out[name] = pool[start: start + count]
        start += count
    return out


def _brands(seed: int) -> dict[str, list[str]]:
    return _split_among_worlds(BRANDS, seed, "products")


def _streets(seed: int) -> dict[str, list[str]]:
    return _split_among_worlds(STREETS, seed, "stores")


def _products(rng: random.Random, brands: list[str]) -> list[Product]:
    products = []
    for brand in brands:
        item, plural, category, (low, high), cases, description = rng.choice(ITEMS)
        bogo = rng.random() < 0.4
        products.append(Product(
            name=f"{brand} {item}", plural=f"{brand} {plural}", sku=f"{brand[:2].upper()}-{rng.randint(1000, 9999)}",
            category=category, unit_price=Fraction(rng.randint(low * 4, high * 4), 4), case_size=rng.choice(cases),
            description=description, member_discount=None if bogo else rng.choice([10, 15, 20, 25, 30]),
            buy_n=rng.choice([2, 3, 4]) if bogo else None))
    return products


def _documents(chain: str, products: list[Product], stores: list[Store]) -> dict[str, Source]:
    docs: dict[str, Source] = {}
    for p in products:
        docs[f"catalog:{p.name}"] = Source(filename=f"catalog-{_slug(p.name)}.md", text=(
            f"# {p.name} - {chain} catalog\nSKU: {p.sku}\nCategory: {p.category}\n"
            f"Unit price: {_money(p.unit_price)}\nCase size: {p.case_size} units per case\n{p.description}"))
    for category in sorted({p.category for p in products}):
        listed = [p for p in products if p.category == category]
        for page, start in enumerate(range(0, len(listed), PROMOTIONS_PER_PAGE), 1):  # pages stay one short chunk
            on_page = listed[start: start + PROMOTIONS_PER_PAGE]
            lines = [f"- {p.name}: members save {p.member_discount}% on every unit." if p.member_discount is not None
                     else f"- {p.name}: buy {p.buy_n}, get 1 free (single units)." for p in on_page]
            doc = Source(filename=f"promotions-{_slug(chain)}-{category}-{page}.md", text=(
                f"# {chain} promotions - {category}, page {page}\n" + "\n".join(lines)))
            docs.update({f"promotions:{p.name}": doc for p in on_page})
    by_name = {p.name: p for p in products}
    for s in stores:
        lines = [f"- {name} ({by_name[name].sku}): {units} units" for name, units in s.stock.items()]
        docs[f"stock:{s.name}"] = Source(filename=f"stock-{_slug(s.name)}.md", text=(
            f"# Stock report - {chain} {s.name} store\n" + "\n".join(lines)))
        docs[f"policies:{s.name}"] = Source(filename=f"policies-{_slug(s.name)}.md", text=(
            f"# Returns, refunds and price match - {chain} {s.name} store\n"
            f"Returns and refunds: within 30 days with a receipt. Returned unopened items are refunded in full; "
            f"returned opened items are refunded minus a {s.restocking_fee}% restocking fee.\n"
            f"Price match: if a competitor sells an item for less, we match its price and take off a further "
            f"{s.price_match_extra}% of the difference."))
    return docs


def make_world(name: str, seed: int = 0) -> World:
    """One world's products, stores and documents (the same for a seed, whatever else is generated)."""
    spec = WORLDS[name]
    rng = random.Random(f"retail-docs:{seed}:{name}")
    products = _products(rng, _brands(seed)[name])
    stores = [Store(street, {p.name: rng.randint(3, 40) * 5 for p in rng.sample(products, spec.carried)},
                    restocking_fee=rng.choice([5, 10, 15, 20]), price_match_extra=rng.choice([10, 20, 50]))
              for street in _streets(seed)[name]]
    return World(name, spec.chain, products, stores, _documents(spec.chain, products, stores))


def retail_docs_corpus(seed: int = 0) -> list[Source]:
    """Every document of every world: what a vector store for these questions holds."""
    docs = {doc.filename: doc for name in WORLDS for doc in make_world(name, seed).documents.values()}
    return list(docs.values())  # a promotions page is the document of several products: each file once


def write_retail_docs(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """One .md file per document in `out_dir` (created), ready for `slm-fusion store ingest OUT_DIR --store NAME`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for doc in retail_docs_corpus(seed):
        path = out / doc.filename
        path.write_text(doc.text + "\n", encoding="utf-8")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Question kinds. Each draws what it asks about, records givens (looked-up facts and the question's quantities) and
# steps into `s`, and returns (question, lookup sentence, documents used, looked-up given names).
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Drawn:
    question: str
    lookup: str  # the CoT's first sentence: the facts as the documents state them
    docs: list[str]  # keys into World.documents
    looked_up: list[str]  # given names whose values come from the documents
    product: str
    store: str | None = None


Kind = Callable[[random.Random, World, _Solution], _Drawn]


def _case_cost(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice(w.products)
    cases = s.given("cases", rng.randint(2, 9))
    s.given("case_size", p.case_size)
    s.given("unit_price", p.unit_price, money=True)
    s.step("units", "cases * case_size", "{cases} cases hold {cases} * {case_size} = {out} units.")
    s.step("answer", "units * unit_price", "They cost {units} * {unit_price} = {out}.", money=True)
    q = rng.choice([f"What do {cases} cases of the {p.name} cost?",
                    f"A shop orders {cases} cases of the {p.name}. How much does the order cost in dollars?"])
    return _Drawn(q, f"The catalog lists the {p.name} at {_money(p.unit_price)} with {p.case_size} units per case.",
                  [f"catalog:{p.name}"], ["case_size", "unit_price"], p.name, None)


def _member_case_cost(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice([p for p in w.products if p.member_discount is not None])
    cases = s.given("cases", rng.randint(1, 6))
    s.given("case_size", p.case_size)
    s.given("unit_price", p.unit_price, money=True)
    s.given("member_discount_percent", p.member_discount)
    s.step("units", "cases * case_size", "{cases} cases hold {cases} * {case_size} = {out} units.")
    s.step("full_price", "units * unit_price", "At full price they cost {units} * {unit_price} = {out}.", money=True)
    s.step("discount", "full_price * member_discount_percent / 100",
           "The member discount is {full_price} * {member_discount_percent} / 100 = {out}.", money=True)
    s.step("answer", "full_price - discount", "Members pay {full_price} - {discount} = {out}.", money=True)
    q = rng.choice([f"What do {cases} cases of the {p.name} cost with the member discount?",
                    f"A member buys {cases} cases of the {p.name}. How much do they pay in dollars?"])
    return _Drawn(q, f"The catalog lists the {p.name} at {_money(p.unit_price)} with {p.case_size} units per case, "
                     f"and members save {p.member_discount}%.",
                  [f"catalog:{p.name}", f"promotions:{p.name}"],
                  ["case_size", "unit_price", "member_discount_percent"], p.name, None)


def _bogo_cost(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice([p for p in w.products if p.buy_n is not None])
    units = s.given("units_bought", rng.randint(p.buy_n + 1, 4 * (p.buy_n + 1)))
    s.given("buy_n", p.buy_n)
    s.given("unit_price", p.unit_price, money=True)
    s.step("group_size", "buy_n + 1", "Every group of {buy_n} + 1 = {out} units has one free.")
    s.step("free_units", "units_bought // group_size",
           "{units_bought} units hold {units_bought} // {group_size} = {out} free ones.")
    s.step("paid_units", "units_bought - free_units", "So {units_bought} - {free_units} = {out} are paid.")
    s.step("answer", "paid_units * unit_price", "They cost {paid_units} * {unit_price} = {out}.", money=True)
    q = rng.choice([f"How much do {units} single {p.plural} cost with the current offer?",
                    f"A customer takes {units} {p.plural}, one at a time, with the promotion. What do they pay?"])
    return _Drawn(q, f"The {p.name} costs {_money(p.unit_price)}, and the offer is buy {p.buy_n}, get 1 free.",
                  [f"catalog:{p.name}", f"promotions:{p.name}"], ["buy_n", "unit_price"], p.name, None)


def _stock_pick(rng: random.Random, w: World) -> tuple[Store, Product]:
    store = rng.choice(w.stores)
    name = rng.choice(list(store.stock))
    return store, next(p for p in w.products if p.name == name)


def _stock_after_sale(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    store, p = _stock_pick(rng, w)
    s.given("units_in_stock", store.stock[p.name])
    sold = s.given("units_sold", rng.randint(1, store.stock[p.name] - 1))
    s.step("answer", "units_in_stock - units_sold", "After the sale {units_in_stock} - {units_sold} = {out} are left.")
    q = rng.choice([f"How many {p.plural} are left in the {store.name} store after selling {sold}?",
                    f"The {store.name} store sells {sold} {p.plural} today. How many does it have left?"])
    return _Drawn(q, f"The {store.name} stock report shows {store.stock[p.name]} units of the {p.name}.",
                  [f"stock:{store.name}"], ["units_in_stock"], p.name, store.name)


def _opened_return(rng: random.Random, w: World, s: _Solution) -> tuple[Store, Product, str, str]:
    """Opened units of a product returned to a store: the givens and what they were bought for (step `paid`);
    (store, product, units returned as shown, the CoT's lookup sentence)."""
    store, p = rng.choice(w.stores), rng.choice(w.products)
    returned = s.given("units_returned", rng.randint(1, 5))
    s.given("unit_price", p.unit_price, money=True)
    s.given("restocking_fee_percent", store.restocking_fee)
    s.step("paid", "units_returned * unit_price", "They were bought for {units_returned} * {unit_price} = {out}.",
           money=True)
    return store, p, returned, (f"The {p.name} costs {_money(p.unit_price)}, and the {store.name} store keeps a "
                                f"{store.restocking_fee}% restocking fee on opened items.")


def _return_refund(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    store, p, returned, lookup = _opened_return(rng, w, s)
    s.step("fee", "paid * restocking_fee_percent / 100",
           "The restocking fee is {paid} * {restocking_fee_percent} / 100 = {out}.", money=True)
    s.step("answer", "paid - fee", "The refund is {paid} - {fee} = {out}.", money=True)
    q = rng.choice([f"A customer returns {returned} opened {p.plural} to the {store.name} store. How much is refunded?",
                    f"How much money does the {store.name} store refund for {returned} opened {p.plural}?"])
    return _Drawn(q, lookup, [f"catalog:{p.name}", f"policies:{store.name}"], ["unit_price", "restocking_fee_percent"],
                  p.name, store.name)


def _stock_value(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    store, p = _stock_pick(rng, w)
    s.given("units_in_stock", store.stock[p.name])
    s.given("unit_price", p.unit_price, money=True)
    s.step("answer", "units_in_stock * unit_price", "They are worth {units_in_stock} * {unit_price} = {out}.",
           money=True)
    q = rng.choice([f"What is the {store.name} store's stock of the {p.name} worth at the unit price?",
                    f"At the catalog price, how much are all the {p.plural} in the {store.name} store worth?"])
    return _Drawn(q, f"The {store.name} stock report shows {store.stock[p.name]} units of the {p.name}, which costs "
                     f"{_money(p.unit_price)}.", [f"stock:{store.name}", f"catalog:{p.name}"],
                  ["units_in_stock", "unit_price"], p.name, store.name)


def _price_match(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    store = rng.choice(w.stores)
    p = rng.choice([p for p in w.products if p.unit_price > 3])
    gap = Fraction(rng.randint(1, max(1, min(10, int(p.unit_price) - 1))))
    competitor = s.given("competitor_price", p.unit_price - gap, money=True)
    s.given("unit_price", p.unit_price, money=True)
    s.given("extra_percent", store.price_match_extra)
    s.step("difference", "unit_price - competitor_price",
           "The difference is {unit_price} - {competitor_price} = {out}.", money=True)
    s.step("extra", "difference * extra_percent / 100",
           "A further {difference} * {extra_percent} / 100 = {out} comes off.", money=True)
    s.step("answer", "competitor_price - extra", "The store charges {competitor_price} - {extra} = {out}.", money=True)
    q = rng.choice([(f"A competitor sells the {p.name} for {competitor}. What does the {store.name} store charge "
                     "for one after its price match?"),
                    (f"With the price match, what does one {p.name} cost at the {store.name} store if a rival "
                     f"shop asks {competitor}?")])
    return _Drawn(q, f"The {p.name} costs {_money(p.unit_price)}, and the {store.name} store takes off a further "
                     f"{store.price_match_extra}% of the difference.", [f"catalog:{p.name}", f"policies:{store.name}"],
                  ["unit_price", "extra_percent"], p.name, store.name)


# The wider kinds (`data.kinds: all`): each reads facts the kinds above read, in new combinations or with a new
# operation, so that a held-out kind is a recombination of trained lookups and steps rather than a first sight of
# multiplying a stock count by a price.

def _units_in_cases(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice(w.products)
    cases = s.given("cases", rng.randint(2, 12))
    s.given("case_size", p.case_size)
    s.step("answer", "cases * case_size", "{cases} cases hold {cases} * {case_size} = {out} units.")
    q = rng.choice([f"How many units are in {cases} cases of the {p.name}?",
                    f"A shop receives {cases} cases of the {p.name}. How many single units is that?"])
    return _Drawn(q, f"The catalog packs the {p.name} {p.case_size} units per case.", [f"catalog:{p.name}"],
                  ["case_size"], p.name)


def _units_cost(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice(w.products)
    units = s.given("units", rng.randint(2, 15))
    s.given("unit_price", p.unit_price, money=True)
    s.step("answer", "units * unit_price", "They cost {units} * {unit_price} = {out}.", money=True)
    q = rng.choice([f"What do {units} single {p.plural} cost at the catalog price?",
                    f"A customer buys {units} {p.plural} without any offer. How much is that in dollars?"])
    return _Drawn(q, f"The catalog lists the {p.name} at {_money(p.unit_price)}.", [f"catalog:{p.name}"],
                  ["unit_price"], p.name)


def _member_unit_price(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice([p for p in w.products if p.member_discount is not None])
    units = rng.randint(1, 6)  # one unit, or a few (a world has ~8 such products: one unit alone runs out of questions)
    s.given("unit_price", p.unit_price, money=True)
    s.given("member_discount_percent", p.member_discount)
    if units > 1:
        s.given("units", units)
    s.step("discount", "unit_price * member_discount_percent / 100",
           "The member discount on one is {unit_price} * {member_discount_percent} / 100 = {out}.", money=True)
    if units == 1:
        s.step("answer", "unit_price - discount", "A member pays {unit_price} - {discount} = {out}.", money=True)
        q = rng.choice([f"What does a member pay for one {p.name}?",
                        f"How much is a single {p.name} with the member discount?"])
    else:
        s.step("member_price", "unit_price - discount", "A member pays {unit_price} - {discount} = {out} for one.",
               money=True)
        s.step("answer", "units * member_price", "{units} of them cost {units} * {member_price} = {out}.",
               money=True)
        q = rng.choice([f"What does a member pay for {units} single {p.plural}?",
                        f"How much are {units} {p.plural}, bought one at a time, with the member discount?"])
    return _Drawn(q, f"The catalog lists the {p.name} at {_money(p.unit_price)}, and members save "
                     f"{p.member_discount}%.", [f"catalog:{p.name}", f"promotions:{p.name}"],
                  ["unit_price", "member_discount_percent"], p.name)


def _bogo_free_units(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice([p for p in w.products if p.buy_n is not None])
    units = s.given("units_bought", rng.randint(p.buy_n + 1, 6 * (p.buy_n + 1)))
    s.given("buy_n", p.buy_n)
    s.step("group_size", "buy_n + 1", "Every group of {buy_n} + 1 = {out} units has one free.")
    s.step("answer", "units_bought // group_size",
           "{units_bought} units hold {units_bought} // {group_size} = {out} free ones.")
    q = rng.choice([f"A customer takes {units} single {p.plural} with the promotion. How many do they get free?",
                    f"How many of {units} {p.plural}, bought one at a time with the current offer, are free?"])
    return _Drawn(q, f"The offer on the {p.name} is buy {p.buy_n}, get 1 free.", [f"promotions:{p.name}"],
                  ["buy_n"], p.name)


def _budget_units(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p = rng.choice(w.products)
    budget = s.given("budget", rng.randint(int(p.unit_price) + 1, 8 * int(p.unit_price) + 8), money=True)
    s.given("unit_price", p.unit_price, money=True)
    s.step("answer", "budget // unit_price", "{budget} buys {budget} // {unit_price} = {out} units.")
    q = rng.choice([f"How many {p.plural} can a customer buy with {budget}?",
                    f"With {budget} to spend, how many single {p.plural} can a shop buy at the catalog price?"])
    return _Drawn(q, f"The catalog lists the {p.name} at {_money(p.unit_price)}.", [f"catalog:{p.name}"],
                  ["unit_price"], p.name)


def _two_product_cost(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p, r = rng.sample(w.products, 2)
    n_first = s.given("units_first", rng.randint(2, 6))
    s.given("price_first", p.unit_price, money=True)
    n_second = s.given("units_second", rng.randint(2, 6))
    s.given("price_second", r.unit_price, money=True)
    s.step("cost_first", "units_first * price_first", "The first costs {units_first} * {price_first} = {out}.",
           money=True)
    s.step("cost_second", "units_second * price_second",
           "The second costs {units_second} * {price_second} = {out}.", money=True)
    s.step("answer", "cost_first + cost_second", "Together {cost_first} + {cost_second} = {out}.", money=True)
    q = rng.choice([f"What do {n_first} {p.plural} and {n_second} {r.plural} cost together?",
                    f"A customer buys {n_first} {p.plural} and {n_second} {r.plural}. What is the total in dollars?"])
    return _Drawn(q, f"The catalog lists the {p.name} at {_money(p.unit_price)} and the {r.name} at "
                     f"{_money(r.unit_price)}.", [f"catalog:{p.name}", f"catalog:{r.name}"],
                  ["price_first", "price_second"], p.name)


def _price_difference(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    p, r = sorted(rng.sample(w.products, 2), key=lambda x: x.unit_price, reverse=True)
    s.given("price_first", p.unit_price, money=True)
    s.given("price_second", r.unit_price, money=True)
    s.step("answer", "price_first - price_second", "The difference is {price_first} - {price_second} = {out}.",
           money=True)  # equal prices give 0, which the recorder redraws
    q = rng.choice([f"How much more does the {p.name} cost than the {r.name}?",
                    f"What is the price difference between one {p.name} and one {r.name}?"])
    return _Drawn(q, f"The catalog lists the {p.name} at {_money(p.unit_price)} and the {r.name} at "
                     f"{_money(r.unit_price)}.", [f"catalog:{p.name}", f"catalog:{r.name}"],
                  ["price_first", "price_second"], p.name)


def _stock_after_delivery(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    store, p = _stock_pick(rng, w)
    s.given("units_in_stock", store.stock[p.name])
    cases = s.given("cases_delivered", rng.randint(1, 5))
    s.given("case_size", p.case_size)
    s.step("units_delivered", "cases_delivered * case_size",
           "{cases_delivered} cases hold {cases_delivered} * {case_size} = {out} units.")
    s.step("answer", "units_in_stock + units_delivered",
           "The store then has {units_in_stock} + {units_delivered} = {out}.")
    q = rng.choice([f"The {store.name} store receives {cases} cases of the {p.name}. How many units does it have then?",
                    f"After a delivery of {cases} cases, how many {p.plural} does the {store.name} store have?"])
    return _Drawn(q, f"The {store.name} stock report shows {store.stock[p.name]} units of the {p.name}, packed "
                     f"{p.case_size} per case.", [f"stock:{store.name}", f"catalog:{p.name}"],
                  ["units_in_stock", "case_size"], p.name, store.name)


def _two_stores_stock(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    first, second = rng.sample(w.stores, 2)
    shared = [name for name in first.stock if name in second.stock]
    if not shared:
        raise _Redraw(f"no product in both the {first.name} and {second.name} stores")
    name = rng.choice(shared)
    p = next(p for p in w.products if p.name == name)
    s.given("units_first_store", first.stock[p.name])
    s.given("units_second_store", second.stock[p.name])
    s.step("answer", "units_first_store + units_second_store",
           "Together they have {units_first_store} + {units_second_store} = {out}.")
    q = rng.choice([f"How many {p.plural} do the {first.name} and {second.name} stores have together?",
                    (f"Counting the {first.name} and {second.name} stores, how many units of the {p.name} are in "
                    "stock?")])
    return _Drawn(q, f"The {first.name} stock report shows {first.stock[p.name]} units of the {p.name} and the "
                     f"{second.name} report {second.stock[p.name]}.", [f"stock:{first.name}", f"stock:{second.name}"],
                  ["units_first_store", "units_second_store"], p.name, first.name)


def _stock_shortfall(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    store, p = _stock_pick(rng, w)
    wanted = s.given("units_wanted", store.stock[p.name] + rng.randint(1, 40))
    s.given("units_in_stock", store.stock[p.name])
    s.step("answer", "units_wanted - units_in_stock",
           "{units_wanted} - {units_in_stock} = {out} more must be ordered.")
    q = rng.choice([(f"A customer wants {wanted} {p.plural} from the {store.name} store. How many more than it has "
                    "in stock must be ordered?"),
                    f"How many {p.plural} is the {store.name} store short of an order for {wanted}?"])
    return _Drawn(q, f"The {store.name} stock report shows {store.stock[p.name]} units of the {p.name}.",
                  [f"stock:{store.name}"], ["units_in_stock"], p.name, store.name)


def _restocking_fee(rng: random.Random, w: World, s: _Solution) -> _Drawn:
    store, p, returned, lookup = _opened_return(rng, w, s)
    s.step("answer", "paid * restocking_fee_percent / 100",
           "The restocking fee is {paid} * {restocking_fee_percent} / 100 = {out}.", money=True)
    q = rng.choice([(f"What restocking fee does the {store.name} store keep when {returned} opened {p.plural} come "
                    "back?"),
                    (f"How much does the {store.name} store keep as a fee on a return of {returned} opened "
                    f"{p.plural}?")])
    return _Drawn(q, lookup, [f"catalog:{p.name}", f"policies:{store.name}"], ["unit_price", "restocking_fee_percent"],
                  p.name, store.name)


KIND_SPECS: dict[str, Kind] = {
    "case_cost": _case_cost, "member_case_cost": _member_case_cost, "bogo_cost": _bogo_cost,
    "stock_after_sale": _stock_after_sale, "return_refund": _return_refund,
    # held out by default: recombine lookups the training kinds make apart (stock + price), or a new policy
    "stock_value": _stock_value, "price_match": _price_match,
    # the wider kinds (data.kinds: all)
    "units_in_cases": _units_in_cases, "units_cost": _units_cost, "member_unit_price": _member_unit_price,
    "bogo_free_units": _bogo_free_units, "budget_units": _budget_units, "two_product_cost": _two_product_cost,
    "price_difference": _price_difference, "stock_after_delivery": _stock_after_delivery,
    "two_stores_stock": _two_stores_stock, "stock_shortfall": _stock_shortfall, "restocking_fee": _restocking_fee,
}
KINDS: list[str] = list(KIND_SPECS)
# The kinds of sessions 6-7 (every figure in docs/benchmarks.md before session 12): the default, so they reproduce.
CLASSIC_KINDS: list[str] = KINDS[:7]
DEFAULT_HELDOUT_KINDS: list[str] = ["stock_value", "price_match"]
_MAX_DRAWS = 200


def _draw_new(rng: random.Random, world: World, kind: str, seen: set[str]) -> tuple[_Drawn | None, _Solution]:
    """A question of `kind` not in `seen` (None after _MAX_DRAWS tries: the kind has run out)."""
    for _ in range(_MAX_DRAWS):
        s = _Solution({})
        try:
            drawn = KIND_SPECS[kind](rng, world, s)
        except _Redraw:
            continue
        if drawn.question not in seen:
            return drawn, s
    return None, _Solution({})


def _generate(n: int, world: World, kinds: list[str], split: str, seed: int) -> list[Example]:
    """`n` distinct questions of `kinds` (taking turns) about `world`."""
    rng = random.Random(f"retail-docs:{seed}:{split}:questions")
    examples: list[Example] = []
    seen: set[str] = set()
    spent: set[str] = set()  # kinds that ran out of new questions: they give their turns to the next kinds
    turn = 0
    for i in range(n):
        drawn = None
        while drawn is None:
            live = [k for k in kinds if k not in spent]
            if not live:
                raise RuntimeError(f"retail_docs kinds {kinds} hold fewer than {n} distinct questions for the {split} "
                                   f"split; ask for fewer examples")
            kind = kinds[turn % len(kinds)]
            turn += 1
            if kind in spent:
                continue
            drawn, s = _draw_new(rng, world, kind, seen)
            if drawn is None:
                spent.add(kind)
        seen.add(drawn.question)
        sources = [world.documents[key] for key in drawn.docs]
        examples.append(Example(
            id=f"retail-docs-{seed}-{split}-{i}", question=drawn.question, answer=s.answer(),
            rationale=f"{drawn.lookup} {s.rationale()}", program=s.program(), domain="retail", context=sources,
            metadata={"template": kind, "kind": kind, "world": world.name, "source": "retail_docs",
                      "product": drawn.product, "store": drawn.store,
                      "lookups": {name: s.show(name) for name in drawn.looked_up}, "steps": len(s.steps)}))
    return examples


def _check_kinds(kinds: list[str], what: str) -> list[str]:
    unknown = [k for k in kinds if k not in KIND_SPECS]
    if unknown or not kinds:
        raise ValueError(f"data.{what}: unknown or empty retail_docs kinds {unknown or kinds}; choose from {KINDS}")
    return kinds


def _chosen_kinds(kinds: list[str] | str | None) -> list[str]:
    if kinds is None:
        return CLASSIC_KINDS
    if kinds == "all":
        return KINDS
    if isinstance(kinds, str):
        # a config value: the CLI shows a ValueError as one line
        raise ValueError(  # noqa: TRY004
            f"data.kinds: '{kinds}' is not a list of retail_docs kinds; use all, or a list from {KINDS}")
    return _check_kinds(list(kinds), "kinds")


def retail_docs_splits(n_train: int, n_test: int, seed: int = 0, heldout_kinds: list[str] | None = None,
                       n_test_heldout: int | None = None,
                       kinds: list[str] | str | None = None) -> dict[str, list[Example]]:
    """train / test / test_heldout_kinds (see the module docstring); `n_test_heldout` defaults to `n_test`. `kinds`
    are the kinds drawn at all (None: the 7 CLASSIC_KINDS; "all": every kind); training takes those not held out."""
    chosen = _chosen_kinds(kinds)
    heldout = _check_kinds(DEFAULT_HELDOUT_KINDS if heldout_kinds is None else list(heldout_kinds), "heldout_kinds")
    trained = [k for k in chosen if k not in heldout]
    if not trained:
        raise ValueError("data.heldout_kinds holds every retail_docs kind; leave at least one for training")
    train_world, test_world = make_world("train", seed), make_world("test", seed)
    return {"train": _generate(n_train, train_world, trained, "train", seed),
            "test": _generate(n_test, test_world, trained, "test", seed),
            "test_heldout_kinds": _generate(n_test if n_test_heldout is None else n_test_heldout, test_world,
                                            heldout, "heldout", seed)}
