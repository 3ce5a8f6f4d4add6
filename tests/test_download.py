"""The PTB downloader against a local HTTP server on 127.0.0.1: never the network."""

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import shutil
import stat
import threading
import zipfile

import pytest

from lmtrain.data import sources
from lmtrain.errors import DataError


@pytest.fixture
def server(tmp_path):
    """(base_url, served directory) of a throwaway HTTP server."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


def test_download_verifies_and_keeps_a_matching_file(server, tmp_path):
    url, root = server
    (root / "f.txt").write_bytes(b"hello\n")
    dest = tmp_path / "f.txt"
    sources.download(url + "f.txt", str(dest), hashlib.sha256(b"hello\n").hexdigest())
    assert dest.read_bytes() == b"hello\n"


def test_download_rejects_a_mismatch_and_leaves_nothing(server, tmp_path):
    url, root = server
    (root / "f.txt").write_bytes(b"tampered\n")
    with pytest.raises(DataError, match="does not match its pinned SHA-256"):
        sources.download(url + "f.txt", str(tmp_path / "f.txt"), "0" * 64)
    assert list(tmp_path.glob("f.txt*")) == []


def test_missing_remote_file_is_a_clear_error(server, tmp_path):
    url, _ = server
    with pytest.raises(DataError, match="could not download .*by hand"):
        sources.ensure_ptb(str(tmp_path / "ptb"), base_url=url, log=lambda *a: None)


def test_offline_is_a_clear_error(tmp_path):
    # port 0: nothing can listen there, so the connection is refused at once (a port found free and closed
    # again could be taken by another process before the test connects)
    with pytest.raises(DataError, match="could not download.*put train.txt, valid.txt and test.txt"):
        sources.ensure_ptb(str(tmp_path / "ptb"), base_url="http://127.0.0.1:0/", log=lambda *a: None)


def test_no_download_allowed(tmp_path):
    with pytest.raises(DataError, match="data.download is false"):
        sources.ensure_ptb(str(tmp_path / "ptb"), allow_download=False)


def test_full_ptb_download_from_a_mirror(server, ptb, tmp_path):
    url, root = server
    for split in ("train", "valid", "test"):
        shutil.copy(ptb / f"{split}.txt", root / f"ptb.{split}.txt")
    target = tmp_path / "data" / "ptb"
    paths = sources.ensure_ptb(str(target), base_url=url, log=lambda *a: None)
    assert sorted(p.name for p in target.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert paths["train"] == str(target / "train.txt")
    # a second call finds the files and downloads nothing (the server is not consulted)
    assert sources.ensure_ptb(str(target), allow_download=False) == paths


def test_a_modified_local_copy_is_refused(ptb, tmp_path):
    for split in ("train", "valid", "test"):
        shutil.copy(ptb / f"{split}.txt", tmp_path / f"{split}.txt")
    with open(tmp_path / "valid.txt", "a") as fh:
        fh.write(" extra line \n")
    with pytest.raises(DataError, match="valid.txt is not the standard PTB valid file"):
        sources.ensure_ptb(str(tmp_path), allow_download=False)


# -- WikiText: a fixture release served from 127.0.0.1 ----------------------------------------------------


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves the files of ``root``; honours ``Range: bytes=N-`` when ``ranges`` is true, and closes the
    connection after ``cut`` bytes of a body when ``cut`` is set.  ``ranges_asked`` records each request's
    Range header, ``sent`` the body bytes written."""

    def __init__(self, root):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.root, self.ranges, self.cut, self.ranges_asked, self.sent = root, True, None, [], 0
        self.wrong_range = False  # answer a range request with the range of the whole file


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        asked = self.headers.get("Range")
        srv.ranges_asked.append(asked)
        start = int(asked.split("=")[1].split("-")[0]) if asked and srv.ranges else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            first = 0 if srv.wrong_range else start
            self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        body = body if srv.cut is None else body[: srv.cut]
        self.wfile.write(body)
        srv.sent += len(body)
        self.close_connection = True


