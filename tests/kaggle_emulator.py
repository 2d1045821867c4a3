"""A local stand-in for the Kaggle API, enough for the official client's competition calls.

The client (kagglesdk's ``KaggleHttpClient``) POSTs JSON to
``<endpoint>/api/v1/competitions.CompetitionApiService/<Method>``; with
``KAGGLE_API_ENVIRONMENT=LOCALHOST`` the endpoint is ``http://localhost`` (port 80, fixed in
kagglesdk). Rather than bind port 80, the emulator listens on a free port of 127.0.0.1 and is
reached as an HTTP proxy (``http_proxy``), which ``requests`` honours for every call the client makes,
in this process or a child. Answered:

- ``ListDataFiles {competitionName}`` -> ``{"files": [{"name", "totalBytes"}]}``
- ``DownloadDataFiles {competitionName}`` -> 302 to ``GET /_blobs/<slug>.zip`` (the client follows
  it and streams the body to ``<slug>.zip``)
- ``StartSubmissionUpload {competitionName, fileName, contentLength, lastModifiedEpochSeconds}`` ->
  ``{"token", "createUrl"}``; the client then ``PUT``s the file to ``createUrl`` (``/_uploads/<token>``)
- ``CreateSubmission {competitionName, blobFileTokens, submissionDescription}`` -> ``{"message", "ref"}``
- ``ListSubmissions {competitionName, sortBy, group, page, pageToken, pageSize}`` ->
  ``{"submissions": [{"ref", "fileName", "description", "date", "status", "publicScore", ...}]}``

Authentication is HTTP Basic with the configured username and key (the client's legacy API key);
anything else is a 401. Errors are JSON ``{"code": N, "message": ...}`` with status N, as Kaggle sends.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import threading
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

SERVICE = "/api/v1/competitions.CompetitionApiService/"


@dataclass
class FakeCompetition:
    """One competition as the emulator serves it."""

    archive: bytes  # the zip DownloadDataFiles serves
    answers: dict[str, str] = field(default_factory=dict)  # test id -> true label (public score)
    rules_accepted: bool = True  # False: every call about it answers 403


def zip_folder(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """The files under ``folder`` (names relative to it) plus ``extra`` raw entries, as a zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def accuracy(csv_bytes: bytes, answers: dict[str, str]) -> float:
    """Share of ``answers`` whose id's second-column value in the submission equals the answer."""
    rows = list(csv.reader(io.StringIO(csv_bytes.decode())))[1:]
    got = {r[0]: r[1] for r in rows if len(r) >= 2}
    return sum(_same(got.get(k), v) for k, v in answers.items()) / max(len(answers), 1)


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


