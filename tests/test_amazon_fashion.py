"""amazon_fashion: the builder on a tiny authors'-layout folder, and the prepare command against a
local HTTP server (dead links, a flaky server, timeouts, undecodable bytes, resumption)."""

import gzip
import http.server
import io
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2_jax.data import amazon_prepare
from e2_jax.data.build import build


def encoded(seed: int, fmt: str = "PNG", size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_layout(root: Path) -> None:
    """The authors' layout: meta-fashion.json, split.json, Fashion/<asin>/<file>."""
    files = {"A1": {"A1_0.png": encoded(1), "A1_1.png": encoded(2)},
             "A2": {"A2_0.png": encoded(3, "JPEG")},  # a JPEG named .png: read by content
             "A3": {"A3_0.png": b"\x89PNG\r\n\x1a\n truncated"},  # undecodable: product has no image
             "A4": {"A4_0.png": encoded(4)},  # empty brand
             "A5": {"A5_0.png": encoded(5), "A5_1.png": encoded(6)[:200]}}  # second image truncated
    meta = {"A1": {"images": ["A1_0.png", "A1_1.png"], "title": "Slim jeans", "brand": "Levi's"},
            "A2": {"images": ["A2_0.png"], "title": "Silk scarf &amp; box", "brand": "Hermès"},
            "A3": {"images": ["A3_0.png"], "title": "Belt", "brand": "Gucci"},
            "A4": {"images": ["A4_0.png"], "title": "Socks", "brand": ""},
            "A5": {"images": ["A5_0.png", "A5_1.png", "A5_2.png"], "title": "Hoodie", "brand": "Acme"}}
    for asin, images in files.items():
        (root / "Fashion" / asin).mkdir(parents=True)
        for name, data in images.items():
            (root / "Fashion" / asin / name).write_bytes(data)
    (root / "meta-fashion.json").write_text(json.dumps(meta))
    (root / "split.json").write_text(json.dumps({"train": ["A1", "A3", "A4", "A5"], "test": ["A2", "A9"]}))


def _examples(builder, split):
    return {e["asin"].decode(): e for e in builder.as_data_source(split)}


def test_builder_reads_the_authors_layout(tmp_path):
    write_layout(tmp_path / "manual")
    builder = build("amazon_fashion", str(tmp_path / "data"), str(tmp_path / "manual"))
    train, test = _examples(builder, "train"), _examples(builder, "test")
    assert sorted(train) == ["A1", "A5"] and sorted(test) == ["A2"]
    assert train["A1"]["brand"].decode() == "Levi's" and train["A1"]["title"].decode() == "Slim jeans"
    assert test["A2"]["brand"].decode() == "Hermès"
    np.testing.assert_array_equal(train["A1"]["images"][1], decoded(encoded(2)))
    np.testing.assert_array_equal(train["A5"]["images"][0], decoded(encoded(5)))
    assert len(train["A5"]["images"]) == 1
    skipped = builder.info.metadata["skipped"]
    assert skipped["train"]["by_reason"] == {"undecodable image": 2, "no usable image": 1, "empty brand": 1,
                                             "missing image": 1}
    assert skipped["test"]["examples"] == [{"product": "A9", "reason": "not in meta-fashion.json"}]
    # Products left out and views dropped from kept products are counted apart; each product named.
    assert (skipped["train"]["products"], skipped["train"]["views"]) == (2, 3)
    assert sorted(skipped["train"]["product_ids"]) == ["A3", "A4"]
    assert {e.get("view") for e in skipped["train"]["examples"] if e["product"] == "A5"} == {"A5_1.png", "A5_2.png"}


def test_missing_layout_file_is_named(tmp_path):
    write_layout(tmp_path / "manual")
    (tmp_path / "manual" / "split.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"split.json not found.*--manual-dir.*amazon_prepare.*nijianmo"):
        build("amazon_fashion", str(tmp_path / "data"), str(tmp_path / "manual"))


# --- prepare, against a server on 127.0.0.1 -------------------------------------------------------


class _Server:
    """Serves /ok/<n>.jpg, /flaky.jpg (503 once, then fine), /dead.jpg (404), /garbage.jpg (not an
    image) and /slow.jpg (slower than the client's timeout); counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter = Counter()
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] += 1
                if self.path.startswith("/ok/"):
                    self._send(encoded(int(self.path[4:-4]), "JPEG"))
                elif self.path == "/flaky.jpg":
                    self._send(encoded(99, "JPEG")) if server.hits[self.path] > 1 else self.send_error(503)
                elif self.path == "/garbage.jpg":
                    self._send(b"<html>not an image</html>")
                elif self.path == "/slow.jpg":
                    server.release.wait(3)
                    self._send(encoded(98, "JPEG"))
                else:
                    self.send_error(404)

            def _send(self, data: bytes) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _metadata(path: Path, url: str) -> None:
    lines = [
        {"asin": "B001", "title": "Oxford shirt", "brand": "Acme", "imageURLHighRes": [f"{url}/ok/1.jpg",
                                                                                       f"{url}/ok/2.jpg"]},
        {"asin": "B002", "title": "Parka", "brand": "Nord", "imageURL": [f"{url}/flaky.jpg", f"{url}/dead.jpg"]},
        {"asin": "B003", "title": "Scarf", "brand": "Soie", "imageURLHighRes": [f"{url}/garbage.jpg"]},
        {"asin": "B004", "title": "Boots", "brand": "Hike", "imageURLHighRes": [f"{url}/slow.jpg", f"{url}/ok/4.jpg"]},
        {"asin": "B005", "title": "Cap", "brand": "", "imageURLHighRes": [f"{url}/ok/5.jpg"]},
        {"asin": "B001", "title": "duplicate", "brand": "Acme", "imageURLHighRes": [f"{url}/ok/6.jpg"]},
        {"asin": "B007", "title": "No pictures", "brand": "Acme"},
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    text += "\n{'asin': 'B008', 'title': 'Old-format line', 'brand': 'Retro', 'imUrl': '" + url + "/ok/8.jpg'}"
    text += "\n{not json at all\n"
    with gzip.open(path, "wt") as f:
        f.write(text)


def _prepare(meta: Path, out: Path, *extra: str) -> dict:
    args = ["--meta", str(meta), "--out", str(out), "--timeout", "0.5", "--retries", "2", "--backoff", "0.05",
            "--workers", "4", "--test-fraction", "0.3", "--quiet", *extra]
    amazon_prepare.main(args)
    return json.loads((out / amazon_prepare.REPORT).read_text())


def test_prepare_downloads_skips_and_resumes(tmp_path, server, capsys):
    meta, out = tmp_path / "meta_AMAZON_FASHION.json.gz", tmp_path / "amazon"
    _metadata(meta, server.url)
    report = _prepare(meta, out)
    assert report["skipped"] == {"duplicate asin": 1, "no brand": 1, "no image url": 1,
                                 "unreadable metadata lines": 1, "no image downloaded": 1}
    assert set(report["skipped_products"]["no image downloaded"]) == {"B003"}  # every skipped product named
    assert all(len(ids) == report["skipped"][reason] for reason, ids in report["skipped_products"].items())
    assert report["images"] == {"kept": 5, "dead": 2, "undecodable": 1}  # dead: 404, and the timeout
    assert server.hits["/flaky.jpg"] == 2 and server.hits["/dead.jpg"] == 1  # retried 503, not 404
    assert server.hits["/slow.jpg"] == 3  # timed out on every try
    layout = json.loads((out / "meta-fashion.json").read_text())
    assert sorted(layout) == ["B001", "B002", "B004", "B008"]  # B003: nothing decodable
    assert layout["B001"] == {"images": ["B001_0.jpg", "B001_1.jpg"], "title": "Oxford shirt", "brand": "Acme"}
    assert layout["B004"]["images"] == ["B004_1.jpg"]
    np.testing.assert_array_equal(decoded((out / "Fashion/B001/B001_1.jpg").read_bytes()), decoded(encoded(2, "JPEG")))
    split = json.loads((out / "split.json").read_text())
    assert sorted(split["train"] + split["test"]) == sorted(layout)
    assert split["test"] == sorted(a for a in layout if amazon_prepare.is_test(a, 0.3))
    assert split["train"] and split["test"]
    assert not list(out.rglob("*.part"))

    # A second run downloads nothing new: files on disk and recorded dead links are skipped.
    hits = sum(server.hits.values())
    (out / "Fashion/B004/B004_1.jpg").unlink()  # as if the first run had been killed before it
    again = _prepare(meta, out)
    assert sum(server.hits.values()) == hits + 1 and server.hits["/ok/4.jpg"] == 2
    assert again["images"] == {"on disk": 4, "kept": 1, "dead (recorded earlier)": 3}
    assert json.loads((out / "split.json").read_text()) == split

    # And the layout builds.
    builder = build("amazon_fashion", str(tmp_path / "data"), str(out))
    total = sum(builder.info.splits[s].num_examples for s in ("train", "test"))
    assert total == 4


def test_prepare_names_a_missing_metadata_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        amazon_prepare.main(["--meta", str(tmp_path / "nope.json.gz"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "nope.json.gz not found" in err and "nijianmo.github.io/amazon" in err


def test_split_is_a_pure_function_of_the_asin():
    asins = [f"B{i:09d}" for i in range(2000)]
    test = [a for a in asins if amazon_prepare.is_test(a, 0.1)]
    assert 150 < len(test) < 250
    assert test == [a for a in reversed(asins) if amazon_prepare.is_test(a, 0.1)][::-1]
