#!/usr/bin/env python3
"""A stand-in for the deployed flask-todo service, for the canary demo.

It generates synthetic traffic split between the stable and the canary
version by the current canary weight, and serves the cumulative counters the
canary's health check reads (docs/CANARY.md, "HTTP JSON counters"):

    GET  /stats            {"requests", "errors", "latency_buckets_ms", "weight"}
    POST /weight?value=N   set the canary's share of traffic (0..100); shift.sh calls it
    GET  /healthz          ok

usage: python3 examples/flask-todo/service.py [--port 9000] [--canary-error-rate 0.3]
       (--port 0 picks a free port and prints it)

With --canary-error-rate above the plan's rollback threshold (0.10) the
canary rolls the deployment back; the default is a healthy new version.
Standard library only.
"""
import argparse
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

BOUNDS_MS = [5, 10, 25, 50, 100, 250, 500, 1000]


class Traffic:
    """Cumulative counters since start, as a real service would export them."""

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.rng = random.Random(args.seed)
        self.weight = 0
        self.requests = 0
        self.errors = 0
        self.buckets = [0] * (len(BOUNDS_MS) + 1)

    def request(self):
        canary = self.rng.random() * 100 < self.weight
        rate = self.args.canary_error_rate if canary else self.args.error_rate
        latency = self.rng.expovariate(1.0 / self.args.latency_ms)
        with self.lock:
            self.requests += 1
            if self.rng.random() < rate:
                self.errors += 1
            for i, bound in enumerate(BOUNDS_MS):
                if latency <= bound:
                    self.buckets[i] += 1
                    break
            else:
                self.buckets[-1] += 1

    def run(self):
        tick = 0.05
        while True:
            for _ in range(max(1, round(self.args.rps * tick))):
                self.request()
            time.sleep(tick)

    def stats(self):
        with self.lock:
            cumulative, total = {}, 0
            for bound, count in zip(BOUNDS_MS + ["+Inf"], self.buckets):
                total += count
                cumulative[str(bound)] = total
            return {
                "requests": self.requests,
                "errors": self.errors,
                "latency_buckets_ms": cumulative,
                "weight": self.weight,
            }


def handler(traffic):
    class Handler(BaseHTTPRequestHandler):
        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = urlparse(self.path).path
            if path == "/stats":
                self.reply(200, traffic.stats())
            elif path == "/healthz":
                self.reply(200, {"status": "ok"})
            elif path == "/weight":
                self.reply(200, {"weight": traffic.weight})
            else:
                self.reply(404, {"error": f"no route {path}"})

        def do_POST(self):
            url = urlparse(self.path)
            if url.path != "/weight":
                self.reply(404, {"error": f"no route {url.path}"})
                return
            value = parse_qs(url.query).get("value", [""])[0]
            try:
                weight = int(value)
                if not 0 <= weight <= 100:
                    raise ValueError
            except ValueError:
                self.reply(400, {"error": f"value must be 0..100, got '{value}'"})
                return
            traffic.weight = weight
            print(f"service: canary weight {weight}%", file=sys.stderr, flush=True)
            self.reply(200, {"weight": weight})

        def log_message(self, *_):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--rps", type=float, default=200.0, help="synthetic requests per second")
    parser.add_argument("--error-rate", type=float, default=0.002, help="error share of the stable version")
    parser.add_argument("--canary-error-rate", type=float, default=0.002, help="error share of the canary")
    parser.add_argument("--latency-ms", type=float, default=12.0, help="mean latency")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    traffic = Traffic(args)
    threading.Thread(target=traffic.run, daemon=True).start()
    server = ThreadingHTTPServer((args.host, args.port), handler(traffic))
    # With --port 0 the system picks a free port; this line names it.
    host, port = server.server_address[:2]
    print(f"service: http://{host}:{port}/stats", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
