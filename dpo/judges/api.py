"""A judge behind an OpenAI-compatible chat-completions endpoint (``judge=api``).

The paper judged with GPT-4 (gpt-4-0314); any server speaking ``POST <base_url>/chat/completions``
works (OpenAI, a vLLM or llama.cpp server, a proxy). Standard library only (``urllib``): no client
package to install or pin.

What it promises:

- The API key is read from the environment variable ``api_key_env`` when the judge is built and is
  only ever put in the request's ``Authorization`` header: never in the config, a log, the cache or
  the results.
- Every answer is cached on disk (:class:`JudgmentCache`), keyed by endpoint model, template and the
  exact messages (prompt and both texts, in order): a rerun pays nothing twice, and an interrupted
  run keeps what it paid for.
- 429, 5xx, network errors, timeouts and malformed answers (not UTF-8, not JSON, not a
  chat-completions object with a text: an HTML error page from a proxy, another API's schema, a torn
  status line) are retried with exponential backoff (``Retry-After`` is honoured); any other 4xx
  stops the run with the server's message (a bad key or model name does not get better by
  retrying). Only a well-formed answer is cached, so a fixed endpoint is asked again.
- Wall-clock bounds: ``timeout_s`` for one request from sending to the last byte (a server that
  trickles bytes is cut off too), ``max_run_s`` for the whole run (no request starts after it).
- At most ``max_concurrency`` requests in flight; at most ``max_requests`` requests sent by one run,
  retries included: a run that would need more uncached comparisons than that refuses before the
  first request.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dpo.judges.base import Comparison, JudgeError, Template, Verdict
from dpo.runtime.checks import refuse
from dpo.runtime.io import jsonl_records
from dpo.runtime.log import get_logger
from dpo.runtime.progress import track

log = get_logger(__name__)

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class MalformedAnswer(ValueError):
    """An answer that is not a chat-completions object with a text (retried, never cached)."""


class JudgmentCache:
    """Raw judge answers on disk, one JSON line per answer (``{"key", "output"}``), appended as they
    arrive. A torn last line (a kill mid-write) is ignored on the next read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.answers: dict[str, str] = {}
        self.lock = threading.Lock()
        if self.path.is_file():
            for _, row in jsonl_records(self.path):  # splits at "\n" only: a U+2028 in an answer stays in it
                if isinstance(row, dict) and isinstance(row.get("key"), str) and isinstance(row.get("output"), str):
                    self.answers[row["key"]] = row["output"]

    def get(self, key: str) -> str | None:
        return self.answers.get(key)

    def put(self, key: str, output: str) -> None:
        with self.lock:
            self.answers[key] = output
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())


