"""The PTB downloader against a local HTTP server on 127.0.0.1: never the network."""
import functools
import hashlib
import http.server
import shutil
import socket
import threading

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
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match="could not download.*put train.txt, valid.txt and test.txt"):
        sources.ensure_ptb(str(tmp_path / "ptb"), base_url=f"http://127.0.0.1:{port}/", log=lambda *a: None)


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
