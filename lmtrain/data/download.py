"""Fetching a file once (resumable, checked against a pinned SHA-256) and unpacking a zip archive safely.

Downloads go to ``DEST.part``.  A transfer that breaks (network, Ctrl-C)
leaves the ``.part`` file, and the next call asks the server for the rest
with an HTTP Range request; a server that ignores it sends the whole file
again.  Only a file whose SHA-256 matches is renamed to ``DEST``; a mismatch
deletes the ``.part`` file, so nothing unverified is ever kept.

An archive is checked whole before anything is written: every member must
be a plain file or directory whose path stays inside the target (no absolute
path, no ``..``, no link or device), no member may repeat, and the sizes in
its headers are bounded (per member, in total, and as a compression ratio,
the mark of a zip bomb).  The wanted members are then extracted into a
temporary directory inside the target and moved into place only when all of
them are there; on any failure that directory is removed.
"""

import hashlib
import http.client
import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib

from tqdm import tqdm

from lmtrain import __version__
from lmtrain.errors import DataError

CHUNK = 1 << 20
# Bounds on what an archive's headers may announce (the largest file lmtrain unpacks, WikiText-103's
# training split, is 0.5 GiB; text compresses about 3x).
MAX_MEMBER_BYTES = 2 << 30
MAX_TOTAL_BYTES = 4 << 30
MAX_RATIO = 50  # uncompressed / compressed, for members over RATIO_FLOOR bytes
RATIO_FLOOR = 1 << 20
MAX_MEMBERS = 10000


def download(url, dest, sha256, size=None, max_bytes=None, timeout=60, hint="", progress=True):
    """Fetch ``url`` to ``dest`` through ``dest.part``, resuming a partial one; keep it only if its SHA-256
    is ``sha256``.  ``size``: the file's size, if known; ``max_bytes``: otherwise a bound (a server sending
    more is cut off either way).  ``hint``: what the error messages add (how to get the file by hand)."""
    part = dest + ".part"
    hint = f"; {hint}" if hint else ""
    limit = size if size is not None else max_bytes
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if limit is not None and have > limit:
        os.remove(part)
        have = 0
    h = hash_file(part) if have else hashlib.sha256()
    headers = {"User-Agent": f"lmtrain/{__version__}"}  # some hosts refuse Python's default agent
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as err:
            if not (have and err.code == 416):
                raise
            resp = None  # the range starts at the end: the .part file already holds everything
        if resp is not None:
            with resp:
                h = _receive(resp, url, dest, part, have, h, size, limit, hint, progress)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        if isinstance(err, http.client.IncompleteRead):
            reason = f"the connection closed {err.expected:,} bytes before the end"
        kept = os.path.getsize(part) if os.path.isfile(part) else 0
        resume = f"; the {kept:,} bytes received are kept in {part} and the next run resumes" if kept else ""
        raise DataError(f"could not download {url} ({reason}){resume}{hint}") from None
    if h.hexdigest() != sha256:
        os.remove(part)
        raise DataError(
            f"download of {url} does not match its pinned SHA-256 (got {h.hexdigest()[:16]}..., "
            f"expected {sha256[:16]}...); nothing was kept{hint}"
        )
    os.replace(part, dest)


def _receive(resp, url, dest, part, have, h, size, limit, hint, progress):
    """Append the body of ``resp`` to ``part``, which holds ``have`` bytes already hashed into ``h``; returns
    the hash of the whole.  A server that ignores the range request sends the whole file: it starts over."""
    if have and resp.status != 206:
        have, h = 0, hashlib.sha256()
    elif have and not (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
        raise DataError(
            f"could not resume the download of {url}: the server answered with the range "
            f"{resp.headers.get('Content-Range')!r}; delete {part} to start over"
        )
    length = resp.headers.get("Content-Length")
    total = have + int(length) if length and length.isdigit() else size
    if limit is not None and total is not None and total > limit:
        raise DataError(
            f"download of {url} announces {total:,} bytes, more than the {limit:,} of the file expected{hint}"
        )
    with (
        open(part, "ab" if have else "wb") as out,
        tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=os.path.basename(dest),
            leave=False,
            dynamic_ncols=True,
            disable=None if progress else True,
        ) as bar,
    ):
        for chunk in iter(lambda: resp.read(CHUNK), b""):
            have += len(chunk)
            if limit is not None and have > limit:
                out.close()
                os.remove(part)
                raise DataError(
                    f"download of {url} is larger than the {limit:,} bytes of the file expected; nothing was kept{hint}"
                )
            h.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    if length and length.isdigit() and have < total:  # http.client ends a cut transfer quietly
        raise http.client.IncompleteRead(b"", total - have)
    return h


