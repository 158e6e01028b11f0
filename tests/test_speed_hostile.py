"""
Hostile tests of the speed work on the PDF lane: result paths made as strings, the one-thread intake
of local JPEG and PNG files, and how packing loads img2pdf (once with pikepdf hidden, which broke the
promises of the tests at the end of this file; it is loaded as it is again). A third finding, another
thread's ``import pikepdf`` failing while img2pdf loaded, went with the hiding.

What is asserted is what a user sees: the paths a record names are the files written (the same
strings ``ObjectStoragePath`` joins give), a second run bills nothing, bad input is named before
anything is sent, and a process that packs keeps a usable pikepdf and img2pdf.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from PIL import Image

from airflow_provider_doc2x.documents.intake import Intake
from airflow_provider_doc2x.exceptions import Doc2XInputError
from airflow_provider_doc2x.local.samples import Page, render
from airflow_provider_doc2x.storage.manifest.format import MANIFEST_DIR
from airflow_provider_doc2x.storage.objects import storage_path
from airflow_provider_doc2x.storage.results import folder_name
from airflow_provider_doc2x.storage.sources import ImageSource
from tests.helpers import parse_operator
from tests.helpers import s3 as s3_api
from tests.test_results import memory_fs as memory_fixture

s3_server, s3, memory_fs = s3_api.s3_server, s3_api.s3, memory_fixture  # the fixtures


def billed(doc2x) -> int:
    """Pages billed by the image API and the PDF API together."""
    stats = doc2x.stats()
    return stats["billed_total"] + stats["pdf_pages_billed"]


def parse(images, output, **kwargs) -> list[dict]:
    """One synchronous run of the operator, as a task would make it."""
    kwargs.setdefault("deferrable", False)
    return parse_operator(images, output_path=output, **kwargs).execute({})


def assert_names_the_files_written(record: dict, root: str, title: str | None = None) -> None:
    """Every path of the record is the ``ObjectStoragePath`` join of the root and the file, and holds it."""
    base = storage_path(root)
    folder = record["sidecar_path"].rsplit("/", 2)[-2]
    assert folder.rsplit("-", 1)[-1] in (record["sha256"][:12], record["sha256"])
    stem = folder.rsplit("-", 1)[0]
    assert record["markdown_path"] == str(base / folder / f"{stem}.md")
    assert record["sidecar_path"] == str(base / folder / f"{stem}.json")
    prefix = str(base / folder) + "/"
    assert all(path.startswith(prefix) for path in record["figure_paths"])
    assert record["figure_paths"] == [
        str(base / folder / path[len(prefix) :]) for path in record["figure_paths"]
    ]
    sidecar = json.loads(storage_path(record["sidecar_path"]).read_text())
    assert sidecar["sha256"] == record["sha256"] and sidecar["source"] == record["source"]
    for figure in record["figure_paths"]:
        assert storage_path(figure).read_bytes()
    if title is not None:
        assert storage_path(record["markdown_path"]).read_text().startswith(f"# {title}")


# -- results: paths, caching, roots --------------------------------------------------------------------

ODD_NAMES = [
    "a page.png",
    "ünïcödé-页.png",
    "100%25 done.png",
    "issue #7.jpg",
    "why?.png",
    ".hidden.png",
    "..two-dots.jpg",
    "l" * 200 + ".png",
]


def local_root(tmp_path, spelling: str) -> str:
    """The same local folder, spelled as a user might give it."""
    folder = tmp_path / "lake"
    folder.mkdir(exist_ok=True)
    if spelling == "symlink":
        link = tmp_path / "lake-link"
        link.symlink_to(folder, target_is_directory=True)
        return str(link)
    return {"plain": str(folder), "slash": f"{folder}/", "file-uri": f"file://{folder}"}[spelling]


@pytest.mark.parametrize("spelling", ["plain", "slash", "file-uri", "symlink"])
def test_odd_names_under_every_spelling_of_a_local_root_are_found_again_and_billed_once(
    doc2x, make_image, tmp_path, spelling
):
    images = [make_image(name, f"Odd {n}") for n, name in enumerate(ODD_NAMES)]
    root = local_root(tmp_path, spelling)
    records = parse(images, root)
    assert billed(doc2x) == len(images)
    for n, (record, image) in enumerate(zip(records, images, strict=True)):
        assert record["cached"] is False and record["source"] == str(image)
        assert_names_the_files_written(record, root, f"Odd {n}")
        folder = record["sidecar_path"].rsplit("/", 2)[-2]
        assert folder == folder_name(record["source"], record["sha256"])
        assert os.path.isfile(os.path.join(str(tmp_path / "lake"), folder, folder.rsplit("-", 1)[0] + ".md"))
    again = parse(images, root)
    assert [record["cached"] for record in again] == [True] * len(images)
    assert [record["markdown_path"] for record in again] == [record["markdown_path"] for record in records]
    assert billed(doc2x) == len(images)


def test_the_same_folder_under_another_spelling_is_a_hit_with_the_same_paths(doc2x, make_image, tmp_path):
    images = [make_image("x.png", "Spelled"), make_image("y.jpg", "Spelled too")]
    first = parse(images, f"{tmp_path}/lake/", incremental=True)
    again = parse(images, f"file://{tmp_path}/lake", incremental=True)
    assert [record["cached"] for record in again] == [True, True]
    assert [r["sidecar_path"] for r in again] == [r["sidecar_path"] for r in first]
    assert billed(doc2x) == 2


@pytest.mark.parametrize("root", ["memory://lake/results", "memory://lake/results/", "memory:///"])
def test_a_memory_root_names_the_files_written_and_a_second_run_bills_nothing(
    doc2x, memory_fs, make_image, root
):
    images = [make_image("scan one.png", "Memory One"), make_image("scan-two.jpg", "Memory Two")]
    records = parse(images, root, incremental=True)
    for record, title in zip(records, ["Memory One", "Memory Two"], strict=True):
        assert_names_the_files_written(record, root, title)
    again = parse(images, root, incremental=True)
    assert [record["cached"] for record in again] == [True, True]
    assert billed(doc2x) == 2


@pytest.mark.parametrize("conn_id", [None, "aws_default"], ids=["boto-default-chain", "aws_default"])
@pytest.mark.parametrize("prefix", ["lake/doc2x", "lake/doc2x/", ""], ids=["prefix", "slash", "bucket"])
def test_an_s3_root_names_the_objects_written_and_survives_a_lost_manifest(
    doc2x, s3, make_image, conn_id, prefix
):
    images = [make_image("a page.png", "Bucket One"), make_image("b.jpg", "Bucket Two")]
    root = s3.url(prefix, conn_id=conn_id)
    records = parse(images, root, incremental=True)
    for record, title in zip(records, ["Bucket One", "Bucket Two"], strict=True):
        assert record["markdown_path"].startswith("s3://")
        assert_names_the_files_written(record, root, title)
    manifest = [key for key in s3.objects() if f"{MANIFEST_DIR}/" in key]
    assert manifest, "the run kept a manifest"
    for key in manifest:  # lost: the next run rebuilds it from the sidecars
        s3.direct_client().delete_object(Bucket=s3.bucket, Key=key)
    again = parse(images, root, incremental=True)
    assert [record["cached"] for record in again] == [True, True]
    assert [r["markdown_path"] for r in again] == [r["markdown_path"] for r in records]
    assert billed(doc2x) == 2


def test_a_lost_manifest_is_rebuilt_from_the_sidecars_with_the_same_paths(doc2x, make_image, tmp_path):
    images = [make_image("first page.png", "Kept One"), make_image(".dotted.jpg", "Kept Two")]
    root = f"{tmp_path}/lake/"
    records = parse(images, root, incremental=True)
    shutil.rmtree(tmp_path / "lake" / MANIFEST_DIR)
    again = parse(images, root, incremental=True)
    assert [record["cached"] for record in again] == [True, True]
    for record, before in zip(again, records, strict=True):
        assert {key: record[key] for key in ("markdown_path", "sidecar_path", "figure_paths")} == {
            key: before[key] for key in ("markdown_path", "sidecar_path", "figure_paths")
        }
    third = parse(images, root, incremental=True)  # from the rebuilt manifest
    assert [record["cached"] for record in third] == [True, True]
    assert billed(doc2x) == 2


def legacy_manifest(folder) -> int:
    """Rewrite every manifest entry as the first release wrote it (no status, no model); returns how many."""
    rewritten = 0
    for path in (folder / MANIFEST_DIR).rglob("*.json"):
        data = json.loads(path.read_text())
        for entry in data["entries"].values():
            rewritten += entry.pop("status", None) is not None
            entry.pop("model", None)
        path.write_text(json.dumps(data))
    return rewritten


def test_legacy_manifest_entries_answer_with_the_same_paths(doc2x, make_image, tmp_path):
    images = [make_image("old one.png", "Legacy One"), make_image("old-two.jpg", "Legacy Two")]
    root = str(tmp_path / "lake")
    records = parse(images, root, incremental=True)
    assert legacy_manifest(tmp_path / "lake") == 2
    again = parse(images, root, incremental=True)
    assert [record["cached"] for record in again] == [True, True]
    assert [r["markdown_path"] for r in again] == [r["markdown_path"] for r in records]
    assert billed(doc2x) == 2


def test_overwrite_rewrites_the_same_files_and_a_later_run_finds_them(doc2x, make_image, tmp_path):
    image = make_image("again and again.png", "Written Twice")
    root = f"file://{tmp_path}/lake/"
    (first,) = parse([image], root, incremental=True)
    (rewritten,) = parse([image], root, incremental=True, overwrite=True)
    assert rewritten["cached"] is False and billed(doc2x) == 2
    assert rewritten["markdown_path"] == first["markdown_path"]
    assert_names_the_files_written(rewritten, root, "Written Twice")
    assert (
        json.loads(storage_path(rewritten["sidecar_path"]).read_text())["uid"]
        == rewritten["uid"]
        != first["uid"]
    )
    (later,) = parse([image], root, incremental=True)
    assert later["cached"] is True and later["uid"] == rewritten["uid"] and billed(doc2x) == 2


def test_another_models_result_beside_is_kept_apart_and_each_found_again(lane, make_image, tmp_path):
    images = [make_image("model page.jpg", "By Models")]
    root = str(tmp_path / "lake")
    (v2,) = parse(images, root, incremental=True)
    (v3,) = parse(images, root, incremental=True, method="pdf", pdf_model="v3-2026")
    assert v3["cached"] is False and v3["sidecar_path"] != v2["sidecar_path"]
    assert_names_the_files_written(v3, root, "By Models")
    assert v3["sidecar_path"].rsplit("/", 2)[-2] == folder_name(v3["source"], v3["sha256"], model="v3-2026")
    assert json.loads(storage_path(v3["sidecar_path"]).read_text())["model"] == "v3-2026"
    shutil.rmtree(tmp_path / "lake" / MANIFEST_DIR)  # found again from the sidecars alone
    (v2_again,) = parse(images, root, incremental=True)
    (v3_again,) = parse(images, root, incremental=True, method="pdf", pdf_model="v3-2026")
    assert (v2_again["sidecar_path"], v3_again["sidecar_path"]) == (v2["sidecar_path"], v3["sidecar_path"])
    assert v2_again["cached"] and v3_again["cached"] and billed(lane) == 2


def test_a_clash_on_the_short_hash_keeps_both_results_each_under_its_own_path(tmp_path, memory_fs):
    from airflow_provider_doc2x import protocol
    from airflow_provider_doc2x.storage.results import ResultStore

    def result(text: str) -> protocol.Doc2XResult:
        return protocol.Doc2XResult(
            uid=text, pages=(protocol.Doc2XPage(0, 10, 10, f"# {text}"),), convert_zip=None
        )

    one, two = "ab" * 32, "ab" * 6 + "cd" * 26  # the same first 12 hex digits
    for root in (f"{tmp_path}/lake/", "memory://lake/clash"):
        store = ResultStore(root)
        first = store.write("scans/clash.png", one, result("One"))
        second = store.write("scans/clash.png", two, result("Two"))
        assert second["sidecar_path"].rsplit("/", 2)[-2] == f"clash-{two}"
        for record, title in ((first, "One"), (second, "Two")):
            assert_names_the_files_written(record, root, title)
        fresh = ResultStore(root)
        assert fresh.cached(one, "scans/clash.png")["markdown_path"] == first["markdown_path"]
        assert fresh.cached(two, "elsewhere/clash.png")["markdown_path"] == second["markdown_path"]


LINEAGE_SCRIPT = """
import json, sys
from airflow_provider_doc2x.operators.doc2x import Doc2XImageParseOperator

