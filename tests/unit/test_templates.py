"""Date-templated folder layouts and URL patterns (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from asyncsat.catalogs.base import Query, parse_bbox, parse_time
from asyncsat.catalogs.templates import check_template, expand, matches, split_pattern
from asyncsat.errors import UsageError
from asyncsat.intake import is_pattern


def _t(text: str) -> datetime:
    time = parse_time(text, "start")
    assert time is not None
    return time


def test_a_template_gives_one_pattern_per_distinct_folder_and_name() -> None:
    layout = "sst/{date:%Y}/{date:%m}/sst_{date:%Y%m%d}_*.nc"
    assert expand(layout, _t("2024-02-28"), _t("2024-03-01T23:00Z")) == [
        "sst/2024/02/sst_20240228_*.nc", "sst/2024/02/sst_20240229_*.nc",
        "sst/2024/03/sst_20240301_*.nc"]
    monthly = expand("chl/{date:%Y%m}/*.nc", _t("2024-01-30"), _t("2024-02-02"))
    assert monthly == ["chl/202401/*.nc", "chl/202402/*.nc"]
    assert expand("static/*.nc", _t("2024-01-01"), _t("2024-12-31")) == ["static/*.nc"]
    # day of year, and a range given with an offset is taken in UTC days
    assert expand("{date:%Y/%j}/*", _t("2024-01-01T23:30-02:00"), _t("2024-01-02")) == \
        ["2024/002/*"]


def test_templates_refuse_unknown_fields_and_wildcard_folders() -> None:
    for bad in ("{day}/x.nc", "{date:%Y}/{0}.nc", "a/{date"):
        with pytest.raises(UsageError):
            check_template(bad)
    with pytest.raises(UsageError, match="file name only"):
        split_pattern("/data/*/x.nc")
    assert split_pattern("/data/2024/*.nc") == ("/data/2024/", "*.nc")


def test_matching_is_shell_style_and_case_sensitive() -> None:
    assert matches("sst_20240301_v2.nc", "sst_20240301_*.nc")
    assert not matches("SST_20240301_v2.nc", "sst_*.nc")
    assert matches("a1.nc", "a[0-9].nc") and not matches("ab.nc", "a[0-9].nc")


def test_only_ftp_urls_with_wildcards_are_patterns() -> None:
    assert is_pattern("ftp://h/data/2024/03/*.nc")
    assert not is_pattern("https://h/data/*.nc")  # HTTP has no listing: literal
    assert not is_pattern("ftp://h/data/2024/03/a.nc")


def test_search_criteria_are_validated_like_any_input() -> None:
    q = Query.from_json({"collection": "sst", "start": "2024-03-01", "end": "2024-03-02",
                         "limit": 3})
    assert q.start == datetime(2024, 3, 1, tzinfo=UTC) and q.limit == 3
    assert Query.from_json(q.to_json()) == q
    for bad in ({}, {"collection": ""}, {"collection": "x", "start": "yesterday"},
                {"collection": "x", "start": "2024-03-02", "end": "2024-03-01"},
                {"collection": "x", "limit": 0}, {"collection": "x", "filters": [1]}):
        with pytest.raises(UsageError):
            Query.from_json(bad)
    assert parse_bbox("-10,40,5.5,52") == (-10, 40, 5.5, 52)
    for bad_box in ("1,2,3", "a,b,c,d", "0,50,10,40"):
        with pytest.raises(UsageError):
            parse_bbox(bad_box)


def test_a_search_that_is_not_a_json_object_is_refused() -> None:
    for bad in ("SENTINEL-2", ["sst"], 3):
        with pytest.raises(UsageError, match="JSON object"):
            Query.from_json(bad)  # type: ignore[arg-type]
