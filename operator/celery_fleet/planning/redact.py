"""Keeping credentials out of text the operator shows (pure): the one place that knows how.

Two strengths. `redact_urls` replaces anything URL-shaped (status, Events and metrics never need
a URL, and a URL may carry a password anywhere). `scrub_credentials` keeps a URL readable for logs
but masks its userinfo and every credential-like query value (`?password=`, `sentinel_password=`,
`token=`...), wherever in a line or traceback it appears.
"""

from __future__ import annotations

import re

URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")
URL_PLACEHOLDER = "<broker-url>"
# Greedy up to the last '@' of the token: a password may hold '/', '?' or ':' unescaped.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^\s'\"<>]*@")
_QUERY_CREDENTIAL = re.compile(
    r"(?i)([?&;][a-z0-9_.-]*(?:password|passwd|pwd|secret|token|auth)[a-z0-9_.-]*=)[^&;#\s'\"<>]*"
)


def redact_urls(text: str) -> str:
    return URL.sub(URL_PLACEHOLDER, text)


def scrub_credentials(text: str) -> str:
    return _QUERY_CREDENTIAL.sub(r"\1***", _USERINFO.sub(r"\1***@", text))
