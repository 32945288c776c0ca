"""A local web page and JSON API to try the model on a photo: choose or drop one, see the boxes,
gender and age drawn on it, and the JSON answer.

    agegender serve [--host 127.0.0.1] [--port 8000] [--model models/model.keras]
        [--params params.yaml] [--weights data/weights] [--max-upload-mb 10]

`GET /` is the page (one self-contained HTML file, no network needed); `POST /predict` takes a
photo, as the request body itself or as the file of a multipart form, and answers
`{"width", "height", "faces": [...]}`, the faces as `Predictor.faces` gives them, each with its
calibrated `age_range`; `GET /health` says which model answers; `/docs` and `/openapi.json`
describe the API (FastAPI, served by uvicorn). Anything else is a 404, a known route with the
wrong method a 405, and a bad upload a 4xx, each with a JSON `{"error": ...}` saying what was
wrong. The model is loaded once, at start. Uploads are decoded in memory and never written to
disk. It listens on loopback by default: it has no authentication, so bind another address only
on a network you trust. docs/api.md has examples.
"""

import argparse
import asyncio
import errno
import io
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from importlib import resources
from typing import Literal

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from agegender.contracts.errors import PipelineError, exits_cleanly
from agegender.inference.predictor import add_model_options, predictor_of_options, takes_chips

ACCEPTED = "a JPEG, PNG, WebP, BMP, GIF or TIFF photo (any image Pillow decodes)"
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src blob: data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'"
)
ROUTES = {  # path: the methods it takes, as the Allow header of a 405 names them
    "/": "GET, HEAD",
    "/predict": "POST",
    "/health": "GET",
    "/docs": "GET, HEAD",
    "/openapi.json": "GET, HEAD",
}
ROUTES_IN_WORDS = (
    "GET / (the page), POST /predict (a photo), GET /health, GET /docs (the API) "
    "and GET /openapi.json"
)


class FaceAnswer(BaseModel):
    face: int = Field(description="the face's index in the photo, most confident first")
    box: list[int] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels")
    confidence: float = Field(description="the face detector's (MTCNN) confidence")
    gender: Literal["male", "female"]
    gender_prob: float = Field(description="the probability of that gender")
    age: float = Field(description="the expected age, in years")
    age_range: tuple[float, float] = Field(
        description="the age range that holds the true age with the calibrated probability "
        "(params evaluate.age_range_level, default 0.9), calibrated on the validation split"
    )
    age_bin: str = Field(description="the age bin the expected age falls in, as `20-29`")
    most_likely_age_bin: str = Field(description="the bin holding the most probability")
    most_likely_age_bin_prob: float


class PredictResponse(BaseModel):
    width: int
    height: int
    faces: list[FaceAnswer]


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong and what to do")


class Health(BaseModel):
    status: Literal["ok"]
    model: str = Field(description="the model file answering")
    input: Literal["chip", "image"] = Field(
        description="what the network reads: dlib's aligned face chip, or the face crop"
    )
    age_range_level: float | None = Field(description="the age ranges' calibrated coverage")


BINARY = {"type": "string", "format": "binary"}
PHOTO_BODY = {  # the OpenAPI of /predict's body, which the route reads itself (see read_body)
    "required": True,
    "content": {
        "image/*": {"schema": BINARY},
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": BINARY}}},
    },
}
REFUSALS = {
    400: "an empty body, a bad Content-Length or a form without the photo",
    408: "the upload stalled",
    411: "no Content-Length (chunked uploads are not accepted)",
    413: "over --max-upload-mb, or too many pixels to decode safely",
    415: "not an image this server can read",
    500: "the prediction failed",
}


class BadRequest(HTTPException):
    """A request to refuse with `status_code` and a message for the person who sent it."""


def page_html(max_upload_bytes):
    html = resources.files("agegender.apps").joinpath("web_page.html").read_text(encoding="utf-8")
    return html.replace("__MAX_UPLOAD_BYTES__", str(max_upload_bytes))


def describe(body, content_type):
    """What was received, in words, so a refusal can say what the server saw."""
    kind = content_type or "no Content-Type"
    head = body[:16]
    shown = head.decode("ascii", "replace") if head.isascii() else head.hex(" ")
    return f"{len(body)} bytes of {kind}, starting {shown!r}"