@pytest.fixture
def range_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    httpd = RangeServer(root)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


# Counted by hand: every line end is an <eos>, blank lines included (" \n" is a line with no word).
FIXTURE = {
    "train": " \n = Tom = \n \n Tom was a <unk> cat . \n He sat on the mat . \n",  # 0+3+0+6+6 words, 5 lines
    "valid": " \n = Mat = \n The mat sat . \n",  # 0+3+4 words, 3 lines
    "test": " \n The cat was a dog . \n \n",  # 0+6+0 words, 3 lines
}
FIXTURE_COUNTS = (15 + 5, 7 + 3, 6 + 3)
FIXTURE_VOCAB = 11 + 2  # train's 11 distinct words, <unk> and <eos>


def make_zip(path, members):
    """A zip of ``members``: (name, bytes) pairs, or ZipInfo objects with their bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)


def wikitext_zip(path, extra=()):
    make_zip(path, [(f"wikitext-2/wiki.{s}.tokens", FIXTURE[s].encode()) for s in FIXTURE] + list(extra))
    return path


def pin(monkeypatch, archive, tokens=FIXTURE_COUNTS, vocab=FIXTURE_VOCAB):
    """Make the served fixture the pinned WikiText-2 release (its SHA-256, size and counts)."""
    data = archive.read_bytes()
    release = dataclasses.replace(
        sources.RELEASES["wikitext-2"],
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        tokens=tokens,
        vocab=vocab,
        files={s: hashlib.sha1(FIXTURE[s].encode()).hexdigest() for s in FIXTURE},
    )
    monkeypatch.setitem(sources.RELEASES, "wikitext-2", release)


def wikitext_cfg(url, root, **data):
    from lmtrain.config import from_dict

    return from_dict(
        {"data": {"source": "wikitext-2", "root": str(root), "url": url + "wikitext-2-v1.zip", **data}}
    ).data


def test_the_published_wikitext_sums_are_pinned():
    assert sources.RELEASES["wikitext-2"].sha256.startswith("92675f1d63015c1c")
    assert sources.RELEASES["wikitext-103"].sha256.startswith("242ba0f20b329cfd")
    from lmtrain.config import from_dict

    assert (
        from_dict({"data": {"source": "wikitext-103"}}).data.url == "https://wikitext.smerity.com/wikitext-103-v1.zip"
    )
    assert from_dict({"data": {"source": "wikitext-103"}}).data.root == "data/wikitext-103"


def test_wikitext_downloads_verifies_unpacks_and_counts_as_published(range_server, tmp_path, monkeypatch):
    httpd, url = range_server
    pin(monkeypatch, wikitext_zip(httpd.root / "wikitext-2-v1.zip"))
    root = tmp_path / "data" / "wikitext-2"
    lines = []
    corpus = sources.load_corpus(wikitext_cfg(url, root), log=lines.append)
    assert sorted(p.name for p in root.iterdir()) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]
    assert tuple(len(corpus.split(s)) for s in ("train", "valid", "test")) == FIXTURE_COUNTS
    assert len(corpus.vocab) == FIXTURE_VOCAB and "<unk>" in corpus.vocab.index
    assert corpus.vocab.decode(corpus.valid[:5]) == ["<eos>", "=", "<unk>", "=", "<eos>"]  # "Mat" is not in train
    assert not any(line.startswith("warning") for line in lines)
    # found the second time: nothing is downloaded
    assert sources.ensure_wikitext("wikitext-2", str(root), allow_download=False) == {
        s: str(root / f"wiki.{s}.tokens") for s in ("train", "valid", "test")
    }


def test_counts_unlike_the_published_ones_are_reported(range_server, tmp_path, monkeypatch):
    httpd, url = range_server
    pin(monkeypatch, wikitext_zip(httpd.root / "wikitext-2-v1.zip"), tokens=(2088628, 217646, 245569))
    lines = []
    sources.load_corpus(wikitext_cfg(url, tmp_path / "wt2"), log=lines.append)
    assert any(line.startswith("warning: ") and "not the standard release" in line for line in lines)


def test_a_wrong_checksum_is_refused_and_nothing_kept(range_server, tmp_path, monkeypatch):
    httpd, url = range_server
    pin(monkeypatch, wikitext_zip(httpd.root / "wikitext-2-v1.zip"))
    monkeypatch.setitem(
        sources.RELEASES, "wikitext-2", dataclasses.replace(sources.RELEASES["wikitext-2"], sha256="0" * 64)
    )
    root = tmp_path / "data" / "wikitext-2"
    with pytest.raises(DataError, match="does not match its pinned SHA-256.*nothing was kept"):
        sources.load_corpus(wikitext_cfg(url, root), log=lambda *a: None)
    assert not root.exists()  # neither the archive, nor its .part, nor the directory made for it


def test_a_broken_download_resumes_where_it_stopped(range_server, tmp_path, monkeypatch):
    httpd, url = range_server
    archive = wikitext_zip(httpd.root / "wikitext-2-v1.zip", extra=[("wikitext-2/README", os.urandom(3000))])
    pin(monkeypatch, archive)
    size = archive.stat().st_size
    root = tmp_path / "wt2"
    httpd.cut = size // 3
    with pytest.raises(
        DataError, match=r"could not download .*kept in .*wikitext-2-v1\.zip\.part and the next run resumes"
    ):
        sources.ensure_wikitext("wikitext-2", str(root), url=url + "wikitext-2-v1.zip", log=lambda *a: None)
    assert (root / "wikitext-2-v1.zip.part").stat().st_size == size // 3
    httpd.cut, httpd.sent = None, 0
    paths = sources.ensure_wikitext("wikitext-2", str(root), url=url + "wikitext-2-v1.zip", log=lambda *a: None)
    assert httpd.ranges_asked == [None, f"bytes={size // 3}-"]
    assert httpd.sent == size - size // 3  # only the rest came over the wire
    assert open(paths["train"]).read() == FIXTURE["train"]
    assert sorted(p.name for p in root.iterdir()) == ["wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]


def test_a_server_that_ignores_ranges_sends_the_whole_file_again(range_server, tmp_path):
    httpd, url = range_server
    (httpd.root / "f.bin").write_bytes(b"0123456789" * 100)
    (tmp_path / "f.bin.part").write_bytes(b"junk that is not the start")
    httpd.ranges = False
    sources.download(url + "f.bin", str(tmp_path / "f.bin"), hashlib.sha256(b"0123456789" * 100).hexdigest())
    assert (tmp_path / "f.bin").read_bytes() == b"0123456789" * 100 and not (tmp_path / "f.bin.part").exists()


def test_a_complete_part_file_is_verified_without_downloading(range_server, tmp_path):
    httpd, url = range_server
    (httpd.root / "f.bin").write_bytes(b"abc" * 50)
    (tmp_path / "f.bin.part").write_bytes(b"abc" * 50)
    sources.download(url + "f.bin", str(tmp_path / "f.bin"), hashlib.sha256(b"abc" * 50).hexdigest())
    assert httpd.sent == 0 and (tmp_path / "f.bin").read_bytes() == b"abc" * 50


def test_more_bytes_than_the_release_has_are_refused(range_server, tmp_path, monkeypatch):
    httpd, url = range_server
    archive = wikitext_zip(httpd.root / "wikitext-2-v1.zip")
    pin(monkeypatch, archive)
    monkeypatch.setitem(
        sources.RELEASES,
        "wikitext-2",
        dataclasses.replace(sources.RELEASES["wikitext-2"], size=archive.stat().st_size - 1),
    )
    with pytest.raises(DataError, match="more than the"):
        sources.ensure_wikitext("wikitext-2", str(tmp_path / "wt2"), url=url + "wikitext-2-v1.zip", log=print)
    assert not (tmp_path / "wt2").exists()


def symlink(name, target):
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


@pytest.mark.parametrize(
    "member,message",
    [
        (("../outside.txt", b"escaped"), "would land outside the target directory"),
        (("wikitext-2/../../outside.txt", b"escaped"), "would land outside the target directory"),
        (("ABSOLUTE", b"escaped"), "has an absolute path"),
        (symlink("wikitext-2/wiki.train.link", "/etc/passwd"), "is a symbolic link"),
        (("wikitext-2/bomb", b"\0" * (4 << 20)), "compressed"),
        (("wikitext-2/wiki.train.tokens", b"second copy"), "appears twice"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "bomb", "duplicate"],
)
def test_a_crafted_archive_is_refused_with_nothing_written(range_server, tmp_path, monkeypatch, member, message):
    httpd, url = range_server
    outside = tmp_path / "outside.txt"
    name, data = member
    if name == "ABSOLUTE":
        name = str(outside)
    archive = httpd.root / "wikitext-2-v1.zip"
    with pytest.warns(UserWarning) if "twice" in message else contextlib.nullcontext():
        wikitext_zip(archive, extra=[(name, data)])
    pin(monkeypatch, archive)
    root = tmp_path / "data" / "wt2"
    with pytest.raises(DataError, match=f"archive .* refused: member .*{message}.*nothing was unpacked"):
        sources.ensure_wikitext("wikitext-2", str(root), url=url + "wikitext-2-v1.zip", log=lambda *a: None)
    assert not root.exists()  # neither the archive nor any of its members stays in the data directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "served"]
    assert list((tmp_path / "data").iterdir()) == []


def test_an_archive_put_there_by_hand_is_unpacked_and_kept(tmp_path, monkeypatch):
    """A file already there is kept when it is the member's, replaced by the member when it is not (a file
    cut short, an edit): what is unpacked is always the release."""
    root = tmp_path / "wt2"
    root.mkdir()
    archive = wikitext_zip(root / "wikitext-2-v1.zip")
    pin(monkeypatch, archive)
    (root / "wiki.valid.tokens").write_text(FIXTURE["valid"][:-5])  # truncated
    (root / "wiki.test.tokens").write_text(FIXTURE["test"])
    mtime = os.stat(root / "wiki.test.tokens").st_mtime_ns
    lines = []
    paths = sources.ensure_wikitext("wikitext-2", str(root), allow_download=False, log=lines.append)
    assert archive.exists() and open(paths["valid"]).read() == FIXTURE["valid"]
    assert os.stat(paths["test"]).st_mtime_ns == mtime and open(paths["test"]).read() == FIXTURE["test"]
    assert lines[-1].startswith("unpacked wiki.train.tokens, wiki.valid.tokens from")


def test_wikitext_files_already_in_the_data_directory_are_verified(tmp_path, monkeypatch):
    """Found without an archive, each file is checked against the release's pinned SHA-1, as PTB's are.
    Before: a truncated file was used, and only the token counts' warning (hidden by --json) said so."""
    archive = wikitext_zip(tmp_path / "a.zip")
    pin(monkeypatch, archive)
    root = tmp_path / "wt2"
    root.mkdir()
    for split, text in FIXTURE.items():
        (root / f"wiki.{split}.tokens").write_text(text)
    assert sources.ensure_wikitext("wikitext-2", str(root), allow_download=False)["train"] == str(
        root / "wiki.train.tokens"
    )
    (root / "wiki.train.tokens").write_text(FIXTURE["train"][:20])
    with pytest.raises(DataError, match=r"wiki.train.tokens is not WikiText-2's wiki.train.tokens \(SHA-1 mismatch"):
        sources.ensure_wikitext("wikitext-2", str(root), allow_download=False)


