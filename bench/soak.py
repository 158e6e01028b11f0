"""
A soak with random faults: many images through both lanes and incremental re-runs, faults drawn
from a seed, and afterwards the invariants that say no paid result was dropped, confused or bought
twice.

    python bench/soak.py                                   # 2 seeds of 40 images, both lanes (minutes)
    python bench/soak.py --seeds 10 --images 300           # the full run: 10 seeds of 300 images ...
    python bench/soak.py --seeds 2 --images 1000 --seed-base 100   # ... and two of 1,000
    python bench/soak.py --seed-base 7 --seeds 1 --images 300 --lanes pdf   # replay one run

Each run (one seed) starts a fresh local Doc2X server, with the fault proxy of
``tests/helpers/s3.py`` in front of it, and a fresh bucket on moto's S3 server behind another such
proxy (both started once per soak). It writes ``--images`` small PNG and JPEG pages with known text
(:mod:`airflow_provider_doc2x.local.samples`) under ``s3://<bucket>/src/<lane>/`` for each lane, and
runs :class:`~airflow_provider_doc2x.operators.doc2x.Doc2XImageParseOperator` over them as Airflow
would: ``method="async"`` and ``method="pdf"``, results to ``s3://<bucket>/lake/<lane>``,
``incremental=True`` (unless ``--no-incremental``), deferrable or not (drawn), each try of the task
with the same task state store (a JSON file, so that tries in several processes share it), up to
``--tries`` tries while a try fails with an error Airflow retries. Then it re-runs a new task over
the same images plus a few renamed copies of parsed ones.

Faults, each drawn from the seed per lane (counted as they were injected, by kind):

- ``doc2x_5xx``: HTML 503 pages for the next calls (``fail_next``) and a share of 502s (``error_rate``);
- ``reset_before_body``: uploads cut by a TCP reset before their body arrived (``reset_next_uploads``);
- ``reset_after_body``: uploads (image submits, PDF PUTs) that Doc2X received, and billed, whose
  answer the proxy drops with a reset;
- ``malformed_status``: images whose status answers stay malformed (``malformed_status``): they
  must end named with ``protocol_error``, the others stored;
- ``malformed_answer``: status answers replaced by the proxy with truncated JSON, wrong types or an
  HTML page, now and then;
- ``stall``: an upload answered after the connection's timeout (``stall_next``);
- ``s3_503``: ``503 SlowDown`` for some GETs, PUTs and HEADs of the sources and the results;
- ``slow_listing``: listings held back;
- ``worker_killed``: a try run in a child process, SIGKILLed mid-upload; the next try uses the same
  task state store;
- ``triggerer_restart``: the deferred task's trigger run in a child process, SIGKILLed while it
  polls, then run again from the same kwargs.

The invariants, checked and counted after each task:

- every image ends parsed with its own content (the stored Markdown is the text it was generated
  with, or the local engine's line for its pixels), or named with its code in the task's error;
- no image is billed twice (the local server's billing per content hash) unless a log line names it
  (its source, or the PDF holding it) "possibly billed twice";
- nothing is stored under another image's name: every sidecar's ``sha256`` is its source's, the
  folder's name carries that hash, and the Markdown beside it is that content's;
- a re-run bills nothing for an image parsed before (renamed copies included).

The seed of every run, the faults by kind and the invariant counts are printed; the exit status is
1 if an invariant failed, with the command that replays each failing run. ``--json PATH`` writes
the same figures as JSON. Timings are not checked.

``PDF_PICKUP_GRACE_SECONDS`` is set to 2 s (the local server picks PDFs up in 0.2 s; Doc2X in up
to 20 s) and the provider's storage back-off starts at 0.1 s, so that a run takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")

API_KEY = "sk-soak-0123"
LANES = ("async", "pdf")
FAULT_KINDS = (
    "doc2x_5xx",
    "reset_before_body",
    "reset_after_body",
    "malformed_status",
    "malformed_answer",
    "stall",
    "s3_503",
    "slow_listing",
    "worker_killed",
    "triggerer_restart",
)
#: Seconds the connection waits for an answer: a stalled upload waits longer.
CONNECTION_TIMEOUT = 3.0
PICKUP_GRACE_SECONDS = 2.0
SIZES = ((320, 240), (240, 320))
WORDS = [
    "archive",
    "ledger",
    "invoice",
    "manifest",
    "parcel",
    "receipt",
    "contract",
    "letter",
    "memo",
    "report",
    "schedule",
    "folio",
    "harbour",
    "northern",
    "quarterly",
    "consignment",
    "sealed",
    "counted",
    "annex",
    "appendix",
    "clause",
    "register",
]


def tune_provider() -> None:
    """Shorten the waits that are sized for Doc2X's service, not for the local server (see the docstring)."""
    from airflow_provider_doc2x import protocol
    from airflow_provider_doc2x.storage import objects as storage

    protocol.PDF_PICKUP_GRACE_SECONDS = PICKUP_GRACE_SECONDS  # read through the package by pdf.submission
    storage.STORAGE_WAIT_INITIAL = 0.1