def hash_file(path, algorithm="sha256"):
    """The hash state after the bytes of ``path`` (a download resumes it with the bytes still to come)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h


def sha256_file(path):
    return hash_file(path).hexdigest()


def sha1_file(path):
    return hash_file(path, "sha1").hexdigest()


def same_as_member(path, info):
    """Whether the file at ``path`` holds what the zip member ``info`` holds: its size, and its CRC-32."""
    if os.path.getsize(path) != info.file_size:
        return False
    crc = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            crc = zlib.crc32(chunk, crc)
    return crc == info.CRC


def check_members(zf, archive):
    """[(info, path parts)] of every member of an open ZipFile, or a DataError naming the first unsafe one."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise DataError(f"archive {archive} has {len(infos):,} members, more than the {MAX_MEMBERS:,} allowed")
    seen, total, members = set(), 0, []
    for info in infos:
        name = info.filename
        refuse = lambda why: DataError(f"archive {archive} refused: member {name!r} {why}; nothing was unpacked")  # noqa: E731
        flat = name.replace("\\", "/")
        if not name.strip("/"):  # (zipfile cuts a name at a NUL byte itself)
            raise refuse("has an invalid name")
        if flat.startswith("/") or (len(flat) > 1 and flat[1] == ":"):
            raise refuse("has an absolute path")
        parts = [p for p in flat.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise refuse("would land outside the target directory (..)")
        kind = stat.S_IFMT(info.external_attr >> 16)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise refuse("is a symbolic link")
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise refuse("is not a regular file")
        if info.flag_bits & 0x1:
            raise refuse("is encrypted")
        key = "/".join(parts)
        if key in seen:
            raise refuse("appears twice")
        seen.add(key)
        total += info.file_size
        if info.file_size > MAX_MEMBER_BYTES:
            raise refuse(f"would unpack to {info.file_size:,} bytes, more than the {MAX_MEMBER_BYTES:,} allowed")
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise refuse(
                f"is compressed {info.file_size // max(info.compress_size, 1):,} to 1, more than "
                f"text ever is (a zip bomb?)"
            )
        if total > MAX_TOTAL_BYTES:
            raise DataError(
                f"archive {archive} refused: it would unpack to more than {MAX_TOTAL_BYTES:,} bytes; "
                f"nothing was unpacked"
            )
        members.append((info, parts))
    return members


def unpack(archive, target, wanted):
    """Extract the members ``wanted`` ({member path in the archive: file name in ``target``}) of the zip
    ``archive`` into ``target``, after checking every member of it.  A file already in ``target`` is kept
    when it holds what its member holds (size and CRC-32), else replaced by it.  Returns the paths written."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{archive} is not a readable zip archive ({err})") from None
    with zf:
        members = {"/".join(parts): info for info, parts in check_members(zf, archive)}
        missing = [m for m in wanted if m not in members]
        if missing:
            raise DataError(f"archive {archive} lacks {missing[0]}; is it the right file?")
        try:
            tmp = tempfile.mkdtemp(prefix=".unpack-", dir=target)
        except OSError as err:
            raise DataError(f"cannot unpack {archive} into {target}: {err.strerror or err}") from None
        try:
            for member in wanted:
                info = members[member]
                with zf.open(info) as src, open(os.path.join(tmp, wanted[member]), "xb") as out:
                    # zipfile reads no more than the header's size and checks the CRC-32 at the end
                    for chunk in iter(lambda: src.read(CHUNK), b""):
                        out.write(chunk)
            written = []
            for member, name in wanted.items():
                dest = os.path.join(target, name)
                if not (os.path.isfile(dest) and same_as_member(dest, members[member])):
                    os.replace(os.path.join(tmp, name), dest)
                    written.append(dest)
            return written
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as err:
            raise DataError(f"archive {archive} is damaged ({err}); delete it to download it again") from None
        except OSError as err:
            raise DataError(f"cannot unpack {archive} into {target}: {err.strerror or err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
