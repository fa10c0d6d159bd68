from models.business_rules import BusinessRules, ItemFacts, OnlineFacts, RequestFilters
from shelfwise.runtime.online_state import StockChange

ITEMS = {
    "shoe": ItemFacts("shoes", 80.0, True, False),
    "sock": ItemFacts("socks", 5.0, True, True),
    "boot": ItemFacts("shoes", 120.0, False, False),
    "sandal": ItemFacts("shoes", 30.0, True, False),
    "hat": ItemFacts("hats", 20.0, True, False),
}
RANKED = [(item_id, rank) for rank, item_id in enumerate(["shoe", "sock", "boot", "sandal", "hat"])]


def chosen(rules, filters=None, k=10, user="u1", already=()):
    filters = filters or RequestFilters()
    return [item for item, _ in rules.select(user, RANKED, filters, k, already)]


def test_bought_items_disappear_unless_their_category_is_repeatable():
    rules = BusinessRules(ITEMS, {"u1": {"shoe", "sock"}})
    assert chosen(rules) == ["sock", "sandal", "hat"]
    assert rules.violated("u1", "shoe", RequestFilters()) == ["already_bought"]
    assert chosen(rules, user="u2") == ["shoe", "sock", "sandal", "hat"]


def test_out_of_stock_items_are_hidden_unless_the_request_allows_them():
    rules = BusinessRules(ITEMS)
    assert "boot" not in chosen(rules)
    assert "boot" in chosen(rules, RequestFilters(in_stock_only=False))


def test_request_filters_hold():
    rules = BusinessRules(ITEMS)
    assert chosen(rules, RequestFilters(category_ids=frozenset({"shoes"}))) == ["shoe", "sandal"]
    assert chosen(rules, RequestFilters(price_max=25.0)) == ["sock", "hat"]
    assert chosen(rules, RequestFilters(exclude_item_ids=frozenset({"shoe"}))) == [
        "sock",
        "sandal",
        "hat",
    ]


def test_the_category_cap_keeps_lists_diverse_and_counts_earlier_items():
    rules = BusinessRules(ITEMS, max_per_category=1)
    assert chosen(rules, RequestFilters(in_stock_only=False)) == ["shoe", "sock", "hat"]
    assert chosen(rules, already=["sandal"]) == ["sock", "hat"]
    assert chosen(rules, k=2) == ["shoe", "sock"]


def test_items_without_facts_pass_the_attribute_rules():
    rules = BusinessRules()
    assert chosen(rules, RequestFilters(price_max=1.0)) == ["shoe", "sock", "boot", "sandal", "hat"]
    assert chosen(rules, RequestFilters(category_ids=frozenset({"shoes"}))) == []


def test_an_online_stock_update_applies_only_when_newer_than_the_catalogs_stock():
    catalog_at = 1_000_000
    items = {
        "shoe": ItemFacts("shoes", 80.0, True, False, stock_updated_at_us=catalog_at),
        "boot": ItemFacts("shoes", 120.0, False, False),  # no stock time: any update is newer
    }
    rules = BusinessRules(items)
    sold_out_later = {"shoe": StockChange(False, catalog_at + 1)}
    assert rules.facts("shoe", OnlineFacts(stock=sold_out_later)).is_in_stock is False
    # Sold out before a catalog delivery that restocked it: the catalog is the newer word.
    sold_out_before = {"shoe": StockChange(False, catalog_at - 1), "boot": StockChange(True, 0)}
    assert rules.facts("shoe", OnlineFacts(stock=sold_out_before)).is_in_stock is True
    assert rules.facts("boot", OnlineFacts(stock=sold_out_before)).is_in_stock is True
    # An item the snapshot does not know is judged by the update alone.
    unknown = OnlineFacts(stock={"new": StockChange(False, 0)})
    assert rules.facts("new", unknown).is_in_stock is False
