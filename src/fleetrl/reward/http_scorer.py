"""HTTP scorer: a remote service that scores a batch.

Request (POST, JSON):  {"prompts": [str], "completions": [str], "columns": {name: [value per sample]}}
Response (200, JSON):  {"rewards": [float per sample]}

Timeouts, connection errors, 429 and 5xx answers are retried `max_retries` times with exponential
backoff; other 4xx answers, a body that is not JSON, a missing "rewards" list or one of the wrong
length fail at once with the URL, status and the start of the body in the message.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence


class HttpScorerError(RuntimeError):
    """The remote scorer did not return a valid answer."""


def _body_preview(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "..."


class HttpScorer:
    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        headers: dict[str, str] | None = None,
        retry_backoff_s: float = 1.0,
    ):
        self.url, self.timeout_s, self.max_retries = url, timeout_s, max_retries
        self.retry_backoff_s = retry_backoff_s
        self.headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}

    def _encode(self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list]) -> bytes:
        payload = {"prompts": list(prompts), "completions": list(completions), "columns": columns}
        try:
            return json.dumps(payload).encode()
        except (TypeError, ValueError) as e:
            bad = [k for k, v in columns.items() if not _json_ok(v)]
            raise HttpScorerError(
                f"cannot send the batch to {self.url} as JSON ({e}); columns that are not JSON: {bad}"
            ) from e

    def _post_once(self, data: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        data = self._encode(prompts, completions, columns)
        failures: list[str] = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                status, body = self._post_once(data)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                failures.append(f"try {attempt + 1}: {type(reason).__name__}: {reason}")
                continue
            if status == 429 or status >= 500:
                failures.append(f"try {attempt + 1}: HTTP {status}: {_body_preview(body)}")
                continue
            if status != 200:
                raise HttpScorerError(f"POST {self.url} answered HTTP {status}: {_body_preview(body)}")
            return self._parse(body, len(completions))
        raise HttpScorerError(
            f"POST {self.url} failed {len(failures)} times (timeout {self.timeout_s}s, max_retries "
            f"{self.max_retries}): " + "; ".join(failures)
        )

    def _parse(self, body: bytes, n: int) -> list:
        try:
            answer = json.loads(body)
        except ValueError:
            raise HttpScorerError(
                f"POST {self.url} answered 200 but the body is not JSON: {_body_preview(body)!r}"
            ) from None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list):
            raise HttpScorerError(
                f'POST {self.url} answered without a "rewards" list: {_body_preview(body)!r}; '
                'expected {"rewards": [one number per completion]}'
            )
        if len(rewards) != n:
            raise HttpScorerError(f"POST {self.url} returned {len(rewards)} rewards for {n} completions")
        return rewards  # values are checked (numbers, finite) by the scorer, per sample


def _json_ok(value: object) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False
