"""A local web page to try the model on a photo: choose or drop one, see the boxes, gender and
age drawn on it, and the JSON answer.

    agegender serve [--host 127.0.0.1] [--port 8000] [--model models/model.keras]
        [--params params.yaml] [--weights data/weights] [--max-upload-mb 10]

Two routes: `GET /` is the page (one self-contained HTML file, no network needed) and
`POST /predict` takes a photo's bytes as the request body and answers
`{"width", "height", "faces": [...]}`, the faces as `Predictor.faces` gives them. Anything else
is a 404, a known route with the wrong method a 405, and a bad upload a 4xx, each with a JSON
`{"error": ...}` saying what was wrong. The model is loaded once, at start. Uploads are decoded
in memory and never written to disk. It listens on loopback by default: it has no
authentication, so bind another address only on a network you trust.
"""

import argparse
import errno
import io
import json
import os
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from agegender.contracts.errors import PipelineError, exits_cleanly
from agegender.inference.predictor import add_model_options, predictor_of_options

ACCEPTED = "a JPEG, PNG, WebP, BMP, GIF or TIFF photo (any image Pillow decodes)"
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob: data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'"
)
ROUTES = {"/": "GET", "/predict": "POST"}
PAGE_TYPE = "text/html; charset=utf-8"


class BadRequest(Exception):
    """A request to refuse with `status` and a message for the person who sent it."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def page_html(max_upload_bytes):
    html = resources.files("agegender.apps").joinpath("web_page.html").read_text(encoding="utf-8")
    return html.replace("__MAX_UPLOAD_BYTES__", str(max_upload_bytes)).encode("utf-8")


def describe(body, content_type):
    """What was received, in words, so a refusal can say what the server saw."""
    kind = content_type or "no Content-Type"
    head = body[:16]
    shown = head.decode("ascii", "replace") if head.isascii() else head.hex(" ")
    return f"{len(body)} bytes of {kind}, starting {shown!r}"


def decode_upload(body, content_type, max_upload_bytes):
    """The photo in the body as an RGB image, decoded in memory the way the pipeline decodes."""
    from PIL import Image

    from agegender.facedata.images import ImageSkip, load_rgb

    if not body:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"the body was empty: send {ACCEPTED}")
    try:
        return load_rgb(io.BytesIO(body))
    except ImageSkip as skip:
        if skip.reason == "too_large":
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "the image has too many pixels to decode safely "
                f"(over {Image.MAX_IMAGE_PIXELS / 1e6:g} megapixels): send a smaller photo",
            ) from None
        hint = ""
        if (content_type or "").startswith("multipart/"):
            hint = " Send the photo's bytes as the body itself, not a multipart form."
        raise BadRequest(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"not an image this server can read: received {describe(body, content_type)}; "
            f"accepted is {ACCEPTED}, at most {max_upload_bytes / 2**20:g} MB.{hint}",
        ) from None


class Handler(BaseHTTPRequestHandler):
    """The page, the prediction route, and a clear error for everything else; one request per
    connection (HTTP/1.0), so a refused upload needs no resynchronising."""

    server_version = "agegender-serve"
    timeout = 60  # a client that stops sending mid-upload does not hold a thread for ever
    allow = ""
    body_read = False

    def do_GET(self):
        self.dispatch()

    do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def dispatch(self):
        try:
            answer = self.answer()
            if answer:
                self.send(*answer)
                if not self.body_read:
                    self.linger()
        except ConnectionError:
            pass  # the client went away: nobody to answer

    def answer(self):
        """(status, body, content type) for this request; None when the client went away."""
        try:
            if self.route() == "/":
                return HTTPStatus.OK, page_html(self.server.max_upload_bytes), PAGE_TYPE
            return self.json(HTTPStatus.OK, self.predict())
        except BadRequest as refusal:
            return self.json(refusal.status, {"error": str(refusal)})
        except ConnectionError:
            return None
        except Exception as error:  # the page shows it instead of a dropped connection
            self.log_error("prediction failed: %r", error)
            message = f"the prediction failed: {type(error).__name__}: {error}"
            return self.json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": message})

    def route(self):
        path, method = urlsplit(self.path).path, self.command
        if path not in ROUTES:
            raise BadRequest(
                HTTPStatus.NOT_FOUND,
                f"no such page: {path[:200]!r}; this server has only GET / (the page) "
                "and POST /predict (a photo's bytes as the body)",
            )
        self.allow = ROUTES[path]
        if method == self.allow or (method == "HEAD" and self.allow == "GET"):
            return path
        raise BadRequest(
            HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {self.allow} only, not {method}"
        )

    def predict(self):
        content_type = self.headers.get("Content-Type", "")
        body = self.read_body()
        image = decode_upload(body, content_type, self.server.max_upload_bytes)
        with self.server.lock:  # one model, one photo at a time
            faces = self.server.predictor.faces(image)
        return {"width": image.width, "height": image.height, "faces": faces}

    def read_body(self):
        """The body, refused before any of it is read when it is chunked, unsized or too big."""
        limit = self.server.max_upload_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise BadRequest(
                HTTPStatus.LENGTH_REQUIRED,
                "chunked uploads are not accepted: send the photo with a Content-Length",
            )
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest(
                HTTPStatus.LENGTH_REQUIRED, "send the photo with a Content-Length header"
            )
        if not length.strip().isdigit():
            raise BadRequest(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length[:40]!r}")
        if int(length) > limit:
            raise BadRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the upload is {int(length) / 2**20:.1f} MB; at most {limit / 2**20:g} MB "
                "is accepted (--max-upload-mb)",
            )
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            raise BadRequest(
                HTTPStatus.REQUEST_TIMEOUT,
                f"the upload stalled: nothing came for {self.timeout} s",
            ) from None
        self.body_read = True
        if len(body) < int(length):
            raise BadRequest(
                HTTPStatus.BAD_REQUEST, f"the upload stopped after {len(body)} of {length} bytes"
            )
        return body

    def linger(self, seconds=2, most=64 * 2**20):
        """Read and drop what a refused client is still sending, for a moment, so closing the
        socket on unread data does not reset the connection before the client reads the error."""
        length = self.headers.get("Content-Length", "0").strip()
        if length in ("", "0") and not self.headers.get("Transfer-Encoding"):
            return
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(seconds)
            deadline, dropped = time.monotonic() + seconds, 0
            while time.monotonic() < deadline and dropped < most:
                chunk = self.rfile.read1(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    @staticmethod
    def json(status, payload):
        return status, json.dumps(payload).encode("utf-8"), "application/json"

    def send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if content_type == PAGE_TYPE:
            self.send_header("Content-Security-Policy", PAGE_CSP)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, HEAD" if self.allow == "GET" else self.allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class WebServer(ThreadingHTTPServer):
    """The HTTP server holding the one loaded predictor the handlers share."""

    daemon_threads = True

    def __init__(self, predictor, host="127.0.0.1", port=8000, max_upload_bytes=10 * 2**20):
        super().__init__((host, port), Handler)
        self.predictor, self.max_upload_bytes = predictor, max_upload_bytes
        self.lock = threading.Lock()

    @property
    def url(self):
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/"


def positive_mb(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


SUMMARY = "a local web page (and POST /predict) to try the model on a photo"


def add_arguments(parser):
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; the page has no login)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    add_model_options(parser)
    parser.add_argument(
        "--max-upload-mb",
        type=positive_mb,
        default=10,
        help="largest photo accepted, in MB (default 10)",
    )


def open_server(predictor, host, port, max_upload_bytes):
    try:
        return WebServer(predictor, host, port, max_upload_bytes)
    except OSError as error:
        reason = "is in use" if error.errno == errno.EADDRINUSE else f"failed ({error.strerror})"
        raise PipelineError(
            f"listening on {host} port {port} {reason}: pick another with --port "
            "(0 takes any free port) or --host"
        ) from None


@exits_cleanly
def run(args):
    predictor = predictor_of_options(args)
    server = open_server(predictor, args.host, args.port, int(args.max_upload_mb * 2**20))
    if not server.server_address[0].startswith("127.") and server.server_address[0] != "::1":
        print(
            f"warning: listening on {args.host}: anyone who can reach it can use the page",
            file=sys.stderr,
        )
    print(f"Try a photo at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
