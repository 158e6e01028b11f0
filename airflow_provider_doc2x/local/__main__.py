"""Command line of the local Doc2X server: ``python -m airflow_provider_doc2x.local --port 8765``."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from airflow_provider_doc2x.local.config import ServerConfig
from airflow_provider_doc2x.local.connection import TransportInScope
from airflow_provider_doc2x.local.registry import ENGINES
from airflow_provider_doc2x.local.server import create_app

DESCRIPTION = """\
A local server that answers like the Doc2X v2 API. Images: the synchronous
parse, the async submit and its status, with the API's key check, 7 MB limit,
error codes and per-key rate limit (HTTP 429). PDFs: preupload, the presigned
PUT url, status with pages, the export to a Markdown zip, and the figure links.
It bills nothing real and needs no network: it is the backend of the tests,
of benchmarks and of offline work.

Point a doc2x connection's host at the URL it prints, with any key (or the one
--api-key names), e.g.:
  export AIRFLOW_CONN_DOC2X_DEFAULT='{"conn_type": "doc2x",
      "host": "http://127.0.0.1:8765", "password": "sk-local"}'
"""

EPILOG = """\
While it runs, the knobs above and more (fail_next, stall_next, quota, pickup_delay,
reset_next_uploads, ...) can be changed with POST /local/config, e.g.
  curl -X POST localhost:8765/local/config -d '{"upload_bandwidth": 200000}'
GET /local/stats shows what was billed per image and the load, and in keyless_routes
the requests to the presigned PUT, the export download and the CDN (and how many
of them carried an Authorization header or the key);
POST /local/reset starts over; /local/docs lists every endpoint.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line; defaults come from :class:`ServerConfig`."""
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="doc2x-local-server",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        default=8765,
        help="port to listen on; 0 picks a free one (the URL is printed at start) (default: %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="the only key accepted (default: any non-empty Bearer key)",
    )
    parser.add_argument(
        "--engine",
        default=defaults.engine,
        choices=sorted(ENGINES),
        help="what reads the images: 'simple' returns the text embedded in the image, at once; "
        "'ocr' runs real offline OCR and needs the ocr extra (default: %(default)s)",
    )
    parser.add_argument(
        "--processing-time",
        type=float,
        default=defaults.processing_time,
        metavar="SECONDS",
        help="how long an async job stays 'processing'; also the least a parse takes (default: %(default)s)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=defaults.latency,
        metavar="SECONDS",
        help="delay added before every API answer (default: %(default)s)",
    )
    parser.add_argument(
        "--error-rate",
        type=float,
        default=defaults.error_rate,
        metavar="SHARE",
        help="share of API calls answered with an HTML 502 page, 0 to 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        default=defaults.rate_limit,
        metavar="IMAGES",
        help="images a key may upload per rate window; more get HTTP 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-window",
        type=float,
        default=defaults.rate_window,
        metavar="SECONDS",
        help="length of the rolling rate window (default: %(default)s)",
    )
    parser.add_argument(
        "--result-ttl",
        type=float,
        default=defaults.result_ttl,
        metavar="SECONDS",
        help="how long a job's result can be fetched (default: %(default)s, 24 hours)",
    )
    parser.add_argument(
        "--upload-seconds",
        type=float,
        default=defaults.upload_seconds,
        metavar="SECONDS",
        help="how long each upload's body takes to arrive; 0 is at once (default: %(default)s)",
    )
    parser.add_argument(
        "--upload-bandwidth",
        type=float,
        default=defaults.upload_bandwidth,
        metavar="BYTES_PER_SECOND",
        help="rate at which each upload's body is read; 0 is unlimited (default: %(default)s)",
    )
    parser.add_argument(
        "--rate-counted-at",
        default=defaults.rate_counted_at,
        choices=["arrival", "answer"],
        help="when an upload enters the rate window: once its body arrived, or when it is answered, "
        "after the answer wait (default: %(default)s)",
    )
    parser.add_argument(
        "--answer-seconds",
        type=float,
        default=defaults.answer_seconds,
        metavar="SECONDS",
        help="how long an upload's answer takes after its body arrived (default: %(default)s)",
    )
    parser.add_argument(
        "--answer-jitter",
        type=float,
        default=defaults.answer_jitter,
        metavar="SECONDS",
        help="up to this many seconds more per answer, drawn at random (seeded) (default: %(default)s)",
    )
    parser.add_argument(
        "--echo-key",
        action="store_true",
        default=defaults.echo_key,
        help="quote the Authorization header a request carried in every error answer, as a careless "
        "server might (for tests that the key never reaches logs or files)",
    )
    parser.add_argument(
        "--ocr-threads",
        type=int,
        default=0,
        metavar="THREADS",
        help="onnxruntime threads of the ocr engine; 0 uses all cores (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start the server and serve until interrupted."""
    import uvicorn

    args = parse_args(argv)
    if args.ocr_threads:
        os.environ["DOC2X_OCR_THREADS"] = str(args.ocr_threads)
    config = ServerConfig(
        api_key=args.api_key,
        engine=args.engine,
        processing_time=args.processing_time,
        latency=args.latency,
        error_rate=args.error_rate,
        rate_limit=args.rate_limit,
        rate_window=args.rate_window,
        result_ttl=args.result_ttl,
        upload_seconds=args.upload_seconds,
        upload_bandwidth=args.upload_bandwidth,
        rate_counted_at=args.rate_counted_at,
        answer_seconds=args.answer_seconds,
        answer_jitter=args.answer_jitter,
        echo_key=args.echo_key,
    )
    app = create_app(config)
    # Bind first, so that --port 0 can print the port it got before serving.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"Doc2X local server ({config.engine} engine) listening on http://{host}:{port}", flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, http=TransportInScope, log_level=args.log_level, access_log=False)
    )
    server.run(sockets=[sock])
    sys.exit(0 if server.started else 1)


if __name__ == "__main__":
    main()