def form_photo(body, content_type):
    """(bytes, what they are) of the photo in a multipart form, parsed in memory: the part named
    `file`, or the form's only part. python-multipart's own form reader would spool big files
    to disk; its bare parser hands over the bytes."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise BadRequest(400, "the multipart form has no boundary in its Content-Type")
    parts, header = [], (bytearray(), bytearray())  # each part: (its headers, its bytes)

    def header_end():
        parts[-1][0][bytes(header[0]).lower()] = bytes(header[1])
        for buffer in header:
            buffer.clear()

    callbacks = {
        "on_part_begin": lambda: parts.append(({}, bytearray())),
        "on_header_field": lambda data, start, end: header[0].extend(data[start:end]),
        "on_header_value": lambda data, start, end: header[1].extend(data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1][1].extend(data[start:end]),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as error:
        raise BadRequest(400, f"the multipart form could not be read ({error})") from None
    fields = {
        parse_options_header(headers.get(b"content-disposition", b""))[1]
        .get(b"name", b"")
        .decode("utf-8", "replace"): (headers, data)
        for headers, data in parts
    }
    if "file" not in fields and len(fields) != 1:
        raise BadRequest(
            400,
            f"the multipart form has the fields {sorted(fields)}: send the photo as the field "
            "`file`, or as the body itself",
        )
    name, (headers, data) = ("file", fields["file"]) if "file" in fields else fields.popitem()
    kind = headers.get(b"content-type", b"").decode("latin-1") or "no Content-Type"
    return bytes(data), f"{kind} in the form's field {name!r}"


def decode_upload(body, content_type, max_upload_bytes):
    """The photo in the body as an RGB image, decoded in memory the way the pipeline decodes."""
    from PIL import Image

    from agegender.facedata.images import ImageSkip, load_rgb

    if content_type.startswith("multipart/form-data"):
        body, content_type = form_photo(body, content_type)
    if not body:
        raise BadRequest(400, f"the body was empty: send {ACCEPTED}")
    try:
        return load_rgb(io.BytesIO(body))
    except ImageSkip as skip:
        if skip.reason == "too_large":
            raise BadRequest(
                413,
                "the image has too many pixels to decode safely "
                f"(over {Image.MAX_IMAGE_PIXELS / 1e6:g} megapixels): send a smaller photo",
            ) from None
        raise BadRequest(
            415,
            f"not an image this server can read: received {describe(body, content_type)}; "
            f"accepted is {ACCEPTED}, at most {max_upload_bytes / 2**20:g} MB.",
        ) from None


async def read_body(request, limit, read_timeout):
    """The body, refused before any of it is read when it is chunked, unsized or too big, and
    refused when nothing comes for `read_timeout` seconds: a client that stops sending does not
    hold the upload for ever."""
    if "chunked" in request.headers.get("transfer-encoding", "").lower():
        raise BadRequest(
            411, "chunked uploads are not accepted: send the photo with a Content-Length"
        )
    length = request.headers.get("content-length")
    if length is None:
        raise BadRequest(411, "send the photo with a Content-Length header")
    if not length.strip().isdigit():
        raise BadRequest(400, f"bad Content-Length {length[:40]!r}")
    if int(length) > limit:
        raise BadRequest(
            413,
            f"the upload is {int(length) / 2**20:.1f} MB; at most {limit / 2**20:g} MB "
            "is accepted (--max-upload-mb)",
        )
    body, chunks = bytearray(), request.stream()
    try:
        while True:
            async with asyncio.timeout(read_timeout):
                chunk = await anext(chunks, None)
            if chunk is None:
                break
            body += chunk
    except TimeoutError:
        raise BadRequest(408, f"the upload stalled: nothing came for {read_timeout:g} s") from None
    except ClientDisconnect:
        pass  # answered below, to nobody
    if len(body) < int(length):
        raise BadRequest(400, f"the upload stopped after {len(body)} of {length} bytes")
    return bytes(body)


class PrivateAnswers:
    """Every answer (errors and /docs too) is neither cached nor content-sniffed: a photo's
    answer is about that person."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_private(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Cache-Control", "no-store")
                headers.setdefault("X-Content-Type-Options", "nosniff")
            await send(message)

        await self.app(scope, receive, send_private if scope["type"] == "http" else send)


def error(status, message, headers=None):
    return JSONResponse({"error": message}, status, headers)


