"""A realistic load for the reference shop, in phases (a later phase refers to what an earlier
one created, so each phase is drained before the next is sent). Drives the demo, the
benchmarks and the end-to-end tests; deterministic for a given seed.

Some commands are wrong on purpose and their expected fate is counted in ``ShopLoad.expected``:
``rejected`` (duplicate email, overselling, shipping an unpaid order, unknown customer) and
``invalid`` (unknown type, negative quantity, an extra field).
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from dataclasses import dataclass, field

from cqrskit.app.api import CommandEnvelope, new_command

FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tony", "Margaret", "Leslie"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman", "Hoare", "Hamilton", "Lamport"]
GOODS = [
    ("Espresso beans", "Dark roast arabica, 1 kg bag, notes of cocoa"),
    ("Ceramic mug", "Hand-glazed stoneware mug, 350 ml"),
    ("Pour-over kettle", "Gooseneck kettle with thermometer, 1 litre"),
    ("Burr grinder", "Conical steel burrs, 40 grind settings"),
    ("Paper filters", "Unbleached cone filters, pack of 100"),
    ("Milk frother", "Handheld whisk frother, battery powered"),
    ("Tea sampler", "Twelve loose leaf green and black teas"),
    ("Travel tumbler", "Vacuum insulated tumbler keeps coffee hot"),
]


@dataclass
class ShopLoad:
    size: int = 1000
    seed: int = 7
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    expected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.customers = [f"{self.tag}-c{i}" for i in range(max(3, self.size // 10))]
        self.products = [f"{self.tag}-p{i}" for i in range(max(3, min(200, self.size // 40)))]
        self.orders = [f"{self.tag}-o{i}" for i in range(max(3, self.size // 2))]

    def _cmd(self, type: str, aggregate_id: str, payload: dict) -> CommandEnvelope:
        return new_command(type, aggregate_id, payload, issuer="shopload", correlation_id=f"{self.tag}-flow")

    def sku(self, product_id: str) -> str:
        return f"SKU-{product_id.upper()}"

    def catalogue(self) -> list[CommandEnvelope]:
        """Phase 1: customers and products (plus a duplicate email, rejected)."""
        out = []
        for i, cid in enumerate(self.customers):
            name = f"{FIRST[i % len(FIRST)]} {LAST[(i * 7) % len(LAST)]}"
            out.append(self._cmd("RegisterCustomer", cid, {"name": name, "email": f"{cid}@example.com"}))
        for i, pid in enumerate(self.products):
            name, description = GOODS[i % len(GOODS)]
            payload = {"sku": self.sku(pid), "name": f"{name} {i}", "description": description,
                       "price_cents": self.rng.randint(300, 9000), "stock": self.rng.randint(200, 2000)}
            out.append(self._cmd("AddProduct", pid, payload))
        out.append(self._cmd("RegisterCustomer", f"{self.tag}-dup",
                             {"name": "Copy Cat", "email": f"{self.customers[0]}@example.com"}))
        self.expected["rejected"] += 1
        return out

    def ordering(self) -> list[CommandEnvelope]:
        """Phase 2: orders, renames, and some wrong on purpose."""
        out = []
        for oid in self.orders:
            picks = self.rng.sample(self.products, k=min(len(self.products), self.rng.randint(1, 3)))
            lines = [{"sku": self.sku(p), "quantity": self.rng.randint(1, 3)} for p in picks]
            out.append(self._cmd("PlaceOrder", oid, {"customer_id": self.rng.choice(self.customers), "lines": lines}))
        for cid in self.rng.sample(self.customers, k=max(1, len(self.customers) // 10)):
            out.append(self._cmd("RenameCustomer", cid, {"name": f"{self.rng.choice(FIRST)} Renamed"}))
        out += self._wrong_orders()
        return out

    def _wrong_orders(self) -> list[CommandEnvelope]:
        oversell = {"customer_id": self.customers[0], "lines": [{"sku": self.sku(self.products[0]), "quantity": 9999}]}
        nobody = {"customer_id": f"{self.tag}-nobody", "lines": [{"sku": self.sku(self.products[0]), "quantity": 1}]}
        negative = {"customer_id": self.customers[0], "lines": [{"sku": self.sku(self.products[0]), "quantity": -1}]}
        self.expected["rejected"] += 2
        self.expected["invalid"] += 3
        return [
            self._cmd("PlaceOrder", f"{self.tag}-oversell", oversell),
            self._cmd("PlaceOrder", f"{self.tag}-nobody", nobody),
            self._cmd("PlaceOrder", f"{self.tag}-negative", negative),
            self._cmd("RefundOrder", self.orders[0], {}),
            self._cmd("RenameCustomer", self.customers[0], {"name": "X", "nickname": "extra field"}),
        ]

    def fulfilment(self) -> list[CommandEnvelope]:
        """Phase 3: most orders paid, many shipped, some cancelled; shipping unpaid is rejected."""
        pay, ship, cancel = [], [], []
        for oid in self.orders:
            roll = self.rng.random()
            if roll < 0.75:
                pay.append(self._cmd("PayOrder", oid, {}))
                if roll < 0.45:
                    ship.append(oid)
            elif roll < 0.9:
                cancel.append(self._cmd("CancelOrder", oid, {"reason": "changed my mind"}))
        unpaid = [o for o in self.orders if o not in {c.aggregate_id for c in pay}][:2]
        self.expected["rejected"] += len(unpaid)
        wrong = [self._cmd("ShipOrder", oid, {}) for oid in unpaid]
        return pay + cancel + wrong, [self._cmd("ShipOrder", oid, {}) for oid in ship]  # type: ignore[return-value]

    def phases(self) -> list[tuple[str, list[CommandEnvelope]]]:
        """Named phases in the order they must be sent (drain each before the next)."""
        pay_cancel, ship = self.fulfilment()
        return [("catalogue", self.catalogue()), ("orders", self.ordering()),
                ("payments", pay_cancel), ("shipping", ship)]
