"""Metadata filters: domain/URL blocklists, dates and required fields on planted metadata."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.config import DataConfigError, MetadataFilterConfig, mixture_from_dict
from data_pipeline.filters import MetadataFilter, split_url
from data_pipeline.multilingual_corpus import make_corpus


def test_blocklist_domains_subdomains_and_lookalikes(tmp_path):
    rng = np.random.default_rng(21)
    blocked = [f"spam{i}.example" for i in rng.integers(0, 10_000, size=5)]
    (tmp_path / "block.txt").write_text("# ads\n" + "\n".join(blocked[2:]) + "  # farm\n\nexample.org/ads/\n")
    f = MetadataFilter(
        MetadataFilterConfig(
            blocklist=blocked[:2] + ["*.Bücher.Example"], blocklist_files=[str(tmp_path / "block.txt")]
        )
    )
    assert f.active
    for d in blocked:
        for url in (f"https://{d}/a", f"http://www.{d}:8080/x?y=1", f"HTTPS://A.B.{d.upper()}/", f"{d}/page"):
            assert f.reason({"url": url}) == "blocked_domain", url
        # look-alikes are not blocked: a longer label, the domain as a subdomain of another one
        for url in (f"https://not{d}/", f"https://{d}.net/", f"https://{d.replace('.', '-')}.com/"):
            assert f.reason({"url": url}) == "", url
    assert f.reason({"url": "https://shop.xn--bcher-kva.example/"}) == "blocked_domain"
    assert f.reason({"url": "https://example.org/ads/banner.html"}) == "blocked_url"
    assert f.reason({"url": "https://example.org/news/ads/"}) == ""
    assert f.reason({"url": ""}) == "" and f.reason({}) == ""
    # a domain field wins over the URL's host
    g = MetadataFilter(MetadataFilterConfig(blocklist=blocked[:1], domain_field="domain"))
    assert g.reason({"url": "https://fine.example/", "domain": blocked[0]}) == "blocked_domain"


def test_dates_and_required_fields():
    f = MetadataFilter(MetadataFilterConfig(min_date="2018-01-01", max_date="2024-01-01", required_fields=["url"]))
    assert f.reason({"url": "https://a.example/", "date": "2017-12-31T23:59:00Z"}) == "date"
    assert f.reason({"url": "https://a.example/", "date": "2024-01-01"}) == "date"
    assert f.reason({"url": "https://a.example/", "date": "2019-06-30"}) == ""
    assert f.reason({"url": "https://a.example/", "date": "unknown"}) == ""  # unparseable: not judged
    assert f.reason({"date": "2019-06-30"}) == "missing_metadata"
    with pytest.raises(DataConfigError, match="min_date"):
        MetadataFilter(MetadataFilterConfig(min_date="last year"))
    with pytest.raises(DataConfigError, match="names no domain"):
        MetadataFilter(MetadataFilterConfig(blocklist=["/only/a/path"]))
    assert not MetadataFilter(MetadataFilterConfig()).active


def test_planted_domains_in_the_multilingual_corpus():
    corpus = make_corpus(30, languages=("en", "zh", "ar"), seed=4)
    f = MetadataFilter(MetadataFilterConfig(blocklist=["forum.example.cn", "example.eg"]))
    for d in corpus.documents:
        host, _ = split_url(d.url)
        expected = "blocked_domain" if host == "forum.example.cn" or host.endswith("example.eg") else ""
        assert f.reason({"url": d.url, "date": d.date}) == expected
    assert any(f.reason({"url": d.url}) for d in corpus.documents)


def test_config_sections_and_source_fields():
    cfg = mixture_from_dict(
        {
            "sources": [
                {"name": "web", "languages": ["zh", "en"], "input": {"path": "x", "metadata_fields": ["url", "date"]}}
            ],
            "filters": {"blocklist": ["spam.example"], "min_date": "2020-01-01"},
        }
    )
    assert cfg.sources[0].languages == ["zh", "en"] and cfg.sources[0].input.metadata_fields == ["url", "date"]
    assert cfg.filters.blocklist == ["spam.example"]
    with pytest.raises(DataConfigError, match="did you mean 'blocklist'"):
        mixture_from_dict({"sources": [{"name": "a", "input": {"path": "x"}}], "filters": {"blocklst": []}})
    with pytest.raises(DataConfigError, match="languages"):
        mixture_from_dict({"sources": [{"name": "a", "languages": ["Chinese"], "input": {"path": "x"}}]})
    with pytest.raises(DataConfigError, match="langid"):
        mixture_from_dict(
            {"sources": [{"name": "a", "languages": ["zh"], "input": {"path": "x"}}], "clean": {"langid": False}}
        )
