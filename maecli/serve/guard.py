"""Who may ask. The page has no login, so a request a browser sends on behalf of another web site (an <img> tag, a
form, a script's fetch) must not reach the API: it is told apart by the headers browsers set and pages cannot.

- Sec-Fetch-Site: a browser says where a request comes from; only the page itself ("same-origin") and the user
  ("none": a typed address or a bookmark) may use the API. Another port of the same host is "same-site": refused.
- Origin: sent with every POST and cross-origin fetch; it must name this server (the Host the request was sent to).
- Uploads need the header X-Maecli: 1 and a body type a form cannot send: a page elsewhere can only set either
  after a CORS preflight, which this server never answers.
- Host: bound to a loopback address, the server answers only to this machine's names and the --host given, so a
  site elsewhere cannot reach it through DNS rebinding (its name would be the Host).
"""

from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SAFE_FETCH_SITES = ("same-origin", "none")
UPLOAD_HEADER = "x-maecli"
UPLOAD_TYPES = ("application/octet-stream", "image/")  # a form can send only text/plain, multipart, urlencoded


def cross_site(headers) -> str | None:
    """Why a request looks sent by another site, or None. `headers` is a case-insensitive mapping."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.lower() not in SAFE_FETCH_SITES:
        return f"refused: a request from another web site (Sec-Fetch-Site: {site}); open the page itself"
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
        return f"refused: a request from another web site (Origin: {origin}); open the page itself"
    return None


def upload_refusal(headers) -> tuple[int, str] | None:
    """(status, why) when an upload does not come from the page's script, else None."""
    if headers.get(UPLOAD_HEADER) != "1":
        return 403, "refused: uploads come from the page's script, with the header X-Maecli: 1"
    kind = headers.get("content-type")
    if kind is not None and not kind.lower().startswith(UPLOAD_TYPES):
        return 415, f"send the image file itself as the body, as application/octet-stream (not {kind})"
    return None


def host_name(header: str) -> str:
    """The name in a Host header (or a --host), without a port, lower-case, an IPv6 address without its brackets:
    "[::1]:8000" -> "::1", "LocalHost:8000" -> "localhost", "::1" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def wrong_host(headers, allowed: tuple[str, ...] | None) -> str | None:
    """Why a request's Host is not one this server answers to, or None (always None when `allowed` is None)."""
    if allowed is None:
        return None
    name = host_name(headers.get("host", ""))
    if name in {host_name(a) for a in allowed}:
        return None
    return f"refused: this server answers only at {', '.join(allowed)}, not at {name!r}"
