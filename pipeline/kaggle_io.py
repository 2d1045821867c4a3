"""Talk to Kaggle through the official ``kaggle`` client: download competition files, submit, list.

Every failure a user can fix becomes one :class:`KaggleError` line (missing or rejected credentials,
unaccepted rules, an unknown slug, no network, an unsafe archive); credentials never appear in a
message. :func:`download` writes ``data/<slug>/`` completely or not at all.

The endpoint is the client's: ``KAGGLE_API_ENVIRONMENT`` (unset = api.kaggle.com, ``LOCALHOST`` =
http://localhost), read when each call is made; the usual ``HTTP(S)_PROXY`` variables apply.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import sys
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from pipeline.config import PipelineError

RULES_URL = "https://www.kaggle.com/competitions/{slug}/rules"
CREDENTIALS_HELP = (
    "set KAGGLE_USERNAME and KAGGLE_KEY, or save {{\"username\": ..., \"key\": ...}} to {config} "
    "(chmod 600), or set KAGGLE_API_TOKEN; the key comes from https://www.kaggle.com/settings "
    "(API, Create New Token)")


class KaggleError(PipelineError):
    """A Kaggle request that failed for a reason the message names."""


class KaggleCredentialsError(KaggleError):
    """No credentials found, or Kaggle rejected them (401)."""


class KaggleForbiddenError(KaggleError):
    """403: usually the competition's rules have not been accepted."""


class KaggleNotFoundError(KaggleError):
    """404: no such competition (or no access to it)."""


class KaggleNetworkError(KaggleError):
    """Kaggle could not be reached: connection refused, DNS failure, timeout."""


class UnsafeArchiveError(KaggleError):
    """The downloaded archive holds an entry that would land outside its folder."""


# -- credentials and the client ------------------------------------------------------------------
def config_dir() -> Path:
    """The folder of ``kaggle.json``, resolved like the kaggle client: KAGGLE_CONFIG_DIR,
    else ``~/.kaggle``, else (Linux, when ``~/.kaggle`` is absent) ``$XDG_CONFIG_HOME/kaggle``."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home = Path.home() / ".kaggle"
    if sys.platform.startswith("linux") and not home.exists():
        xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(xdg) / "kaggle"
    return home


def _has_credentials(config: Path) -> bool:
    """True when the client will find credentials: a token, env vars, kaggle.json or OAuth."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    home = Path.home() / ".kaggle"
    if any((home / f).is_file() for f in ("access_token", "access_token.txt", "credentials.json")):
        return True
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(data.get("username")) and bool(data.get("key"))


def _warn_if_readable(config: Path) -> None:
    """Warn when kaggle.json can be read by group or others (it holds the API key)."""
    try:
        mode = config.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.warn(f"{config} is readable by other users; run `chmod 600 {config}`", stacklevel=3)


def _api(slug: str, action: str):
    """An authenticated ``KaggleApi`` for the current environment; KaggleCredentialsError if none.

    ``kaggle.KaggleApi`` reads its config folder and endpoint when the module is first imported;
    they are set again here so that the environment at call time is the one used.
    """
    config = config_dir() / "kaggle.json"
    _warn_if_readable(config)
    if not _has_credentials(config):
        raise KaggleCredentialsError("no Kaggle credentials: " + CREDENTIALS_HELP.format(config=config))
    # Importing the submodule still runs kaggle/__init__.py, which tries to authenticate and prints
    # help on failure (it catches its own SystemExit); keep that off the user's terminal.
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.config_dir = str(config.parent)
    api.config = str(config)
    api.args = ["--local"] if os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST" else []
    try:
        # The client prints its own help and warnings; a token is checked online (hence _errors).
        with _errors(slug, action), contextlib.redirect_stdout(io.StringIO()):
            api.authenticate()
    except SystemExit:
        raise KaggleCredentialsError(
            "Kaggle did not accept the credentials found: " + CREDENTIALS_HELP.format(config=config)
        ) from None
    return api


@contextlib.contextmanager
def _errors(slug: str, action: str):
    """Turn the client's HTTP and network exceptions into one-line KaggleErrors."""
    import requests

    try:
        yield
    except requests.HTTPError as e:
        raise _http_error(e, slug, action) from None
    except (requests.ConnectionError, requests.Timeout) as e:
        raise KaggleNetworkError(
            f"could not reach Kaggle to {action} '{slug}' ({type(e).__name__}: connection refused, "
            f"timed out or no network); check your connection, proxy or KAGGLE_API_ENVIRONMENT"
        ) from None


def _http_error(e, slug: str, action: str) -> KaggleError:
    code = e.response.status_code if e.response is not None else None
    if code == 401:
        return KaggleCredentialsError(
            f"Kaggle rejected the credentials (401 Unauthorized) while trying to {action} '{slug}': "
            + CREDENTIALS_HELP.format(config=config_dir() / "kaggle.json"))
    if code == 403:
        return KaggleForbiddenError(
            f"Kaggle refused to {action} '{slug}' (403 Forbidden): accept the competition rules at "
            f"{RULES_URL.format(slug=slug)} with the account of your API key, then retry")
    if code == 404:
        return KaggleNotFoundError(
            f"unknown competition '{slug}' (404 Not Found while trying to {action}): check the slug "
            f"in the address https://www.kaggle.com/competitions/<slug>")
    reason = str(e).splitlines()[0] if str(e) else ""
    return KaggleError(f"Kaggle answered HTTP {code} while trying to {action} '{slug}': {reason}")


