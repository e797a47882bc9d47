"""Real HTTP hops that fail or stall chosen requests, in front of moto_server or dockerd."""
from __future__ import annotations

import collections
import json
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingUnixStreamServer

import requests
import requests_unixsocket

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}
BODIES_KEPT = 2000  # request bodies a proxy keeps: the ECR endpoint's lives as long as the whole suite


class Recent:
    """The last `kept` items appended, indexed as if none had been dropped: len() counts every item ever
    appended, so `mark = len(recent)` then `recent[mark:]` is what came since. Asking for items already
    dropped raises IndexError rather than answering less than was sent."""

    def __init__(self, kept: int):
        self._items: collections.deque = collections.deque(maxlen=kept)
        self._dropped, self._lock = 0, threading.Lock()

    def append(self, item) -> None:
        with self._lock:
            self._dropped += len(self._items) == self._items.maxlen
            self._items.append(item)

    def __len__(self) -> int:
        return self._dropped + len(self._items)

    def __iter__(self):
        return iter(list(self._items))

    def __getitem__(self, since: slice) -> list:
        with self._lock:
            if not isinstance(since, slice) or since.stop is not None or since.step is not None:
                raise TypeError("only recent[mark:] is kept")
            start = since.start or 0
            if start < self._dropped:
                raise IndexError(f"only the last {self._items.maxlen} are kept: {self._dropped - start} "
                                 f"since {start} were dropped")
            return list(self._items)[start - self._dropped:]

    def __delitem__(self, everything: slice) -> None:
        if everything != slice(None):
            raise TypeError("only del recent[:]")
        with self._lock:
            self._items.clear()
            self._dropped = 0


class FaultProxy:
    """Forwards HTTP to moto_server (TCP) or dockerd (unix socket); `rule` picks requests to fail or stall.

    rule(key) -> None (forward) | an HTTP status to answer instead | (status, JSON document) to answer
    instead (an AWS error: {"__type": "AccessDenied", ...}) | "stall" (hold until released)
    where key is "METHOD PATH X-Amz-Target". Every key is recorded in `seen`, with its body in `bodies` (the
    last BODIES_KEPT: see Recent).
    answer(key, headers, body) -> None (forward) | (status, JSON document, headers): the hook of a
    proxy that corrects what the upstream answers (see rig.aws.EcrAsDocumented), asked after `rule`.
    An upstream that is down (moto_server restarting) closes the client's connection, unanswered.
    """

    def __init__(self, upstream: str, unix_path: str | None = None):
        self.rule, self.answer, self.seen, self.seconds = None, None, [], []  # seconds: (key, upstream time)
        self.bodies = Recent(BODIES_KEPT)  # (key, request body): what the server was sent, lately
        self.stalled, self.released = threading.Event(), threading.Event()
        http = requests_unixsocket.Session() if unix_path or upstream.startswith("http+unix") else requests.Session()
        http.trust_env = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = f"{self.command} {self.path} {self.headers.get('X-Amz-Target', '')}".strip()
                proxy.seen.append(key)
                proxy.bodies.append((key, body))
                action = proxy.rule(key) if proxy.rule else None
                if action == "stall":
                    proxy.stalled.set()
                    proxy.released.wait(120)
                    action = 503
                extra = {}
                if not action and proxy.answer:
                    action, document, extra = proxy.answer(key, self.headers, body) or (None, None, {})
                    action = action and (action, document)
                if action:
                    action, document = action if isinstance(action, tuple) else (action, {"message": "injected fault"})
                    payload = json.dumps(document).encode()
                    self.send_response(action)
                    for name, value in {"Content-Type": "application/json", **extra}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                started = time.monotonic()
                try:
                    reply = http.request(self.command, upstream + self.path, data=body, headers=headers, timeout=60)
                except requests.ConnectionError:
                    self.close_connection = True
                    return
                proxy.seconds.append((key, time.monotonic() - started))
                self.send_response(reply.status_code)
                for name, value in reply.headers.items():
                    if name.lower() not in HOP_HEADERS:
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_POST = do_DELETE = do_HEAD = do_PUT = forward

        def quiet(server, request, client_address):  # a client that hung up mid-reply (SIGTERM): fine
            if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                socketserver.BaseServer.handle_error(server, request, client_address)

        # Replies go out as headers, then body: without TCP_NODELAY, Nagle's algorithm holds the body until the
        # client's delayed ACK (40 ms a call). (A unix socket has no such option.)
        Handler.disable_nagle_algorithm = not unix_path
        if unix_path:
            Handler.address_string = lambda self: "unix"
            self.server = ThreadingUnixStreamServer(unix_path, Handler)
            self.url = f"unix://{unix_path}"
        else:
            self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.server.daemon_threads = True
        self.server.handle_error = quiet.__get__(self.server)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