op = Doc2XImageParseOperator(
    task_id="parse", image_path=sys.argv[1], output_path=sys.argv[2], poll_interval=0.05,
    overwrite=sys.argv[3] == "overwrite",
)
records = op.execute({})
outputs = [dataset.name for dataset in op.get_openlineage_facets_on_complete(None).outputs]
print(json.dumps({"records": records, "outputs": outputs}))
"""


def test_every_file_a_record_names_is_in_the_task_lineage(doc2x, tmp_path):
    pytest.importorskip("airflow.providers.openlineage")
    image = tmp_path / "figure page #1.png"
    image.write_bytes(render(Page(title="Seen With Figure", figure=True), size=(400, 300)))
    env = {
        **os.environ,
        "AIRFLOW_CONN_DOC2X_DEFAULT": doc2x.connection_json(),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": '{"type": "console"}',
    }
    for mode in ("first", "overwrite"):
        answer = fresh_python(LINEAGE_SCRIPT, str(image), f"{tmp_path}/lake/", mode, env=env)
        (record,) = answer["records"]
        assert record["figure_paths"], "the page has a figure"
        outputs = set(answer["outputs"])
        for path in [record["markdown_path"], *record["figure_paths"]]:
            assert path.removeprefix("file://") in outputs
        assert record["sidecar_path"].removeprefix("file://") not in outputs  # bookkeeping, not a dataset


# -- intake: bad input named, nothing sent ---------------------------------------------------------------


def fresh_python(script: str, *args: str, env: dict | None = None) -> dict:
    """Run ``script`` in a new interpreter (nothing imported yet) and return its last line as JSON."""
    return fresh_pythons([script], *args, env=env)[0]


def fresh_pythons(scripts: list[str], *args: str, env: dict | None = None) -> list[dict]:
    """Run each script in a new interpreter of its own, all at once; their last lines as JSON."""
    running = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for script in scripts
    ]
    answers = []
    for process in running:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-3000:]
        answers.append(json.loads(out.strip().splitlines()[-1]))
    return answers


def picture(fmt: str, size=(40, 30), colour=(200, 40, 90)) -> bytes:
    """A plain picture's file bytes (``JPEG`` or ``PNG``); its colour tells contents apart."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def nothing_sent(doc2x) -> bool:
    """No request reached the service, and nothing was billed."""
    stats = doc2x.stats()
    return billed(doc2x) == 0 and not any(stats["requests"].values())