# -- download ------------------------------------------------------------------------------------
def download(slug: str, dest: Path) -> None:
    """Download and unpack competition ``slug`` into ``dest`` (a folder that must not hold files).

    After a return ``dest`` holds every file of the competition archive (nested ``.zip`` files are
    unpacked in place). On any error ``dest`` is left as it was and the temporary folder
    ``<dest.parent>/.<dest.name>.download/`` is removed: nothing is ever written outside it or ``dest``.
    Raises KaggleError subclasses with a one-line message.
    """
    dest = Path(dest)
    tmp = dest.parent / f".{dest.name}.download"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed run
    try:
        archive = _fetch_archive(slug, tmp / "archive")
        files = tmp / "files"
        extract_zip(archive, files)
        _extract_nested(files)
        if dest.is_dir():
            dest.rmdir()  # empty (fetch only calls us then); rename needs the name free
        os.rename(files, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_archive(slug: str, folder: Path) -> Path:
    """Download the competition's zip into ``folder`` with the official client; its path."""
    api = _api(slug, "download")
    folder.mkdir(parents=True)
    with _errors(slug, "download"):
        api.competition_download_files(slug, path=str(folder), force=True, quiet=True)
    found = [p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".kaggle-partial")]
    if len(found) != 1 or not zipfile.is_zipfile(found[0]):
        raise KaggleError(f"download of '{slug}' did not give one zip archive: "
                          f"{[p.name for p in found]}")
    return found[0]


def _member_path(root: Path, info: zipfile.ZipInfo, archive: Path) -> Path | None:
    """Where ``info`` goes under ``root``; None for a folder; UnsafeArchiveError if outside."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive.name}: refusing link entry '{info.filename}'")
    if name.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        raise UnsafeArchiveError(
            f"{archive.name}: refusing entry '{info.filename}' that points outside the folder")
    if info.is_dir() or not parts:
        return None
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):
        raise UnsafeArchiveError(f"{archive.name}: refusing entry '{info.filename}'")
    return target


def extract_zip(archive: Path, root: Path) -> list[Path]:
    """Unpack ``archive`` into ``root``; the files written.

    Every entry is checked before anything is written: an absolute path, a ``..`` component, a drive
    letter or a symlink raises UnsafeArchiveError, so no file ever lands outside ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(archive) as zf:
        plan = [(info, _member_path(root, info, archive)) for info in zf.infolist()]
        for info, target in plan:
            if target is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            written.append(target)
    return written


def _extract_nested(root: Path) -> None:
    """Unpack each ``.zip`` found under ``root`` beside itself and delete it (one level deep)."""
    for nested in sorted(root.rglob("*.zip")):
        if zipfile.is_zipfile(nested):
            extract_zip(nested, nested.parent)
            nested.unlink()


# -- submissions ---------------------------------------------------------------------------------
def submit(slug: str, csv_path: Path, message: str) -> dict:
    """Upload ``csv_path`` to competition ``slug`` with description ``message``.

    Returns the new submission as one :func:`list_submissions` dict (``status`` is often
    ``"pending"`` right after upload) plus ``message``, Kaggle's reply to the upload. Raises
    KaggleError (403: rules not accepted; 404: unknown slug; upload failure; no network).
    """
    api = _api(slug, "submit to")
    with _errors(slug, "submit to"):
        reply = api.competition_submit(str(csv_path), message, slug, quiet=True)
    if reply.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise KaggleError(f"upload of {csv_path} to '{slug}' failed; retry later")
    mine = [s for s in list_submissions(slug) if reply.ref and s["ref"] == reply.ref]
    fallback = {"ref": reply.ref, "fileName": Path(csv_path).name, "description": message,
                "date": "", "status": "pending", "publicScore": None, "privateScore": None,
                "errorDescription": ""}
    return {**(mine[0] if mine else fallback), "message": reply.message}


def list_submissions(slug: str, page_size: int = 100) -> list[dict]:
    """The account's most recent submissions to ``slug`` (newest first, at most ``page_size``).

    Each dict: ``ref`` (int), ``fileName``, ``description``, ``date`` (ISO 8601 string or ""),
    ``status`` ("pending", "complete" or "error"), ``publicScore`` and ``privateScore`` (float or
    None while unscored/hidden), ``errorDescription``. Raises KaggleError like :func:`submit`.
    """
    api = _api(slug, "list submissions of")
    with _errors(slug, "list submissions of"):
        subs = api.competition_submissions(slug, page_size=page_size) or []
    return [_submission_dict(s) for s in subs if s is not None]


def _score(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _submission_dict(s) -> dict:
    return {
        "ref": s.ref,
        "fileName": s.file_name or "",
        "description": s.description or "",
        "date": s.date.isoformat() if s.date else "",
        "status": s.status.name.lower(),
        "publicScore": _score(s.public_score),
        "privateScore": _score(s.private_score),
        "errorDescription": s.error_description or "",
    }
