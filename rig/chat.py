"""Local TLS endpoints posing as the chat, push and mail services ecr-deploy notifies through Apprise.

As the registries pose as ECR (rig/registry.py), one HTTPS server on 127.0.0.5:443 answers as Slack's
incoming webhooks, Discord's webhooks, a Microsoft Teams Workflows trigger (Power Automate on Azure Logic
Apps) and ntfy.sh, and a real SMTP server (aiosmtpd) on 127.0.0.5:587 answers as a mail relay that wants
STARTTLS and a login: names in /etc/hosts, a CA of our own that the deployer trusts through
REQUESTS_CA_BUNDLE and SSL_CERT_FILE. Apprise's own senders talk to them unchanged; each records what
it received, for the tests to check against what the services document.
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

from rig.registry import HOSTS_MARK, make_tls, write_hosts

CHAT_IP = "127.0.0.5"  # apart from the registries (127.0.0.2, .3) and the demo's (.9)
SLACK, DISCORD, NTFY = "hooks.slack.com", "discord.com", "ntfy.sh"
TEAMS = "prod-00.westeurope.logic.azure.com"  # a Workflows trigger's host (Azure Logic Apps)
SMTP_HOST, SMTP_PORT, SMTP_USER, SMTP_PASSWORD = "smtp.example.com", 587, "deployer", "SMTP-SECRET-pw"
HOSTS = [SLACK, DISCORD, NTFY, TEAMS, SMTP_HOST]


class Request(NamedTuple):
    host: str
    path: str
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class Mail(NamedTuple):
    sender: str
    recipients: list[str]
    content: bytes
    login: str


# What each service answers on success, as it documents it.
ANSWERS = {SLACK: (200, b"ok", "text/plain"), DISCORD: (204, b"", None), TEAMS: (202, b"", None),
           NTFY: (200, b'{"id":"rig","event":"message"}', "application/json")}


class ChatServices:
    """What the posing services received, by host; `mails` for the SMTP server."""

    def __init__(self, workdir: pathlib.Path):
        self.requests: list[Request] = []
        self.mails: list[Mail] = []
        self.ca, cert, key = make_tls(workdir, HOSTS)
        self.env = {"REQUESTS_CA_BUNDLE": str(self.ca), "SSL_CERT_FILE": str(self.ca)}
        self._https(cert, key)
        self._smtp(cert, key)

    def received(self, host: str) -> list[Request]:
        return [r for r in self.requests if r.host == host]

    def _https(self, cert, key) -> None:
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                host = self.headers.get("Host", "").split(":")[0]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                requests.append(Request(host, self.path, dict(self.headers), body))
                status, answer, kind = ANSWERS.get(host, (404, b"", None))
                self.send_response(status)
                if kind:
                    self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server = ThreadingHTTPServer((CHAT_IP, 443), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _smtp(self, cert, key) -> None:
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import AuthResult, LoginPassword

        mails = self.mails

        class Relay:
            async def handle_DATA(self, server, session, envelope):
                mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                                  session.auth_data.decode() if isinstance(session.auth_data, bytes)
                                  else str(session.auth_data)))
                return "250 OK"

        def authenticator(server, session, envelope, mechanism, data):
            ok = isinstance(data, LoginPassword) and (data.login, data.password) == (SMTP_USER.encode(),
                                                                                  SMTP_PASSWORD.encode())
            return AuthResult(success=ok, handled=False, auth_data=data.login if ok else None)

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self.smtp = Controller(Relay(), hostname=CHAT_IP, port=SMTP_PORT, server_hostname=SMTP_HOST,
                               tls_context=tls, require_starttls=True, auth_require_tls=True,
                               authenticator=authenticator)
        self.smtp.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.smtp.stop()


@contextlib.contextmanager
def serving_chat(workdir: pathlib.Path, instance: str = "tests"):
    """The posing services, named in /etc/hosts for as long as they run."""
    mark = f"{HOSTS_MARK} chat {instance}"
    workdir.mkdir(parents=True, exist_ok=True)
    services = None
    try:
        write_hosts(mark, "".join(f"{CHAT_IP} {host} {mark}\n" for host in HOSTS))
        services = ChatServices(workdir)
        yield services
    finally:
        if services:
            services.close()
        write_hosts(mark, "")
