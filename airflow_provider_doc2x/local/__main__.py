"""Command line of the local Doc2X server: ``python -m airflow_provider_doc2x.local --port 8765``."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from airflow_provider_doc2x.local.registry import ENGINES
from airflow_provider_doc2x.local.server import ServerConfig, create_app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="doc2x-local-server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed at start)")
    parser.add_argument("--api-key", default=None, help="the only key accepted (default: any non-empty key)")
    parser.add_argument("--engine", default=defaults.engine, choices=sorted(ENGINES))
    parser.add_argument("--processing-time", type=float, default=defaults.processing_time)
    parser.add_argument("--latency", type=float, default=defaults.latency)
    parser.add_argument("--error-rate", type=float, default=defaults.error_rate)
    parser.add_argument("--rate-limit", type=int, default=defaults.rate_limit)
    parser.add_argument("--rate-window", type=float, default=defaults.rate_window)
    parser.add_argument("--result-ttl", type=float, default=defaults.result_ttl)
    parser.add_argument(
        "--ocr-threads", type=int, default=0, help="onnxruntime threads of the ocr engine (0: all cores)"
    )
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
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
    )
    app = create_app(config)
    # Bind first, so that --port 0 can print the port it got before serving.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"Doc2X local server ({config.engine} engine) listening on http://{host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))
    server.run(sockets=[sock])
    sys.exit(0 if server.started else 1)


if __name__ == "__main__":
    main()
