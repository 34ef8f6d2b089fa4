"""HTTP scorer: a remote service that scores a batch.

Request (POST, JSON):  {"prompts": [str], "completions": [str], "columns": {name: [value per sample]}}
Response (200, JSON):  {"rewards": [float per sample]}

Limits of one try:
- `timeout_s` is a total deadline: connecting, sending and reading the whole answer end by it. A
  watchdog shuts the socket down at the deadline, so a server that drips bytes cannot keep the
  scorer reading (a per-socket-operation timeout alone would restart at every byte).
- `max_response_bytes` caps the answer body (Content-Length checked first, then while reading).
- Redirects are not followed: a 3xx answer is an error naming its Location, because following it
  would send the request, with its headers (an Authorization token), to another address.

Timeouts, connection errors, 429 and 5xx answers are retried `max_retries` times with exponential
backoff, so one call takes at most `worst_case_s()`; other 4xx and 3xx answers, a body that is too
big or not JSON, a missing "rewards" list or one of the wrong length fail at once with the URL,
status and the start of the body in the message. DNS resolution is outside the socket deadline; the
reward scorer's own per-call deadline (`RewardScorer`) bounds it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from email.message import Message

from fleetrl.core.secrets import resolve_env_refs
from fleetrl.reward.config import http_worst_case_s

ERROR_BODY_BYTES = 64 * 1024  # read at most this much of a non-200 answer, for the message


class HttpScorerError(RuntimeError):
    """The remote scorer did not return a valid answer."""


def _body_preview(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "..."


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns every 3xx into an HTTPError instead of a new request to the Location."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: PLR0913 - urllib's signature
        return None


class _TrackedHTTPHandler(urllib.request.HTTPHandler):
    """Hands each connection it opens to `on_connection`, so that a watchdog can shut its socket down."""

    def __init__(self, on_connection):
        super().__init__()
        self._on_connection = on_connection

    def http_open(self, req):
        def connection(host, **kwargs):
            conn = http.client.HTTPConnection(host, **kwargs)
            self._on_connection(conn)
            return conn

        return self.do_open(connection, req)


class _TrackedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, on_connection):
        super().__init__()
        self._on_connection = on_connection

    def https_open(self, req):
        def connection(host, **kwargs):
            conn = http.client.HTTPSConnection(host, **kwargs)
            self._on_connection(conn)
            return conn

        return self.do_open(connection, req, context=self._context)


class _Deadline:
    """Shuts down the sockets of the connections of one try when its deadline passes."""

    def __init__(self, seconds: float):
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def track(self, conn: http.client.HTTPConnection) -> None:
        """Watch the sockets `conn` opens: the TCP one (TLS handshake) and the one it talks over.

        Sockets, not the connection: urllib detaches the socket from the connection once the headers
        are read, while the body is still read from it.
        """
        connect = conn.connect

        def connect_and_track() -> None:
            connect()
            self._add(conn.sock)

        conn.connect = connect_and_track
        create = getattr(conn, "_create_connection", None)  # http.client's hook for the TCP connect
        if create is not None:
            conn._create_connection = lambda *args, **kwargs: self._add(create(*args, **kwargs))

    def _add(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        if self.expired.is_set():
            _shutdown(sock)
        return sock

    def _expire(self) -> None:
        self.expired.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _shutdown(sock: socket.socket | None) -> None:
    """Wake a recv/send blocked on `sock` in another thread (close() alone does not)."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed, or detached into its TLS socket
        pass


