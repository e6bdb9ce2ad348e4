"""Redaction: secrets a user put into a URL, a header or the environment never leave the process.

Everything slm writes where others read it (manifests, stage keys, MLflow params and tags, log lines,
error messages, Prefect flow parameters) passes through here first:

  redact_url("https://bob:pw@host/x?token=abc&page=2") -> "https://***@host/x?token=***&page=2"
  redact_text(text)   every URL in free text, `Authorization: ...` / `Bearer ...` values, secret-looking
                      query values without a scheme (`/x?api_key=...`), and the value of every
                      secret-looking environment variable (HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)
  redact(value)       the same through dicts, lists and strings (JSON-shaped data)

A value without a secret comes back unchanged (same string), so stage keys of ordinary profiles do
not change. Secrets are replaced by `***`, so two URLs that differ only in their token are the same
key: rotating a token does not refetch a corpus.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

from storage.errors import SlmError

MASK = "***"
# Query parameter names that hold credentials (token, access_token, api_key, X-Amz-Signature, ...).
_SECRET_NAME = re.compile(
    r"(token|secret|passw|pwd|api[-_]?key|apikey|access[-_]?key|auth(?!or)|credential|signature|^sig$|^key$|session)",
    re.IGNORECASE)
# Environment variables that hold credentials (HF_TOKEN, AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY, ...).
_SECRET_ENV = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY)", re.IGNORECASE)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
_QUERY_PAIR = re.compile(r"([?&;]([A-Za-z0-9_.\-]+)=)([^&;#\s'\"<>`]+)")
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|x-auth-token)(['\"]?\s*[:=]\s*['\"]?)"
                     r"((?:bearer|basic|token|digest)\s+)?([^\s,;'\"}]+)")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+([A-Za-z0-9._~+/=\-]{6,})")
_MIN_ENV_SECRET = 6  # shorter environment values are too likely to occur by chance ("test", "1")


def _query(query: str) -> str:
    return _QUERY_PAIR.sub(lambda m: m.group(1) + MASK if _SECRET_NAME.search(m.group(2)) else m.group(0),
                           "?" + query)[1:] if query else query


def redact_url(url: str) -> str:
    """The URL without userinfo and with secret-looking query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text_plain(url, env=False)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, _query(parts.query), parts.fragment))


def _env_secrets() -> list[str]:
    found = [value for name, value in os.environ.items()
             if _SECRET_ENV.search(name) and len(value) >= _MIN_ENV_SECRET and not value.startswith(("/", "."))]
    return sorted(set(found), key=len, reverse=True)


def redact_text_plain(text: str, env: bool = True) -> str:
    """Headers, bearer tokens, bare `?name=value` pairs and (env) environment secrets; no URL parsing."""
    text = _HEADER.sub(lambda m: m.group(1) + m.group(2) + (m.group(3) or "") + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + " " + MASK, text)
    text = _QUERY_PAIR.sub(lambda m: m.group(1) + MASK if _SECRET_NAME.search(m.group(2)) else m.group(0), text)
    if env:
        for secret in _env_secrets():
            if secret in text:
                text = text.replace(secret, MASK)
    return text


def redact_text(text: str, env: bool = True) -> str:
    """`env=False` leaves out the environment's secret values: what a stage key is computed from must
    not depend on the environment (only on what the profile says)."""
    if not text:
        return text
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    return redact_text_plain(text, env)


def redact(value: Any, env: bool = True) -> Any:
    """JSON-shaped data with every string redacted; other values as they are."""
    if isinstance(value, str):
        return redact_text(value, env)
    if isinstance(value, dict):
        return {redact(k, env) if isinstance(k, str) else k: redact(v, env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, env) for v in value)
    return value


def scrubbed(err: BaseException) -> BaseException | None:
    """None when the error's message holds no secret; otherwise an SlmError with the message
    redacted, to raise `from None` (so neither the original message nor its chain is printed)."""
    message = str(err)
    clean = redact_text(message)
    if clean == message:
        return None
    return SlmError(clean if isinstance(err, SlmError) else f"{type(err).__name__}: {clean}")


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (and its exception text) before any
    handler formats it: the terminal, Prefect's API (the UI) and files get the redacted line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            cleaned = redact_text(text)
            if cleaned != text:
                record.msg = f"{record.msg}\n{cleaned}"
                record.exc_info, record.exc_text = None, None
        return True


_FILTER = RedactingFilter()


def install_log_redaction() -> None:
    """Put the filter on every handler configured now (root, Prefect's console and API handlers,
    MLflow's); idempotent. Called at the start of each flow run, after Prefect set up logging."""
    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
