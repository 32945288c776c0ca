"""Requests per second and latency of `agegender serve` under concurrent clients: each client is a
thread with its own keep-alive connection POSTing a real photo to /predict, for at most
--requests each and --seconds in all. The model answers one photo at a time (Keras is not
re-entrant), so the figures say what waiting behind 31 others costs and that no request is lost
or refused under load. It starts the server in this process (uvicorn on a thread, the model
loaded once), or measures one already running at --url. Exits 1 if any request failed.
Run from the repository root after `dvc repro` (or with --model of any saved model):

    python bench/serve.py [--clients 32] [--requests 10] [--seconds 120] [--photo PATH]
        [--model models/model.keras] [--params params.yaml] [--weights data/weights] [--url URL]
"""

import argparse
import http.client
import os
import sys
import threading
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlsplit

import matplotlib

from agegender.apps.web import create_app, serving
from agegender.contracts.console import native_logs_hidden
from agegender.inference.predictor import add_model_options, predictor_of_options

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def post_photos(url, photo, count, deadline, results):
    """POST the photo up to `count` times before `deadline` on one connection, appending
    (status, seconds) to `results`; a broken connection counts as status "connection"."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    headers = {"Content-Type": "image/jpeg"}
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            connection.request("POST", "/predict", photo, headers)
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status = "connection"
            connection.close()
        results.append((status, time.perf_counter() - start))
    connection.close()


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def measure(url, photo, clients, requests, seconds):
    """(results, wall seconds) of `clients` threads posting the photo at once."""
    results, deadline = [], time.monotonic() + seconds
    threads = [
        threading.Thread(target=post_photos, args=(url, photo, requests, deadline, results))
        for _ in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10, help="per client, at most")
    parser.add_argument("--seconds", type=float, default=120, help="in all, at most")
    parser.add_argument("--photo", type=Path, default=GRACE_HOPPER)
    parser.add_argument("--url", help="a server already running (default: start one here)")
    add_model_options(parser)
    args = parser.parse_args()
    photo = args.photo.read_bytes()
    if args.url:
        running = nullcontext(args.url)
    else:
        predictor = predictor_of_options(args)
        running = serving(create_app(predictor, max(len(photo), 10 * 2**20)))
    with running as url:
        warm_up = []
        post_photos(url, photo, 2, time.monotonic() + 600, warm_up)  # traces the networks
        results, wall = measure(url, photo, args.clients, args.requests, args.seconds)
    latencies = [seconds for status, seconds in results if status == 200]
    errors = Counter(status for status, _ in results if status != 200)
    print(
        f"{args.photo.name} ({len(photo) / 1024:.0f} kB) to {args.url or args.model}, "
        f"{os.cpu_count()} cores, {args.clients} clients, {len(results)} requests in {wall:.1f} s"
    )
    print(f"{'answered':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7}  errors")
    print(
        f"{len(latencies):>8} {len(latencies) / wall:>7.2f} {percentile(latencies, 0.5):>7.2f} "
        f"{percentile(latencies, 0.95):>7.2f} {max(latencies, default=float('nan')):>7.2f}  "
        + (
            ", ".join(f"{status}: {count}" for status, count in sorted(errors.items(), key=str))
            or "none"
        )
    )
    return 1 if errors or not latencies or warm_up[-1][0] != 200 else 0


if __name__ == "__main__":
    with native_logs_hidden():  # TensorFlow's native start-up lines
        status = main()
    sys.exit(status)