def refusal(request, problem):
    """FastAPI's 404, 405 and 422 as {"error": ...} saying what this server has."""
    path, method = request.url.path, request.method
    if problem.status_code == 404:
        return error(404, f"no such page: {path[:200]!r}; this server has {ROUTES_IN_WORDS}")
    if problem.status_code == 405 and path in ROUTES:
        allow = ROUTES[path]
        return error(405, f"{path} takes {allow} only, not {method}", {"Allow": allow})
    return error(problem.status_code, str(problem.detail), getattr(problem, "headers", None))


def create_app(predictor, max_upload_bytes, read_timeout=60, model_path=None):
    """The API around one loaded predictor, shared by every request: decoding runs in worker
    threads side by side, the model one photo at a time (Keras and MTCNN are not re-entrant)."""
    app = FastAPI(
        title="agegender",
        summary="Age and gender of the faces in a photo",
        redoc_url=None,
        redirect_slashes=False,
    )
    app.add_middleware(PrivateAnswers)
    app.add_exception_handler(HTTPException, refusal)
    app.add_exception_handler(
        RequestValidationError, lambda request, problem: error(422, str(problem.errors()))
    )
    model_lock, page = threading.Lock(), page_html(max_upload_bytes)
    level = (predictor.age_range or {}).get("level")

    def answer(body, content_type):
        image = decode_upload(body, content_type, max_upload_bytes)
        with model_lock:
            faces = predictor.faces(image)
        return {"width": image.width, "height": image.height, "faces": faces}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def the_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={
            status: {"model": ErrorResponse, "description": why} for status, why in REFUSALS.items()
        },
        openapi_extra={"requestBody": PHOTO_BODY},
    )
    async def predict(request: Request):
        """The faces in a photo: its bytes as the body, or the file `file` of a multipart form;
        at most --max-upload-mb."""
        body = await read_body(request, max_upload_bytes, read_timeout)
        try:
            return await run_in_threadpool(answer, body, request.headers.get("content-type", ""))
        except BadRequest:
            raise
        except Exception as failure:  # the page shows it instead of a dropped connection
            print(f"prediction failed: {failure!r}", file=sys.stderr)
            return error(500, f"the prediction failed: {type(failure).__name__}: {failure}")

    @app.get("/health", response_model=Health)
    def health():
        """Which model answers; 200 once it is loaded."""
        model = str(model_path) if model_path else predictor.model.name
        kind = "chip" if takes_chips(predictor.model) else "image"
        return Health(status="ok", model=model, input=kind, age_range_level=level)

    return app


def listening_socket(host, port):
    """A socket listening on host:port, or one paragraph on why not: bound here, not by
    uvicorn, which exits the process on a busy port."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as failure:
        reason = (
            "is in use" if failure.errno == errno.EADDRINUSE else f"failed ({failure.strerror})"
        )
        raise PipelineError(
            f"listening on {host} port {port} {reason}: pick another with --port "
            "(0 takes any free port) or --host"
        ) from None


def url_of(sock):
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def uvicorn_server(app, log_config=None):
    """uvicorn quiet (no access log) on h11, which reads and drops the rest of an upload refused
    early, so the client still reads its 413 instead of a reset connection."""
    import uvicorn

    options = {} if log_config is None else {"log_config": log_config}
    config = uvicorn.Config(
        app,
        http="h11",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        headers=[("Server", "agegender-serve")],
        **options,
    )
    return uvicorn.Server(config)


@contextmanager
def serving(app, host="127.0.0.1", port=0):
    """The app served on a thread while the block runs (tests, bench/serve.py): yields its URL."""
    sock = listening_socket(host, port)
    server = uvicorn_server(app, log_config={"version": 1, "disable_existing_loggers": False})
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    if not server.started:
        sock.close()
        raise RuntimeError("uvicorn stopped before it started: see its log above")
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


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


@exits_cleanly
def run(args):
    predictor = predictor_of_options(args)
    app = create_app(predictor, int(args.max_upload_mb * 2**20), model_path=args.model)
    sock = listening_socket(args.host, args.port)
    host = sock.getsockname()[0]
    if not host.startswith("127.") and host != "::1":
        print(
            f"warning: listening on {args.host}: anyone who can reach it can use the page",
            file=sys.stderr,
        )
    url = url_of(sock)
    print(f"Try a photo at {url} (API docs at {url}docs; Ctrl-C to stop)", flush=True)
    try:
        uvicorn_server(app).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops gracefully, then raises the Ctrl-C again
        pass
    finally:
        sock.close()
    return 0