def test_the_pinned_sha1_of_every_wikitext_file_is_there():
    for release in sources.RELEASES.values():
        assert set(release.files) == {"train", "valid", "test"}
        assert all(len(h) == 40 and int(h, 16) for h in release.files.values())


def special(name, mode):
    """A member whose header says it is a device or a FIFO."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info, b"x"


def mark_encrypted(archive, name):
    """Set the "encrypted" flag of ``name``'s central directory entry (zipfile cannot write one)."""
    data = bytearray(archive.read_bytes())
    at = data.index(b"PK\x01\x02")
    while data[at + 46 : at + 46 + len(name)] != name.encode():
        at = data.index(b"PK\x01\x02", at + 4)
    data[at + 8] |= 0x1
    archive.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "member,message",
    [
        (special("wikitext-2/dev", stat.S_IFCHR | 0o644), "is not a regular file"),
        (special("wikitext-2/fifo", stat.S_IFIFO | 0o644), "is not a regular file"),
        (("wikitext-2/secret", b"x"), "is encrypted"),
        (("/", b""), "has an invalid name"),
    ],
    ids=["device", "fifo", "encrypted", "empty-name"],
)
def test_members_that_are_not_plain_files_are_refused(tmp_path, member, message):
    from lmtrain.data.download import unpack

    archive = wikitext_zip(tmp_path / "a.zip", extra=[member])
    if "encrypted" in message:
        mark_encrypted(archive, member[0])
    with pytest.raises(DataError, match=f"member .* {message}; nothing was unpacked"):
        unpack(str(archive), str(tmp_path), {"wikitext-2/wiki.test.tokens": "t"})
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "bound,message", [("MAX_MEMBERS", "members, more than"), ("MAX_TOTAL_BYTES", "would unpack to more than")]
)
def test_too_many_members_or_bytes_refuse_the_archive(tmp_path, monkeypatch, bound, message):
    from lmtrain.data import download

    monkeypatch.setattr(download, bound, 2 if bound == "MAX_MEMBERS" else 60)
    archive = wikitext_zip(tmp_path / "a.zip")
    with pytest.raises(DataError, match=message):
        download.unpack(str(archive), str(tmp_path), {"wikitext-2/wiki.test.tokens": "t"})
    assert not (tmp_path / "t").exists()