# -- the task state store, shared by the tries of a task in any process ---------------------------------


class FileStore:
    """The task state store's ``get``/``set`` in a JSON file; every ``set`` is also appended to a journal.

    Tries of one task run in several processes (a killed worker, the next try); they share this
    file as Airflow's tries share the task state store. The journal keeps every value ever set, so
    that a PDF named in a log line can be mapped to its pages afterwards.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.journal = self.path.with_suffix(".journal")
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._read().get(key, default)

    def set(self, key: str, value: Any, **_: Any) -> None:
        line = json.dumps({"key": key, "value": value})  # what the real store accepts: JSON
        with self._lock:
            values = self._read()
            values[key] = value
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(values))
            os.replace(temporary, self.path)
            with self.journal.open("a") as journal:
                journal.write(line + "\n")

    def history(self) -> list[tuple[str, Any]]:
        if not self.journal.exists():
            return []
        return [
            (item["key"], item["value"]) for item in map(json.loads, self.journal.read_text().splitlines())
        ]


# -- images -------------------------------------------------------------------------------------------


@dataclass
class Image:
    """One generated image: where it is, its bytes' hashes, and the Markdown that is its own content."""

    uri: str
    key: str
    data: bytes
    sha256: str
    #: The local server bills a PDF page of a PNG under its pixels' hash, a JPEG under its bytes'.
    billing_keys: frozenset[str]
    #: Its own content: the text it carries (image API, a JPEG in a PDF), or its pixels' line (a PNG in a PDF).
    texts: frozenset[str]


def draw_image(rng: random.Random, title: str) -> tuple[bytes, str]:
    """A page with known text: PNG or JPEG, one of two sizes (two aspect ratios for the PDF lane)."""
    from airflow_provider_doc2x.local.samples import Page, render

    fmt = rng.choice(("PNG", "JPEG"))
    paragraph = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
    data = render(Page(title=title, paragraphs=[paragraph]), fmt=fmt, size=rng.choice(SIZES))
    return data, "png" if fmt == "PNG" else "jpg"


def describe(uri: str, key: str, data: bytes) -> Image:
    from airflow_provider_doc2x.local.engines import embedded_text, fallback_text, open_image, pixels_sha256

    picture = open_image(data)
    sha256 = hashlib.sha256(data).hexdigest()
    keys = {sha256} if picture.format == "JPEG" else {sha256, pixels_sha256(picture)}
    texts = {embedded_text(picture).strip(), fallback_text(picture)}
    return Image(uri, key, data, sha256, frozenset(keys), frozenset(text for text in texts if text))


def norm(markdown: str) -> str:
    return markdown.strip()


# -- the invariants' counts -----------------------------------------------------------------------------


@dataclass
class Tally:
    """What one task's check found; ``problems`` are the invariant failures, each in a line."""

    images: int = 0
    parsed: int = 0
    named: Counter = field(default_factory=Counter)  # code -> images named with it
    billed_twice_named: int = 0
    rerun_billed: int = 0
    sidecars: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.images += other.images
        self.parsed += other.parsed
        self.named.update(other.named)
        self.billed_twice_named += other.billed_twice_named
        self.rerun_billed += other.rerun_billed
        self.sidecars += other.sidecars
        self.problems += other.problems


INVARIANTS = {
    "lost": "images neither parsed with their own content nor named with a code",
    "billed_twice": "images billed twice without 'possibly billed twice' naming them",
    "misplaced": "results stored under another image's name (sidecar sha256, folder, Markdown)",
    "rerun_billed": "images parsed before and billed again by a re-run",
}


# -- one soak -------------------------------------------------------------------------------------------