class ApiJudge:
    """Judges comparisons by asking a chat-completions endpoint; see the module docstring."""

    @dataclass
    class Config:
        """``conf/judge/api.yaml``.

        Attributes:
            kind: ``api``.
            base_url: the endpoint's base URL (``.../v1``); requests go to ``<base_url>/chat/completions``.
            model: the judge model's name at that endpoint (paper: gpt-4-0314).
            api_key_env: the environment variable holding the API key (never the key itself); an
                unset variable is an error unless the endpoint needs no key (``require_key: false``).
            require_key: refuse to start when ``api_key_env`` is unset.
            orders: ``random``: one judgment per comparison, A/B drawn per comparison; ``both``:
                each comparison in both orders (twice the requests; gives the position bias).
            temperature: the judge's sampling temperature (0: as deterministic as the server allows).
            max_tokens: most tokens of the judge's answer (a sentence and a letter).
            max_concurrency: requests in flight at once.
            max_requests: most requests one run sends, retries included.
            timeout_s: seconds one request may take, from sending to the answer's last byte (> 0).
            max_retries: retries of one request after 429/5xx/timeouts/malformed answers (>= 0); a
                request that times out twice in a row ends the run (a silent server is not a busy one).
            backoff_s: first retry's wait; doubled each retry (capped at 60 s).
            max_run_s: seconds the whole run may spend judging; no request starts after that (> 0).
            cache_dir: where answers are cached (shared across runs).
        """

        kind: str = "api"
        base_url: str = "https://api.openai.com/v1"
        model: str = "gpt-4o"
        api_key_env: str = "OPENAI_API_KEY"
        require_key: bool = True
        orders: str = "random"
        temperature: float = 0.0
        max_tokens: int = 256
        max_concurrency: int = 8
        max_requests: int = 2000
        timeout_s: float = 60.0
        max_retries: int = 6
        backoff_s: float = 2.0
        max_run_s: float = 3600.0
        cache_dir: str = "${paths.cache_dir}/judgments"

        def __post_init__(self) -> None:
            """Every mistake at once, by key; the value of ``api_key_env`` is never echoed (a key typed there)."""
            url = urlparse(str(self.base_url))
            rules = [("base_url", self.base_url, url.scheme in ("http", "https") and bool(url.netloc),
                      "an http:// or https:// URL with a host"),
                     ("orders", self.orders, self.orders in ("random", "both"), "random or both")]  # fmt: skip
            for key, low, strict in (("temperature", 0, False), ("max_tokens", 1, False), ("max_concurrency", 1, False),
                                     ("max_requests", 1, False), ("timeout_s", 0, True), ("max_retries", 0, False),
                                     ("backoff_s", 0, False), ("max_run_s", 0, True)):  # fmt: skip
                value = getattr(self, key)
                ok = value > low or (not strict and value == low)
                rules.append((key, value, ok, f"{'>' if strict else '>='} {low}"))
            key_ok = not (self.api_key_env or self.require_key) or ENV_NAME.match(str(self.api_key_env or ""))
            refuse(rules, None if key_ok else "judge.api_key_env must name an environment variable (letters, digits, "
                   "_), not hold the key itself; its value is not shown", prefix="judge.")  # fmt: skip

    def __init__(self, config: Config, template: Template, dry_run: bool = False) -> None:
        self.config, self.template = config, template
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if not key and config.require_key and not dry_run:  # a dry run sends nothing: it may count without a key
            raise JudgeError(
                f"judge=api: the environment variable {config.api_key_env} holding the API key is not set; "
                f"export it (the key is never written anywhere), or set judge.require_key=false for an "
                f"endpoint that needs none"
            )
        self._key = key
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self.cache = JudgmentCache(Path(config.cache_dir) / "api.jsonl")
        self.sent = 0
        self._count = threading.Lock()
        self._deadline = time.monotonic() + config.max_run_s  # set again when judging starts
        self._stop = threading.Event()
        self._failure: BaseException | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": "api", "base_url": self.config.base_url, "model": self.config.model,
                "template": self.template.name, "temperature": self.config.temperature}  # fmt: skip

    def _body(self, c: Comparison) -> dict[str, Any]:
        return {"model": self.config.model, "messages": self.template.messages(c),
                "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}  # fmt: skip

    def cache_key(self, c: Comparison) -> str:
        """Endpoint, model, template and the exact request (both texts in order, settings)."""
        what = {"url": self.config.base_url.rstrip("/"), "template": self.template.name,
                "cue": self.template.verdict_cue, "body": self._body(c)}  # fmt: skip
        return hashlib.sha256(json.dumps(what, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def uncached(self, comparisons: list[Comparison]) -> int:
        """How many requests judging ``comparisons`` would send (distinct comparisons not yet cached)."""
        return len({k for k in map(self.cache_key, comparisons) if self.cache.get(k) is None})

    def judge(self, comparisons: list[Comparison]) -> list[Verdict]:
        keys = [self.cache_key(c) for c in comparisons]
        todo = {k: c for k, c in zip(keys, comparisons, strict=True) if self.cache.get(k) is None}
        if len(todo) > self.config.max_requests:
            raise JudgeError(
                f"judge=api: {len(todo)} comparisons need a request but judge.max_requests={self.config.max_requests}; "
                f"raise judge.max_requests or judge fewer (n_prompts, temperatures, policies)"
            )
        log.info(f"judge {self.config.model}: {len(comparisons) - len(todo)} cached, {len(todo)} to request")
        self._deadline = time.monotonic() + self.config.max_run_s
        self._stop.clear()
        self._failure = None
        pool = ThreadPoolExecutor(max_workers=max(1, self.config.max_concurrency))
        try:
            futures = [pool.submit(self._request_and_cache, k, c) for k, c in todo.items()]
            for future in track(futures, f"judge {len(todo)} comparisons"):
                future.result()  # the first hard error stops the run; answers so far stay cached
        except BaseException as e:
            self._stop.set()  # requests in flight send no retry; queued ones never start
            raise (self._failure or e) from None  # the cause, not a request it stopped
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        out = []
        for k in keys:
            raw = self.cache.get(k) or ""
            out.append(Verdict(self.template.parse(raw), raw))
        return out

    def _request_and_cache(self, key: str, c: Comparison) -> None:
        try:
            self.cache.put(key, self._request(self._body(c)))
        except BaseException as e:
            with self._count:
                if not self._stop.is_set():  # the first hard failure: no other request starts or retries
                    self._failure = e
                    self._stop.set()
            raise

    def _take_request(self) -> None:
        with self._count:
            if self._stop.is_set():
                raise JudgeError("judge=api: stopped by an earlier failure")
            if time.monotonic() > self._deadline:
                raise JudgeError(f"judge=api: judge.max_run_s={self.config.max_run_s:g} reached; answers so far are "
                                 "cached, so the same command goes on from there")  # fmt: skip
            if self.sent >= self.config.max_requests:
                raise JudgeError(f"judge=api: judge.max_requests={self.config.max_requests} reached (retries count)")
            self.sent += 1

    def _request(self, body: dict[str, Any]) -> str:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        timeouts = 0
        for attempt in range(self.config.max_retries + 1):
            self._take_request()
            wait = min(60.0, self.config.backoff_s * 2**attempt)
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    return _content(_read_within(response, time.monotonic() + self.config.timeout_s))
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code not in RETRY_STATUS:
                    raise JudgeError(f"judge=api: {self.url} answered HTTP {e.code}: {detail}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(60.0, float(retry_after))
                reason = f"HTTP {e.code}"
            except MalformedAnswer as e:
                reason = str(e)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
                reason = type(e).__name__
                if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                    timeouts += 1  # accepted and silent: a dead server or too short a timeout, not a busy one
                    if timeouts >= 2:
                        raise JudgeError(
                            f"judge=api: {self.url} gave no answer within judge.timeout_s={self.config.timeout_s:g} "
                            f"twice in a row; is the server up? (raise judge.timeout_s for a slow one)"
                        ) from None
            if attempt < self.config.max_retries:
                log.warning(
                    f"judge request failed ({reason}); retry {attempt + 1}/{self.config.max_retries} in {wait:.1f}s"
                )
                time.sleep(wait)
        raise JudgeError(f"judge=api: {self.url} still failing after {self.config.max_retries} retries ({reason})")


def _read_within(response: Any, deadline: float) -> bytes:
    """The whole body, or TimeoutError once ``deadline`` passes (each read also has the socket timeout)."""
    chunks = []
    while chunk := response.read(65536):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took longer than judge.timeout_s")
    return b"".join(chunks)


def _content(body: bytes) -> str:
    """The text of a chat-completions answer.

    Raises:
        MalformedAnswer: the body is not UTF-8 JSON with ``choices[0].message.content`` a string,
            naming its first bytes.
    """
    try:
        content = json.loads(body.decode("utf-8"))["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise MalformedAnswer(f"malformed answer, not a chat completion: {body[:80]!r}")
    return content