def test_a_member_damaged_in_the_archive_is_caught_by_its_crc(tmp_path):
    from lmtrain.data.download import unpack

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("wikitext-2/wiki.test.tokens", FIXTURE["test"] * 5)
    data = bytearray(archive.read_bytes())
    at = data.index(b"The cat")
    data[at] ^= 0x20
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match="is damaged .*CRC"):
        unpack(str(archive), str(tmp_path), {"wikitext-2/wiki.test.tokens": "t"})
    assert not (tmp_path / "t").exists()


def test_a_resumed_download_answered_with_another_range_is_refused(range_server, tmp_path):
    httpd, url = range_server
    (httpd.root / "f.bin").write_bytes(b"0123456789" * 100)
    (tmp_path / "f.bin.part").write_bytes(b"0123456789" * 30)
    httpd.wrong_range = True
    with pytest.raises(DataError, match="could not resume .* answered with the range 'bytes 0-999/1000'"):
        sources.download(url + "f.bin", str(tmp_path / "f.bin"), hashlib.sha256(b"0123456789" * 100).hexdigest())
    assert (tmp_path / "f.bin.part").stat().st_size == 300  # kept: the next attempt may resume it


def test_a_foreign_archive_put_there_by_hand_is_refused(tmp_path):
    root = tmp_path / "wt2"
    root.mkdir()
    wikitext_zip(root / "wikitext-2-v1.zip")  # not the pinned release
    with pytest.raises(DataError, match="is not the WikiText-2 archive .*SHA-256 mismatch"):
        sources.ensure_wikitext("wikitext-2", str(root), allow_download=False, log=lambda *a: None)
    assert (root / "wikitext-2-v1.zip").exists()  # the user's file stays


def test_no_wikitext_and_no_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(
        DataError,
        match="WikiText-103 not found under .*put wiki.train.tokens, wiki.valid.tokens "
        "and wiki.test.tokens of WikiText-103 .*wikitext-103-v1.zip.* by hand",
    ):
        sources.ensure_wikitext("wikitext-103", str(tmp_path / "wt103"), allow_download=False)