class HttpScorer:
    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        max_retries: int = 2,
        headers: dict[str, str] | None = None,
        retry_backoff_s: float = 1.0,
        max_response_bytes: int = 4 * 1024 * 1024,
    ):
        self.url, self.timeout_s, self.max_retries = url, timeout_s, max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_response_bytes = max_response_bytes
        self.headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": "fleetrl-reward",
            # ${env:NAME} references are read here, in the reward actor: the secret never enters a config.
            **resolve_env_refs(dict(headers or {}), f"the headers of http reward function {url}"),
        }

    def worst_case_s(self) -> float:
        """The longest one call can take: every try to its deadline plus the backoff between tries."""
        return http_worst_case_s(self.timeout_s, self.max_retries, self.retry_backoff_s)

    def _encode(self, prompts: Sequence[str], completions: Sequence[str], columns: dict[str, list]) -> bytes:
        payload = {"prompts": list(prompts), "completions": list(completions), "columns": columns}
        try:
            return json.dumps(payload).encode()
        except (TypeError, ValueError) as e:
            bad = [k for k, v in columns.items() if not _json_ok(v)]
            raise HttpScorerError(
                f"cannot send the batch to {self.url} as JSON ({e}); columns that are not JSON: {bad}"
            ) from e

    def _post_once(self, data: bytes) -> tuple[int, Message, bytes]:
        """(status, headers, body) of one try; TimeoutError when it does not end within timeout_s."""
        with _Deadline(self.timeout_s) as deadline:
            opener = urllib.request.build_opener(
                _TrackedHTTPHandler(deadline.track), _TrackedHTTPSHandler(deadline.track), _NoRedirect()
            )
            request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
            try:
                try:
                    response = opener.open(request, timeout=self.timeout_s)
                except urllib.error.HTTPError as e:  # any status but 2xx, 3xx included
                    response = e
                with response:
                    status, headers = response.status, response.headers
                    if 300 <= status < 400:
                        body = b""
                    elif status == 200:
                        body = self._read_capped(response, headers)
                    else:
                        body = response.read(ERROR_BODY_BYTES)
            except (OSError, http.client.HTTPException) as e:
                if deadline.expired.is_set() or isinstance(getattr(e, "reason", e), TimeoutError):
                    raise TimeoutError(self._timeout_message()) from None
                raise
            if deadline.expired.is_set():  # the watchdog may have cut the body short: not a valid answer
                raise TimeoutError(self._timeout_message())
        return status, headers, body

    def _timeout_message(self) -> str:
        return f"no complete answer within timeout_s {self.timeout_s:g} s (connect, send and read together)"

    def _read_capped(self, response, headers: Message) -> bytes:
        limit = self.max_response_bytes
        declared = headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise HttpScorerError(
                f"POST {self.url} answered with a body of {int(declared)} bytes (Content-Length), over "
                f"max_response_bytes {limit}; raise max_response_bytes if answers this big are expected"
            )
        chunks, total = [], 0
        while True:
            chunk = response.read(min(64 * 1024, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise HttpScorerError(
                    f"POST {self.url} answered with a body over max_response_bytes {limit} (stopped reading "
                    f"at {total} bytes); raise max_response_bytes if answers this big are expected"
                )

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: list) -> list[float]:
        data = self._encode(prompts, completions, columns)
        failures: list[str] = []
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            try:
                status, headers, body = self._post_once(data)
            except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets are OSErrors
                reason = getattr(e, "reason", e)
                failures.append(f"try {attempt + 1}: {type(reason).__name__}: {reason}")
                continue
            if status == 429 or status >= 500:
                failures.append(f"try {attempt + 1}: HTTP {status}: {_body_preview(body)}")
                continue
            if 300 <= status < 400:
                raise HttpScorerError(
                    f"POST {self.url} answered HTTP {status} redirecting to {headers.get('Location')!r}; "
                    "redirects are not followed (they would carry the request's headers, an Authorization "
                    "token included, to another address): set the url to the address that scores"
                )
            if status != 200:
                raise HttpScorerError(f"POST {self.url} answered HTTP {status}: {_body_preview(body)}")
            return self._parse(body, len(completions))
        raise HttpScorerError(
            f"POST {self.url} failed {len(failures)} times (timeout_s {self.timeout_s:g} per try, max_retries "
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
