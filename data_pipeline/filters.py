"""Metadata filters: rules on the per-document metadata carried from the input (url, date, ...).

``MetadataFilter(cfg).reason(meta)`` returns the first rule a document's metadata dict fails, or "":

- ``missing_metadata``: a ``required_fields`` entry is absent or empty
- ``blocked_domain``: the domain (``domain_field``, else the host of ``url_field``) is a blocklisted domain
  or a subdomain of one: host h = l_1.l_2...l_k is blocked when some suffix l_i...l_k is in the list
- ``blocked_url``: the URL is under a blocklisted URL prefix (``host/path-prefix``; same host, path starts
  with the prefix)
- ``date``: the date (first 10 characters of an ISO date, ``YYYY-MM-DD``) is outside [min_date, max_date)

Hosts are compared lower-cased, without port, credentials, trailing dot or scheme; internationalised
names in their IDNA (punycode) form, so ``bücher.example`` and ``xn--bcher-kva.example`` are one host.
A document without a URL passes the URL rules (list ``url`` in ``required_fields`` to drop those).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from data_pipeline import storage
from data_pipeline.config import DataConfigError, MetadataFilterConfig

log = logging.getLogger(__name__)


def _idna(host: str) -> str:
    host = host.strip().strip(".").lower()
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def split_url(url: str) -> tuple[str, str]:
    """``(host, path[?query])`` of a URL, or of ``host/path`` without a scheme."""
    url = url.strip()
    parts = urlsplit(url if "://" in url else "//" + url)
    try:
        host = parts.hostname or ""
    except ValueError:
        host = ""
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _idna(host), path


def read_blocklist(url: str) -> list[str]:
    """Entries of one blocklist file: one per line, '#' starts a comment."""
    with storage.open_file(url, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


class MetadataFilter:
    """Built once per worker (reads the blocklist files); ``reason(meta)`` per document."""

    def __init__(self, cfg: MetadataFilterConfig):
        self.cfg = cfg
        entries = list(cfg.blocklist)
        for url in cfg.blocklist_files:
            entries += read_blocklist(url)
        self.domains: set[str] = set()
        self.prefixes: dict[str, list[str]] = {}
        for entry in entries:
            self._add(entry)
        for key in ("min_date", "max_date"):
            value = getattr(cfg, key)
            if value and not _is_date(value):
                raise DataConfigError(f"filters.{key}: '{value}' is not an ISO date (YYYY-MM-DD)")
        log.info(
            "metadata filters: %d blocked domains, %d URL prefixes",
            len(self.domains),
            sum(len(v) for v in self.prefixes.values()),
        )

    def _add(self, entry: str) -> None:
        raw = entry.strip()
        if raw.startswith("*."):
            raw = raw[2:]
        host, path = split_url(raw)
        if not host:
            raise DataConfigError(
                f"filters.blocklist: '{entry}' names no domain; write example.com or example.com/path/"
            )
        has_path = "/" in raw.split("://", 1)[-1].rstrip("/")
        if has_path:
            self.prefixes.setdefault(host, []).append(path)
        else:
            self.domains.add(host)

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(self.domains or self.prefixes or c.min_date or c.max_date or c.required_fields)

    def blocked(self, host: str) -> bool:
        """Whether ``host`` or any of its parent domains is blocklisted."""
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))

    def reason(self, meta: Mapping[str, Any]) -> str:
        """First failing rule for this document's metadata, or ""."""
        c = self.cfg
        for name in c.required_fields:
            if meta.get(name) in (None, ""):
                return "missing_metadata"
        url = str(meta.get(c.url_field) or "")
        host, path = split_url(url) if url else ("", "")
        domain = _idna(str(meta.get(c.domain_field) or "")) if c.domain_field else host
        if domain and self.domains and self.blocked(domain):
            return "blocked_domain"
        if host and host in self.prefixes and any(path.startswith(p) for p in self.prefixes[host]):
            return "blocked_url"
        if c.min_date or c.max_date:
            date = str(meta.get(c.date_field) or "")[:10]
            if _is_date(date) and ((c.min_date and date < c.min_date[:10]) or (c.max_date and date >= c.max_date[:10])):
                return "date"
        return ""

    def reasons(self, metas: Iterable[Mapping[str, Any]]) -> list[str]:
        return [self.reason(m) for m in metas]


def _is_date(s: str) -> bool:
    s = s[:10]
    return (
        len(s) >= 4
        and s[:4].isdigit()
        and all(p.isdigit() for p in s.split("-"))
        and all(len(p) == 2 for p in s.split("-")[1:])
    )
