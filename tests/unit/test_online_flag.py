"""An OData product's `Online` flag: JSON's `false` and the string "false" some hubs send
both mean the long-term archive (the product is ordered, not fetched as an error page)."""

from __future__ import annotations

from typing import Any

import pytest

from asyncsat.catalogs.base import offline
from asyncsat.catalogs.odata import ODataCatalog
from asyncsat.models import Provider


@pytest.mark.parametrize(("flag", "expected"), [
    (False, True), ("false", True), ("False", True), (" FALSE ", True),
    (True, False), ("true", False), (None, False), ("", False), (0, False),
])
def test_offline_flags(flag: Any, expected: bool) -> None:
    assert offline(flag) is expected


def test_an_odata_product_flagged_offline_as_a_string_is_offline() -> None:
    catalog = ODataCatalog(None, Provider(1, "cdse", "odata",  # type: ignore[arg-type]
                                          "http://127.0.0.1:9/odata/v1/", {}))
    item = {"Id": "a1", "Name": "S2A_X.SAFE", "ContentLength": 10}
    assert catalog._product({**item, "Online": "false"}).online is False
    assert catalog._product({**item, "Online": False}).online is False
    assert catalog._product({**item, "Online": "true"}).online is True
    assert catalog._product(item).online is True