class KaggleEmulator:
    """``with KaggleEmulator() as kg: kg.competitions["x"] = FakeCompetition(...)``; see ``env()``.

    ``status`` (an int) makes every API call answer that error; ``calls`` records
    ``(http_method, path_or_api_method, json_body)`` of every request.
    """

    def __init__(self, username: str = "alice", key: str = "0123456789abcdef"):
        self.username, self.key = username, key
        self.competitions: dict[str, FakeCompetition] = {}
        self.submissions: dict[str, list[dict]] = {}
        self.uploads: dict[str, bytes] = {}  # upload token -> bytes PUT
        self.upload_names: dict[str, str] = {}  # upload token -> file name
        self.calls: list[tuple[str, str, dict]] = []
        self.status: int | None = None
        self._refs = itertools.count(1000)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.emulator = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment variables that send the official client here (and nowhere else)."""
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "http_proxy": self.url,
                "HTTP_PROXY": self.url, "no_proxy": "", "NO_PROXY": ""}

    def __enter__(self) -> KaggleEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the API methods: (slug, body, host) -> (status, json) or a raw response ----------------
    def list_data_files(self, slug, body, host):
        with zipfile.ZipFile(io.BytesIO(self.competitions[slug].archive)) as zf:
            files = [{"name": i.filename, "totalBytes": i.file_size} for i in zf.infolist()]
        return 200, {"files": files, "nextPageToken": ""}

    def download_data_files(self, slug, body, host):
        return 302, {"Location": f"http://{host}/_blobs/{slug}.zip"}

    def start_submission_upload(self, slug, body, host):
        token = f"blob-{next(self._refs)}"
        with self._lock:
            self.uploads[token] = b""
            self.upload_names[token] = body.get("fileName", "")
        return 200, {"token": token, "createUrl": f"http://{host}/_uploads/{token}"}

    def create_submission(self, slug, body, host):
        token = body.get("blobFileTokens", "")
        if token not in self.uploads or not self.uploads[token]:
            return 400, {"code": 400, "message": f"no uploaded file for token '{token}'"}
        ref = next(self._refs)
        score = accuracy(self.uploads[token], self.competitions[slug].answers)
        sub = {"ref": ref, "fileName": self.upload_names[token],
               "description": body.get("submissionDescription", ""),
               "date": datetime.now(timezone.utc).replace(tzinfo=None).isoformat(
                   timespec="milliseconds") + "Z",
               "status": "COMPLETE", "publicScore": f"{score:.5f}",
               "totalBytes": len(self.uploads[token]), "submittedBy": self.username}
        with self._lock:
            self.submissions.setdefault(slug, []).append(sub)
        return 200, {"message": f"Successfully submitted to {slug}", "ref": ref}

    def list_submissions(self, slug, body, host):
        subs = sorted(self.submissions.get(slug, []), key=lambda s: s["ref"], reverse=True)
        return 200, {"submissions": subs[: int(body.get("pageSize") or 20)], "nextPageToken": ""}

    METHODS = {"ListDataFiles": "list_data_files", "DownloadDataFiles": "download_data_files",
               "StartSubmissionUpload": "start_submission_upload",
               "CreateSubmission": "create_submission", "ListSubmissions": "list_submissions"}

    def answer(self, method: str, body: dict, auth: str | None, host: str):
        """Dispatch one API call: authentication, forced status, unknown slug, rules, method."""
        if auth != "Basic " + base64.b64encode(f"{self.username}:{self.key}".encode()).decode():
            return 401, {"code": 401, "message": "Unauthenticated"}
        if self.status:
            return self.status, {"code": self.status, "message": f"emulated error {self.status}"}
        if method not in self.METHODS:
            return 404, {"code": 404, "message": f"method {method} not emulated"}
        slug = body.get("competitionName", "")
        if slug not in self.competitions:
            return 404, {"code": 404, "message": "Not found"}
        if not self.competitions[slug].rules_accepted:
            return 403, {"code": 403, "message": "You must accept this competition's rules "
                                                 "before you'll be able to download files."}
        return getattr(self, self.METHODS[method])(slug, body, host)


class _Handler(BaseHTTPRequestHandler):
    """Serves API calls, blob downloads and uploads; works as the target or as a proxy."""

    def log_message(self, *args) -> None:  # quiet tests
        pass

    @property
    def emu(self) -> KaggleEmulator:
        return self.server.emulator

    def _where(self) -> tuple[str, str]:
        url = urlsplit(self.path)  # absolute when reached as a proxy
        return url.netloc or self.headers.get("Host", "localhost"), url.path

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, data: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def do_POST(self) -> None:
        host, path = self._where()
        raw = self._body()
        body = json.loads(raw or b"{}")
        method = path.removeprefix(SERVICE) if path.startswith(SERVICE) else path
        self.emu.calls.append(("POST", method, body))
        status, obj = self.emu.answer(method, body, self.headers.get("Authorization"), host)
        if status in (301, 302):
            self._send(status, headers=obj)
        else:
            self._json(status, obj)

    def do_GET(self) -> None:
        _, path = self._where()
        self.emu.calls.append(("GET", path, {}))
        slug = path.removeprefix("/_blobs/").removesuffix(".zip")
        comp = self.emu.competitions.get(slug) if path.startswith("/_blobs/") else None
        if comp is None:
            return self._json(404, {"code": 404, "message": "no such blob"})
        self._send(200, comp.archive, {"Content-Type": "application/zip"})

    def do_PUT(self) -> None:
        _, path = self._where()
        token = path.removeprefix("/_uploads/")
        data = self._body()
        self.emu.calls.append(("PUT", path, {"bytes": len(data)}))
        if token not in self.emu.uploads:
            return self._json(404, {"code": 404, "message": "upload expired"})
        self.emu.uploads[token] = data
        self._json(200, {})