def test_local_jpg_files_that_are_not_images_are_each_named_and_nothing_is_sent(doc2x, make_image, tmp_path):
    good = make_image("good.jpg", "Good Page")
    bad = {
        "text.jpg": b"just some words, not a picture\n",
        "empty.jpg": b"",
        "cut.jpg": picture("JPEG", (400, 300))[:300],
        "CUT-UPPER.JPG": picture("JPEG", (400, 300))[:300],
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.jpg").mkdir()
    named = [*bad, "folder.jpg", "missing.png"]
    with pytest.raises(Doc2XInputError) as raised:
        parse([good, *(tmp_path / name for name in named)], str(tmp_path / "lake"))
    message = str(raised.value)
    assert f"{len(named)} of {len(named) + 1} files cannot be sent" in message
    for name in named:
        assert str(tmp_path / name) in message
    assert str(good) not in message
    assert nothing_sent(doc2x)


def test_a_file_deleted_after_listing_is_named_and_nothing_is_sent(doc2x, make_image, tmp_path):
    from airflow_provider_doc2x.storage.listing import list_images

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for n in range(3):
        (inbox / f"p{n}.jpg").write_bytes(picture("JPEG", colour=(n, 2, 3)))
    listed = list_images(str(inbox))
    assert len(listed) == 3
    (inbox / "p1.jpg").unlink()
    with pytest.raises(Doc2XInputError, match=r"p1\.jpg") as raised:
        parse(listed, str(tmp_path / "lake"))
    assert "p0.jpg" not in str(raised.value) and nothing_sent(doc2x)


def test_jpg_names_holding_a_pdf_or_a_tiff_travel_by_their_content(lane, tmp_path):
    """A batch of only local ``.jpg`` names is checked by one thread, yet each file still by its content."""
    from tests.test_documents import frames, pdf_of_pages, tiff_of

    scan = tiff_of(tmp_path / "fax.tiff", frames(2))
    tiff_named_jpg = tmp_path / "fax.jpg"
    scan.rename(tiff_named_jpg)
    pdf_named_jpg = pdf_of_pages(tmp_path / "contract.JPG", ["Clause One", "Clause Two"])
    upper = tmp_path / "UPPER.JPEG"
    upper.write_bytes(render(Page(title="Upper Case"), fmt="JPEG", size=(400, 300)))
    records = parse([tiff_named_jpg, pdf_named_jpg, upper], str(tmp_path / "lake"))
    assert [(r.get("document"), r.get("source_format")) for r in records] == [
        (True, "tiff"),
        (True, "pdf"),
        (None, None),
    ]
    assert storage_path(records[2]["markdown_path"]).read_text().startswith("# Upper Case")


def test_local_and_memory_sources_in_one_batch_are_all_parsed(doc2x, memory_fs, make_image, tmp_path):
    local = make_image("local.jpg", "Local Side")
    memory_fs.pipe_file("/inbox/remote.png", render(Page(title="Memory Side"), size=(400, 300)))
    records = parse([local, "memory://inbox/remote.png"], str(tmp_path / "lake"), allow_schemes=["memory"])
    texts = [storage_path(record["markdown_path"]).read_text() for record in records]
    assert texts[0].startswith("# Local Side") and texts[1].startswith("# Memory Side")


def test_two_thousand_small_files_are_checked_with_no_thread_left_and_a_bad_one_named(tmp_path):
    inbox = tmp_path / "many"
    inbox.mkdir()
    paths = []
    for n in range(2000):
        path = inbox / (f"{n:04d}.png" if n % 2 else f"{n:04d}.jpg")
        path.write_bytes(picture("PNG" if n % 2 else "JPEG", (8, 8), (n % 256, n // 256, 2)))
        paths.append(path)
    before = threading.active_count()
    with Intake() as intake:
        checked = intake.check_all([ImageSource.of(str(path)) for path in paths])
    assert [item.uri for item in checked] == [ImageSource.of(str(path)).uri for path in paths]
    paths[1234].write_bytes(b"%PDF-1.7 but cut")
    with Intake() as intake, pytest.raises(Doc2XInputError) as raised:
        intake.check_all([ImageSource.of(str(path)) for path in paths])
    assert "1 of 2000 files" in str(raised.value) and "1234.jpg" in str(raised.value)
    assert threading.active_count() == before
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("doc2x-intake")]


# -- packing without pikepdf ---------------------------------------------------------------------------


def pack_script(*, before: str = "", after: str = "", document: bool = False) -> str:
    """Pack a JPEG and a PNG (and a TIFF document) in a new interpreter; report what a user would see."""
    lines = [
        "import io, json, sys",
        "extra = {}",
        before,
        "from pypdf import PdfReader",
        "from airflow_provider_doc2x.pdf.packing import pack_images",
        "jpg, png, tiff, out = sys.argv[1:5]",
        "with pack_images([jpg, png], temp_dir=out) as packed:",
        "    pdfs = [open(pdf.path, 'rb').read() for pdf in packed.pdfs]",
        "    unpackable = [item.reason for item in packed.unpackable]",
        "extra['loaded_by_packing'] = 'pikepdf' in sys.modules",
        "streams = [page.images[0].data for pdf in pdfs for page in PdfReader(io.BytesIO(pdf)).pages]",
        "extra['jpeg_stream_is_the_file'] = streams[0] == open(jpg, 'rb').read()",
    ]
    if document:
        lines += [
            "from airflow_provider_doc2x.documents.convert import document_pdf",
            "extra['pages'] = document_pdf(tiff, 'tiff', out + '/doc.pdf', source=tiff)",
            "import pikepdf",
            "with pikepdf.open(out + '/doc.pdf') as opened:",
            "    extra['counted'] = len(opened.pages)",
        ]
    lines += [
        after,
        "import img2pdf",
        "extra['img2pdf_has_pikepdf'] = img2pdf.have_pikepdf",
        "print(json.dumps({'pdfs': [pdf.hex() for pdf in pdfs], 'unpackable': unpackable, **extra}))",
    ]
    return "\n".join(lines)


@pytest.fixture
def pack_inputs(tmp_path):
    """A JPEG page, a PNG page of another size, a three-page TIFF, and an output folder."""
    from tests.test_documents import frames, tiff_of

    jpg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    jpg.write_bytes(picture("JPEG", (120, 90)))
    png.write_bytes(picture("PNG", (50, 70), (3, 0, 7)))
    tiff = tiff_of(tmp_path / "fax.tiff", frames(3))
    out = tmp_path / "out"
    out.mkdir()
    return [str(jpg), str(png), str(tiff), str(out)]


def test_packing_in_a_fresh_process_is_lossless_and_leaves_pikepdf_usable(pack_inputs):
    answer = fresh_python(pack_script(document=True), *pack_inputs)
    assert answer["unpackable"] == []
    assert answer["jpeg_stream_is_the_file"] is True
    assert (answer["pages"], answer["counted"]) == (3, 3)


FIRST_LOADED = {
    "nothing": "",
    "pikepdf-first": "import pikepdf",
    "img2pdf-first": "import img2pdf",
    "pikepdf-in-a-thread-first": "import threading; t = threading.Thread(target=__import__, args=('pikepdf',)); t.start(); t.join()",
    "pikepdf-after": "",
}


def test_a_process_that_loaded_pikepdf_or_img2pdf_first_packs_the_same_bytes(pack_inputs):
    scripts = {
        name: pack_script(
            before=code, after="import pikepdf; pikepdf.new()" if name == "pikepdf-after" else ""
        )
        for name, code in FIRST_LOADED.items()
    }
    answers = dict(zip(scripts, fresh_pythons(list(scripts.values()), *pack_inputs), strict=True))
    for name, answer in answers.items():
        assert answer["pdfs"] == answers["nothing"]["pdfs"], name
        assert answer["jpeg_stream_is_the_file"] and answer["unpackable"] == [], name
    assert answers["img2pdf-first"]["img2pdf_has_pikepdf"] is True  # the user's img2pdf is left whole


def test_user_code_importing_img2pdf_after_packing_gets_a_whole_img2pdf(pack_inputs):
    after = (
        "import img2pdf as user_img2pdf\n"
        "try:\n"
        "    made = user_img2pdf.convert(open(jpg, 'rb').read(), engine=user_img2pdf.Engine.pikepdf)\n"
        "    extra['pikepdf_engine_pdf'] = made[:5].decode()\n"
        "except Exception as error:\n"
        "    extra['pikepdf_engine_pdf'] = repr(error)"
    )
    answer = fresh_python(pack_script(after=after), *pack_inputs)
    assert answer["img2pdf_has_pikepdf"] is True
    assert answer["pikepdf_engine_pdf"] == "%PDF-"


TWO_FIRST_PACKS_AT_ONCE = """
import inspect, json, sys, threading
from airflow_provider_doc2x.pdf import packing
from airflow_provider_doc2x.pdf.packing import pack_images

# Two threads of a task (the lane's packing and a document's PDF, both in asyncio.to_thread) each
# pack their first image at the same moment: each waits for the other at any line of the loader
# that touches sys.modules["pikepdf"] (none now).
load = packing._img2pdf.__wrapped__
lines, first = inspect.getsourcelines(load)
meet = {first + n: threading.Barrier(2, timeout=10) for n, line in enumerate(lines) if 'sys.modules["pikepdf"]' in line and "get" not in line}

def tracer(frame, event, arg):
    if frame.f_code is not load.__code__:
        return None
    def each_line(frame, event, arg):
        if event == "line" and frame.f_lineno in meet:
            try:
                meet[frame.f_lineno].wait()
            except threading.BrokenBarrierError:
                pass  # the other thread never comes to this line: nothing to meet
        return each_line
    return each_line

failures = []
def pack(path):
    try:
        with pack_images([path], temp_dir=sys.argv[4]) as packed:
            failures.extend(item.reason for item in packed.unpackable)
    except BaseException as error:
        failures.append(repr(error))

threading.settrace(tracer)
threads = [threading.Thread(target=pack, args=(path,)) for path in sys.argv[1:3]]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"failures": failures}))
"""


def test_two_first_packs_at_once_both_pack(pack_inputs):
    assert fresh_python(TWO_FIRST_PACKS_AT_ONCE, *pack_inputs)["failures"] == []
