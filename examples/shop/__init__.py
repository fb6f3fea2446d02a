"""The reference shop, built only on cqrskit's public API, and cqrskit's default app
(``CQRSKIT_APP=cqrskit.examples.shop:app``): customers, products, orders; the read models
``orders``, ``products`` and ``customers`` with their declared queries; revenue, status over time
and best sellers through the escape hatch; the demo's load.
"""

from __future__ import annotations

from cqrskit.app.api import App
from cqrskit.examples.shop.domain import registry
from cqrskit.examples.shop.load import ShopLoad
from cqrskit.examples.shop.payments import payment_deadline
from cqrskit.examples.shop.queries import FUNCTIONS
from cqrskit.examples.shop.read_models import SHOP_READ_MODELS
from cqrskit.examples.shop.showcase import showcase


def demo_load(size: int, seed: int) -> ShopLoad:
    return ShopLoad(size=size, seed=seed)


app = App("shop", registry, read_models=SHOP_READ_MODELS, queries=FUNCTIONS, demo=demo_load,
          showcase=showcase, description="A small shop: customers, products, orders.",
          process_managers=(payment_deadline,))