class Soak:
    """Moto's server and its proxy, for every run of this soak; the runs' figures."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        from tests.helpers.s3 import FaultProxy, MotoServer

        self.args = args
        self.scratch = scratch
        self.moto = MotoServer()
        self.s3proxy = FaultProxy(self.moto.port)
        self.faults: Counter = Counter()
        self.tally = Tally()
        self.failed_runs: list[tuple[int, str]] = []
        self.runs: list[dict[str, Any]] = []

    def stop(self) -> None:
        with quiet_asyncio():
            self.s3proxy.stop()
        self.moto.stop()

    def run(self, seed: int) -> None:
        for lane in self.args.lanes:
            run = Run(self, seed, lane)
            try:
                run.go()
            finally:
                run.stop()
            self.faults.update(run.faults)
            self.tally.add(run.tally)
            self.runs.append(run.summary())
            if run.tally.problems:
                self.failed_runs.append((seed, lane))


class Run:
    """One seed through one lane: a fresh Doc2X server and bucket, a first task with faults, a re-run."""

    def __init__(self, soak: Soak, seed: int, lane: str) -> None:
        from airflow_provider_doc2x.local.process import LocalServerProcess
        from tests.helpers.s3 import UNSET, FaultProxy, forget_filesystems, s3_environment

        self.soak, self.seed, self.lane, self.args = soak, seed, lane, soak.args
        self.rng = random.Random(f"{seed}/{lane}")
        #: When a process is killed: apart, so that the plan drawn from ``rng`` never depends on timing.
        self.timing = random.Random(f"{seed}/{lane}/timing")
        self.dir = soak.scratch / f"seed-{seed}-{lane}"
        self.dir.mkdir(parents=True)
        self.log = self.dir / "task.log"
        self.faults: Counter = Counter()
        self.tally = Tally()
        self.notes: list[str] = []
        self.doc2x = LocalServerProcess(
            "--processing-time", "0.2", "--rate-limit", "1000000", "--rate-window", "1", api_key=API_KEY
        )
        self.doc2x.configure(
            seed=seed, pickup_delay=0.2, pdf_page_seconds=0, pdf_page_workers=4, export_seconds=0.1
        )
        self.proxy = FaultProxy(int(self.doc2x.url.rsplit(":", 1)[1]))
        self.bucket = f"soak-{seed}-{lane}-{self.rng.getrandbits(32):08x}"
        config_dir = self.dir / "aws-config"
        config_dir.mkdir()
        for name in UNSET:
            os.environ.pop(name, None)
        os.environ.update(s3_environment(soak.s3proxy.url, config_dir))
        os.environ["AIRFLOW_CONN_DOC2X_DEFAULT"] = json.dumps(
            {
                "conn_type": "doc2x",
                "host": self.proxy.url,
                "password": API_KEY,
                "extra": {
                    "timeout": CONNECTION_TIMEOUT,
                    "retry_wait": 0.05,
                    "retry_wait_max": 0.5,
                    "rate_limit_images": 1_000_000,
                    "rate_limit_window": 1,
                    "max_concurrent_uploads": 4,
                },
            }
        )
        os.environ["DOC2X_PACING_DIR"] = str(self.dir / "pacing")
        forget_filesystems()
        self.s3 = self.client(soak.moto.url)  # beside the code under test: no fault, not logged
        self.s3.create_bucket(Bucket=self.bucket)
        self.lake = f"s3://{self.bucket}/lake/{lane}"
        self.images: list[Image] = []
        self.by_uri: dict[str, Image] = {}
        self.by_sha: dict[str, Image] = {}

    @staticmethod
    def client(endpoint: str) -> Any:
        from tests.helpers.s3 import s3_client

        return s3_client(endpoint)

    def stop(self) -> None:
        with quiet_asyncio():  # the proxy's keep-alive connections end with it
            self.proxy.stop()
        self.doc2x.stop()
        self.soak.s3proxy.clear()
        if not self.tally.problems and not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- set-up

    def put(self, key: str, data: bytes) -> Image:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data)
        image = describe(f"s3://{self.bucket}/{key}", key, data)
        self.by_uri[image.uri] = image
        self.by_sha.setdefault(image.sha256, image)
        return image

    def make_images(self) -> None:
        """Distinct pages: a page whose billing key another page has already is drawn again.

        Two renderings can share their pixels (the local server bills a PNG in a PDF by its pixels),
        and the server would then rightly bill them as one page, twice: not a fault of the client's.
        """
        taken: set[str] = set()
        for number in range(self.args.images):
            while True:
                data, ext = draw_image(self.rng, f"Soak {self.seed} {self.lane} page {number}")
                keys = describe("", "", data).billing_keys
                if not keys & taken:
                    break
            taken |= keys
            self.images.append(self.put(f"src/{self.lane}/page-{number:05d}.{ext}", data))

    # -- faults

    def draw_faults(self, *, doc2x: bool) -> dict[str, Any]:
        """Arm this task's faults, drawn from the seed; return what to count afterwards."""
        from airflow_provider_doc2x import protocol

        rng, s3proxy, bucket = self.rng, self.soak.s3proxy, self.bucket
        s3proxy.clear()
        armed: dict[str, Any] = {"rules": defaultdict(list), "server": {}}
        for _ in range(rng.randint(1, 4)):
            method = rng.choice(("GET", "PUT", "HEAD"))
            where = rng.choice((f"src/{self.lane}/", f"lake/{self.lane}/", f"lake/{self.lane}/_manifest"))
            times = rng.choice((1, 1, 2, 3, 6))  # 6 outlasts s3fs's own retries
            armed["rules"]["s3_503"].append(s3proxy.slow_down(method, f"^/{bucket}/{where}", times=times))
        if rng.random() < 0.7:
            armed["rules"]["slow_listing"].append(
                s3proxy.delay(
                    "GET", f"^/{bucket}/?$", rng.uniform(0.2, 1.0), times=rng.randint(1, 6), query="list-type"
                )
            )
        if not doc2x:
            return armed
        upload = protocol.SUBMIT_PATH if self.lane == "async" else r"^/local/oss/tmp/"
        upload_method = "POST" if self.lane == "async" else "PUT"
        status = protocol.STATUS_PATH if self.lane == "async" else protocol.PDF_STATUS_PATH
        server = {
            "fail_next": rng.randint(0, 3),
            "error_rate": rng.choice((0.0, 0.0, 0.02, 0.05)),
            "reset_next_uploads": rng.randint(0, 2),
            "reset_after_bytes": 1024,
            "stall_next": rng.randint(0, 1),
            "stall_seconds": CONNECTION_TIMEOUT + 1,
        }
        chosen = rng.sample(
            self.images, k=min(len(self.images), rng.randint(0, max(1, len(self.images) // 40)))
        )
        server["malformed_status"] = sorted({key for image in chosen for key in image.billing_keys})
        armed["malformed"] = {image.uri for image in chosen}
        try:
            self.doc2x.configure(**server)
        except Exception:  # a local server without the knob: no image's status stays malformed
            self.notes.append("this local server has no malformed_status knob: not injected")
            armed["malformed"] = set()
            del server["malformed_status"]
            self.doc2x.configure(**server)
        armed["server"] = server
        for _ in range(rng.randint(0, 2)):
            armed["rules"]["reset_after_body"].append(
                self.proxy.reset(upload_method, upload, times=1, after_upstream=True)
            )
        for _ in range(rng.randint(0, 3)):
            kind = rng.choice(("truncated", "wrong_types", "not_json"))
            armed["rules"]["malformed_answer"].append(
                self.proxy.malformed("GET", f"^{status}$", kind, times=1, after_upstream=rng.random() < 0.5)
            )
        return armed

    def count_faults(self, armed: dict[str, Any]) -> None:
        """Count the faults that hit: rule hits, the knobs used up, the error pages the proxy saw."""
        for kind, rules in armed["rules"].items():
            self.faults[kind] += sum(rule.hits for rule in rules)
        server = armed["server"]
        if server:
            left = self.doc2x.client.get("/local/config").json()
            self.faults["stall"] += server["stall_next"] - left["stall_next"]
            self.faults["reset_before_body"] += self.doc2x.stats()["uploads_reset"] - armed.get(
                "resets_before", 0
            )
            self.faults["doc2x_5xx"] += sum(
                1 for entry in self.proxy.requests() if entry.status in (502, 503) and entry.fault is None
            )
            self.faults["malformed_status"] += len(armed["malformed"])

    def quiet(self) -> None:
        """No Doc2X fault from now on (the re-run's): the knobs back, the proxy's rules gone."""
        knobs = {
            "fail_next": 0,
            "error_rate": 0.0,
            "reset_next_uploads": 0,
            "stall_next": 0,
            "upload_seconds": 0,
        }
        if "malformed_status" in self.doc2x.client.get("/local/config").json():
            knobs["malformed_status"] = []
        self.doc2x.configure(**knobs)
        self.proxy.clear()

    # -- a task and its tries

    def go(self) -> None:
        # The plan first: the same for a seed and lane whatever the number of images.
        deferrable = self.rng.random() < 0.5
        pdf_max_pages = self.rng.choice((8, 16, 50))
        kill = self.rng.random() < self.args.kill_share
        restart = deferrable and self.rng.random() < self.args.restart_share
        self.make_images()
        print(
            f"seed {self.seed} lane {self.lane}: {len(self.images)} images, "
            f"{'deferrable' if deferrable else 'worker waits'}, pdf_max_pages {pdf_max_pages}",
            flush=True,
        )
        armed = self.draw_faults(doc2x=True)
        armed["resets_before"] = self.doc2x.stats()["uploads_reset"]
        sources = [image.uri for image in self.images]
        first = Task(self, "first", sources, deferrable=deferrable, pdf_max_pages=pdf_max_pages)
        before = self.doc2x.stats()
        outcome = first.run(kill=kill, restart=restart)
        self.count_faults(armed)
        self.quiet()
        billed = self.billed_between(before, self.doc2x.stats())
        parsed = self.check_task(first, outcome, self.images)
        self.check_billing(first, billed)
        self.check_lake()

        # The re-run: a new task (a new task state store) over the same images and renamed copies.
        copies = []
        for number, image in enumerate(self.rng.sample(parsed, k=min(len(parsed), 5))):
            ext = image.key.rsplit(".", 1)[1]
            copies.append(self.put(f"src/{self.lane}/copies/copy-{number:03d}.{ext}", image.data))
        armed = self.draw_faults(doc2x=False)
        rerun = Task(
            self,
            "rerun",
            sources + [image.uri for image in copies],
            deferrable=self.rng.random() < 0.5,
            pdf_max_pages=pdf_max_pages,
        )
        before = self.doc2x.stats()
        outcome = rerun.run()
        self.count_faults(armed)
        billed = self.billed_between(before, self.doc2x.stats())
        self.check_task(rerun, outcome, self.images + copies)
        parsed_before = {image.sha256 for image in parsed}
        for image in self.images:
            count = sum(billed.get(key, 0) for key in image.billing_keys)
            if image.sha256 in parsed_before and count:
                self.tally.rerun_billed += 1
                self.problem(
                    "rerun_billed", f"{image.uri} was parsed by the first task; the re-run billed it {count}x"
                )
            elif count > 1:
                self.problem(
                    "billed_twice",
                    f"{image.uri} (not parsed by the first task) billed {count}x by the re-run",
                )
        self.check_lake()

    def problem(self, invariant: str, text: str) -> None:
        self.tally.problems.append(f"[{invariant}] seed {self.seed} lane {self.lane}: {text}")

    @staticmethod
    def billed_between(before: dict[str, Any], after: dict[str, Any]) -> Counter:
        billed: Counter = Counter()
        for name in ("billed", "pdf_billed"):
            billed.update(after.get(name, {}))
            billed.subtract(before.get(name, {}))
        return billed

    # -- the checks

    def read(self, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def sidecars(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Every result under the lake, by the sha256 its sidecar records: (folder key, sidecar)."""
        found: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"lake/{self.lane}/"
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"]
                relative = key[len(f"lake/{self.lane}/") :]
                if relative.startswith("_") or relative.count("/") != 1 or not key.endswith(".json"):
                    continue
                try:
                    meta = json.loads(self.read(key) or b"")
                except ValueError:
                    continue
                if isinstance(meta, dict) and "sha256" in meta and "markdown" in meta:
                    found[meta["sha256"]].append((key.rsplit("/", 1)[0], meta))
        return found

    def stored_markdown(self, folder: str, meta: dict[str, Any]) -> str | None:
        data = self.read(f"{folder}/{meta['markdown']}")
        return None if data is None else data.decode("utf-8", "replace")

    def check_lake(self) -> None:
        """Nothing under another image's name: each sidecar's hash is its source's, its folder's, its Markdown's."""
        for sha256, entries in self.sidecars().items():
            for folder, meta in entries:
                self.tally.sidecars += 1
                name = folder.rsplit("/", 1)[1]
                source = self.by_uri.get(str(meta.get("source")))
                expected = self.by_sha.get(sha256)
                markdown = self.stored_markdown(folder, meta)
                if source is None or source.sha256 != sha256:
                    self.problem(
                        "misplaced",
                        f"{folder}: sidecar sha256 {sha256[:12]} is not its source's ({meta.get('source')})",
                    )
                elif not (name.endswith("-" + sha256[:12]) or name.endswith("-" + sha256)):
                    self.problem(
                        "misplaced", f"{folder}: the folder's name does not carry its sha256 {sha256[:12]}"
                    )
                elif expected is None or markdown is None or norm(markdown) not in expected.texts:
                    self.problem("misplaced", f"{folder}: its Markdown is not {meta.get('source')}'s content")

    def check_task(self, task: Task, outcome: Outcome, images: list[Image]) -> list[Image]:
        """Every image parsed with its own content, or named with its code; return the parsed ones."""
        results = self.sidecars()
        by_source = {record.get("source"): record for record in outcome.records}
        parsed = []
        for image in images:
            self.tally.images += 1
            code = outcome.named.get(image.uri)
            if code is not None:
                self.tally.named[code] += 1
                if outcome.error is None:
                    self.problem("lost", f"{image.uri} is named with {code} in a task that succeeded")
                continue
            record = by_source.get(image.uri) if outcome.error is None else None
            if outcome.error is None and record is None:
                self.problem("lost", f"{image.uri}: the task succeeded without a record of it")
                continue
            if record is not None:
                folder = str(record.get("sidecar_path", "")).rsplit("/", 1)[0]
                key = re.sub(r"^s3://(?:[^@/]*@)?[^/]+/", "", folder)
                entries = [entry for entry in results.get(image.sha256, []) if entry[0] == key]
            else:
                entries = results.get(image.sha256, [])
            good = [entry for entry in entries if norm(self.stored_markdown(*entry) or "") in image.texts]
            if record is not None and "markdown" in record and norm(record["markdown"]) not in image.texts:
                good = []
            if good:
                self.tally.parsed += 1
                parsed.append(image)
            elif outcome.error is None:
                self.problem(
                    "lost", f"{image.uri}: its record points at no result of its own content ({record})"
                )
            else:
                self.problem("lost", f"{image.uri}: neither stored nor named in the task's error")
        return parsed

    def check_billing(self, task: Task, billed: Counter) -> None:
        """No image billed twice unless a log line names it (or its PDF) 'possibly billed twice'."""
        named = task.named_possibly_billed_twice(self.images)
        for image in self.images:
            count = sum(billed.get(key, 0) for key in image.billing_keys)
            if count <= 1:
                continue
            if image.uri in named:
                self.tally.billed_twice_named += 1
            else:
                self.problem(
                    "billed_twice",
                    f"{image.uri} billed {count}x; no log line names it 'possibly billed twice'",
                )

    def summary(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "lane": self.lane,
            "images": len(self.images),
            "faults": dict(self.faults),
            "notes": self.notes,
            "problems": self.tally.problems,
        }


@dataclass
class Outcome:
    """How a task ended: its records, or its last try's error and the images that error names (uri -> code)."""

    records: list[dict[str, Any]]
    error: str | None
    named: dict[str, str]
    tries: int


class Task:
    """One Airflow task over ``sources``: tries that share a task state store, each resumed as Airflow would."""

    def __init__(
        self, run: Run, label: str, sources: list[str], *, deferrable: bool, pdf_max_pages: int
    ) -> None:
        self.run_, self.label, self.sources = run, label, sources
        self.store = FileStore(run.dir / f"{label}-state.json")
        self.log = run.dir / f"{label}.log"
        self.kwargs = {
            "image_path": sources,
            "output_path": run.lake,
            "method": run.lane,
            "deferrable": deferrable,
            "incremental": run.args.incremental,
            "poll_interval": 0.05,
            "timeout": 120.0,
            "pdf_max_pages": pdf_max_pages,
        }

    def operator(self) -> Any:
        return make_operator(self.kwargs)

    def run(self, *, kill: bool = False, restart: bool = False) -> Outcome:
        from airflow.providers.common.compat.sdk import AirflowFailException

        from tests.helpers.s3 import forget_filesystems

        run = self.run_
        error: BaseException | None = None
        for number in range(1, run.args.tries + 1):
            forget_filesystems()  # each try is a new process of its own, as in Airflow
            if kill and number == 1:
                self.killed_try()
                continue
            try:
                restart_now, restart = restart, False  # one triggerer restart per task
                records = self.one_try(restart=restart_now)
            except Exception as failure:  # what Airflow would see: the try failed
                error = failure
                first_line = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
                run.notes.append(f"{self.label} try {number}: {type(failure).__name__}: {first_line[:120]}")
                with self.log.open("a") as handle:
                    handle.write(
                        f"\n=== {self.label} try {number} failed: {type(failure).__name__}: {failure}\n"
                    )
                if isinstance(failure, AirflowFailException):
                    break
                continue
            run.notes.append(f"{self.label} try {number}: {len(records)} records")
            return Outcome(records, None, {}, number)
        text = f"{type(error).__name__}: {error}" if error is not None else "no try finished"
        return Outcome([], text, named_in(text, self.sources), run.args.tries)

    @contextlib.contextmanager
    def captured(self):
        """Everything the try logs (structlog, logging, prints) goes to the task's log file."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with self.log.open("ab") as handle:
            os.dup2(handle.fileno(), 1)
            os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])

    def one_try(self, *, restart: bool) -> list[dict[str, Any]]:
        """One try: execute, and while it defers, its trigger (restarted once if asked) and its resumption."""
        from airflow.providers.common.compat.sdk import TaskDeferred

        context = {"task_state_store": self.store}
        operator = self.operator()
        call = lambda: operator.execute(context)  # noqa: E731
        while True:
            try:
                with self.captured():
                    return call()
            except TaskDeferred as deferred:
                classpath, kwargs = deferred.trigger.serialize()
                if restart:
                    event = self.restarted_trigger(classpath, kwargs)
                    restart = False
                else:
                    with self.captured():
                        event = asyncio.run(first_event(build_trigger(classpath, kwargs)))
                resumed = self.operator()  # the task resumes in another process: a new operator
                method = getattr(resumed, deferred.method_name)
                call = lambda method=method, event=event: method(context, event)  # noqa: E731

    def child(self, spec: dict[str, Any]) -> subprocess.Popen:
        path = self.run_.dir / f"child-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(spec))
        with self.log.open("ab") as handle:
            return subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--child", str(path)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=os.environ.copy(),
            )

    def killed_try(self) -> None:
        """A try in a child process, SIGKILLed once an upload is in flight (its bodies arrive slowly)."""
        run = self.run_
        doc2x = run.doc2x
        doc2x.configure(upload_seconds=1.0)
        # Killed once this many uploads have started and one is in flight (a PDF lane task has few PUTs).
        after = run.timing.randint(0, 3 if run.lane == "async" else 1)
        started = sum(doc2x.stats()["requests"].get(name, 0) for name in ("submit", "put"))
        child = self.child({"kind": "try", "operator": self.kwargs, "store": str(self.store.path)})
        killed = False
        deadline = time.monotonic() + 300
        try:
            while child.poll() is None and time.monotonic() < deadline:
                stats = doc2x.stats()
                uploads = sum(stats["requests"].get(name, 0) for name in ("submit", "put")) - started
                if stats["uploads_in_flight"] and uploads > after:
                    os.kill(child.pid, signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.05)
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait()
        run.faults["worker_killed"] += killed
        run.notes.append(f"{self.label} try 1: {'killed mid-upload' if killed else 'ended before the kill'}")
        wait_for(lambda: doc2x.stats()["uploads_in_flight"] == 0, "the killed worker's uploads to end")
        doc2x.configure(upload_seconds=0)

    def restarted_trigger(self, classpath: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The trigger in a child process (a triggerer), SIGKILLed while it polls, then run again from its kwargs."""
        from airflow_provider_doc2x import protocol

        run = self.run_
        polled = len(run.proxy.requests("GET"))
        # The child's status calls are held a moment at the proxy: it is killed while it polls.
        held = run.proxy.delay(
            "GET", f"^({protocol.STATUS_PATH}|{protocol.PDF_STATUS_PATH})$", 1.0, times=None
        )
        out = run.dir / f"event-{time.monotonic_ns()}.json"
        child = self.child({"kind": "trigger", "classpath": classpath, "kwargs": kwargs, "out": str(out)})
        killed = False
        deadline = time.monotonic() + 300
        try:
            while child.poll() is None and time.monotonic() < deadline:
                if len(run.proxy.requests("GET")) > polled:
                    time.sleep(run.timing.uniform(0, 0.5))
                    if child.poll() is None:
                        os.kill(child.pid, signal.SIGKILL)
                        killed = True
                    break
                time.sleep(0.05)
        finally:
            held.times = held.hits  # used up: no status call is held from now on
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait()
        run.faults["triggerer_restart"] += killed
        if not killed and out.exists():
            return json.loads(out.read_text())
        with self.captured():
            return asyncio.run(first_event(build_trigger(classpath, kwargs)))

    def named_possibly_billed_twice(self, images: list[Image]) -> set[str]:
        """The images a log line names 'possibly billed twice': by source, or through their PDF's uid."""
        lines = [
            line
            for line in self.log.read_text(errors="replace").splitlines()
            if "possibly billed twice" in line
        ]
        named = {image.uri for image in images if any(image.uri in line for line in lines)}
        by_sha = {image.sha256: image.uri for image in images}
        for key, value in self.store.history():
            uid = key.rsplit("/", 1)[-1]
            if (
                isinstance(value, dict)
                and isinstance(value.get("pages"), list)
                and any(uid in line for line in lines)
            ):
                named.update(by_sha[page] for page in value["pages"] if page in by_sha)
        return named


def named_in(text: str, sources: list[str]) -> dict[str, str]:
    """The images a task's error names, with the code on their line (``(code X)``), or ``unknown``."""
    named = {}
    for line in text.splitlines():
        for source in sources:
            if re.search(re.escape(source) + r"(?![\w.-])", line):
                match = re.search(r"\(code ([a-z_]+)\)", line)
                named[source] = match.group(1) if match else "unknown"
    return named


def make_operator(kwargs: dict[str, Any]) -> Any:
    from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

    return Doc2XImageParseOperator(task_id="parse", **kwargs)


def build_trigger(classpath: str, kwargs: dict[str, Any]) -> Any:
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


async def first_event(trigger: Any) -> dict[str, Any]:
    async for event in trigger.run():
        return event.payload
    raise RuntimeError("the trigger ended without an event")


@contextlib.contextmanager
def quiet_asyncio():
    import logging

    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the child processes: a worker's try, a triggerer -----------------------------------------------------


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    tune_provider()
    if spec["kind"] == "try":
        from airflow.providers.common.compat.sdk import TaskDeferred

        with contextlib.suppress(TaskDeferred):
            make_operator(spec["operator"]).execute({"task_state_store": FileStore(Path(spec["store"]))})
    else:
        event = asyncio.run(first_event(build_trigger(spec["classpath"], spec["kwargs"])))
        Path(spec["out"]).write_text(json.dumps(event))


# -- the report -------------------------------------------------------------------------------------------


def replay(args: argparse.Namespace, seed: int, lane: str) -> str:
    flags = [f"--seed-base {seed}", "--seeds 1", f"--images {args.images}", f"--lanes {lane}"]
    if not args.incremental:
        flags.append("--no-incremental")
    return "python bench/soak.py " + " ".join(flags)


def report(soak: Soak, seconds: float) -> dict[str, Any]:
    args, tally = soak.args, soak.tally
    counts = Counter(problem.split("]")[0].lstrip("[") for problem in tally.problems)
    print(
        f"\n## soak: seeds {args.seed_base}..{args.seed_base + args.seeds - 1}, lanes {','.join(args.lanes)}"
    )
    for run in soak.runs:
        faults = ", ".join(
            f"{kind} {run['faults'].get(kind, 0)}" for kind in FAULT_KINDS if run["faults"].get(kind)
        )
        print(f"  seed {run['seed']} {run['lane']:5}  {run['images']} images  faults: {faults or 'none'}")
        print(f"      {'; '.join(run['notes'])}")
    print("\n## faults injected, by kind")
    for kind in FAULT_KINDS:
        print(f"  {kind.ljust(20)} {soak.faults.get(kind, 0)}")
    print("\n## invariants")
    print(f"  image checks (first tasks and re-runs)         {tally.images}")
    print(f"  parsed with their own content                  {tally.parsed}")
    named = ", ".join(f"{code} {count}" for code, count in sorted(tally.named.items())) or "none"
    print(f"  named with their code in the task's error      {sum(tally.named.values())} ({named})")
    print(f"  billed twice, named 'possibly billed twice'    {tally.billed_twice_named}")
    print(f"  sidecars checked for another image's name      {tally.sidecars}")
    for name, text in INVARIANTS.items():
        print(f"  FAILED {text}: {counts.get(name, 0)}" if counts.get(name) else f"  ok     {text}: 0")
    print(f"  seconds {seconds:.0f}")
    if tally.problems:
        print("\n## what broke")
        for problem in tally.problems[:200]:
            print(f"  {problem}")
        print("\n## replay")
        for seed, lane in soak.failed_runs:
            print(f"  {replay(args, seed, lane)}")
    return {
        "seeds": list(range(args.seed_base, args.seed_base + args.seeds)),
        "lanes": list(args.lanes),
        "images": args.images,
        "faults": {kind: soak.faults.get(kind, 0) for kind in FAULT_KINDS},
        "checks": {
            "images": tally.images,
            "parsed": tally.parsed,
            "named": dict(tally.named),
            "billed_twice_named": tally.billed_twice_named,
            "sidecars": tally.sidecars,
        },
        "failed": {name: counts.get(name, 0) for name in INVARIANTS},
        "problems": tally.problems,
        "replay": [replay(args, seed, lane) for seed, lane in soak.failed_runs],
        "runs": soak.runs,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=2, help="runs, one seed each (default 2; the full soak: 10)"
    )
    parser.add_argument(
        "--images", type=int, default=40, help="images per lane and run (default 40; full: 300, 1000)"
    )
    parser.add_argument("--seed-base", type=int, default=1, help="the first run's seed (default 1)")
    parser.add_argument(
        "--lanes",
        type=lambda text: tuple(part.strip() for part in text.split(",") if part.strip()),
        default=LANES,
        help="comma-separated: async,pdf (default both)",
    )
    parser.add_argument(
        "--incremental",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the tasks keep a manifest (incremental=True) and the re-run reads it (default: on)",
    )
    parser.add_argument(
        "--tries", type=int, default=6, help="tries of a task while it fails retryably (default 6)"
    )
    parser.add_argument(
        "--kill-share", type=float, default=0.5, help="share of tasks whose first try is killed"
    )
    parser.add_argument(
        "--restart-share", type=float, default=0.5, help="share of deferrable tasks whose triggerer restarts"
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep every run's folder (logs, state), not only failed ones"
    )
    args = parser.parse_args()
    unknown = set(args.lanes) - set(LANES)
    if unknown:
        parser.error(f"unknown lanes {sorted(unknown)}; known: {', '.join(LANES)}")

    scratch = Path(tempfile.mkdtemp(prefix="doc2x-soak-"))
    os.environ.setdefault("AIRFLOW_HOME", str(scratch / "airflow-home"))
    tune_provider()
    soak = Soak(args, scratch)
    started = time.monotonic()
    try:
        for seed in range(args.seed_base, args.seed_base + args.seeds):
            soak.run(seed)
    finally:
        soak.stop()
    figures = report(soak, time.monotonic() - started)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if soak.tally.problems:
        print(f"\n# run folders of failed runs kept under {scratch}")
        sys.exit(1)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"\n# run folders kept under {scratch}")


if __name__ == "__main__":
    main()
