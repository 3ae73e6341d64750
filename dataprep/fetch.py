"""Getting one sample's bytes: over HTTP (timeout, retries, size cap) or from a local path.

Unless the corpus allows private addresses, a URL (and every redirect) must name a public http(s)
address (dataprep/urls.py): it is checked right before connecting.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

from .urls import url_problem

USER_AGENT = "scl-pretrain-dataprep/0.1 (research data preparation)"


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL dataprep may fetch (a public address can redirect inwards)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        problem = url_problem(newurl)
        if problem:
            raise urllib.error.URLError(f"refused: {problem} (redirect to {newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_PUBLIC_ONLY = urllib.request.build_opener(_CheckedRedirects)


def _http_get(url: str, timeout: float, max_bytes: int, allow_private: bool = False) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    opener = urllib.request.urlopen if allow_private else _PUBLIC_ONLY.open
    with opener(request, timeout=timeout) as response:
        data = response.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"file too large (over {max_bytes} bytes)")
        expected = response.headers.get("Content-Length")
        # read(n) returns short data, without an error, when the server closes early.
        if expected is not None and expected.isdigit() and int(expected) != len(data):
            raise ValueError(f"truncated download: {len(data)} of {expected} bytes")
        return data


def fetch(row: dict, timeout: float = 10, retries: int = 2, max_bytes: int = 512 << 20,
          allow_private: bool = False) -> tuple[bytes | None, str | None]:
    """Return (data, None) or (None, error message); never raises."""
    url = row.get("url")
    problem = url_problem(url) if url and not allow_private else None
    if problem:
        return None, f"refused: {problem} ({url})"
    if not url:
        path = Path(str(row.get("path", "")))
        try:
            if path.stat().st_size > max_bytes:
                return None, f"file too large (over {max_bytes} bytes)"
            return path.read_bytes(), None
        except OSError as err:
            return None, f"{type(err).__name__}: {err}"
    error = None
    for attempt in range(retries + 1):
        try:
            return _http_get(url, timeout, max_bytes, allow_private), None
        except urllib.error.HTTPError as err:
            error = str(err)
            if 400 <= err.code < 500 and err.code not in (408, 429):
                break  # the resource is not there; asking again will not change it
        except Exception as err:  # noqa: BLE001 - any failure of one URL is that sample's failure
            error = str(err) or type(err).__name__
            if "too large" in error or "refused: " in error:
                break
        if attempt < retries:
            time.sleep(0.2 * (attempt + 1))
    return None, error
