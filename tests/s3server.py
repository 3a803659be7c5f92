"""A real S3 API server for the tests: moto's server mode on 127.0.0.1 (a port the system picks),
counting the requests it serves. Nothing here reaches any other address: the AWS environment the tests
set points every client at it, and the instance-metadata lookup of a client without credentials at a
closed loopback port."""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from typing import Any

from moto.server import DomainDispatcherApplication, MotoRequestHandler, ThreadedMotoServer, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

REGION = "us-east-1"


class QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # one line per request otherwise
        pass


class CountingMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` whose WSGI app counts requests as (method, kind): kind "list" for a
    bucket listing, "object" otherwise."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ: dict[str, Any], start_response: Any) -> Any:
            query = environ.get("QUERY_STRING", "")
            kind = "list" if ("list-type" in query or "delimiter" in query or "prefix=" in query) else "object"
            with self.lock:
                self.counts[(environ["REQUEST_METHOD"], kind)] += 1
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, counting, True, request_handler=QuietHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION, "AWS_ENDPOINT_URL": endpoint,
            "AWS_METADATA_ENDPOINT": f"http://127.0.0.1:{closed_port()}",  # never the real instance metadata
            "AWS_EC2_METADATA_DISABLED": "true"}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)


logging.getLogger("werkzeug").setLevel(logging.ERROR)
WSGIRequestHandler.log_request = lambda *a, **k: None  # type: ignore[method-assign]
