"""covidcxr model folders on the Hugging Face Hub: ``hf://OWNER/NAME[@REVISION]`` to a local folder, and
the upload of an export folder (``export --push-to-hub``).

``--model hf://OWNER/NAME`` (predict, evaluate, the app, anything that calls ``artifacts.locate``) names a
**covidcxr export folder** pushed to a Hub model repo: ``model.keras``, ``model_card.json``, ``README.md``
and, where exported, ``model.onnx`` / ``serving/1``. It is downloaded once with
``huggingface_hub.snapshot_download`` into the usual cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``); with ``HF_HUB_OFFLINE=1`` only that cache is read. ``train --weights
hf://...`` starts from such an export (covidcxr/training/startfrom.py); for a keras-hub architecture a repo
without ``model_card.json`` is a keras-hub *backbone preset* (covidcxr/models/weights.py).

``huggingface_hub`` is the optional extra ``[hub]``; it is imported only when a handle is resolved.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from covidcxr.errors import ConfigError, DataError

SCHEME = "hf://"
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what an export folder holds that a Hub repo of it needs (the rest of a Hub repo is not downloaded)
PATTERNS = ["*.json", "*.md", "*.keras", "*.onnx", "*.npz", "serving/**", "lung_segmenter/**"]
INSTALL = 'pip install "covidcxr[hub]" (huggingface_hub)'


@dataclass(frozen=True)
class HubHandle:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return SCHEME + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_handle(text) -> bool:
    return isinstance(text, str) and text.startswith(SCHEME)


def parse(text: str) -> HubHandle:
    """``hf://OWNER/NAME[@REVISION]`` -> HubHandle; ConfigError naming the expected form otherwise."""
    body = text[len(SCHEME):] if is_handle(text) else text
    repo, _, rev = body.partition("@")
    if not _REPO.match(repo) or (_ and not rev):
        raise ConfigError(f"{text}: not a Hub model handle; write hf://OWNER/NAME or hf://OWNER/NAME@REVISION.")
    return HubHandle(repo, rev or None)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at its import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The Hub cache as huggingface_hub finds it, read now: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hub():
    try:
        import huggingface_hub  # optional extra [hub]: only where a hf:// handle is used
    except ImportError as exc:
        raise ConfigError(f"hf:// models need huggingface_hub: {INSTALL}.") from exc
    return huggingface_hub


def resolve(text: str) -> Path:
    """The local folder of ``hf://OWNER/NAME[@REV]``: downloaded once into the Hub cache, or (offline) found there."""
    handle, hub = parse(text), _hub()
    from huggingface_hub import errors as E  # optional extra [hub] (imported by _hub just above)

    where = cache_dir()
    try:
        folder = hub.snapshot_download(handle.repo_id, revision=handle.revision, cache_dir=where,
                                       local_files_only=offline(), allow_patterns=PATTERNS,
                                       library_name="covidcxr")
    except (E.LocalEntryNotFoundError, E.CachedRepoTreeNotFoundError, E.IncompleteSnapshotError) as exc:
        why = "HF_HUB_OFFLINE=1" if offline() else "the Hub cannot be reached"
        raise DataError(f"--model {handle}: not in the Hugging Face cache ({where}) and {why}; run once online, "
                        f"or check the name and revision.") from exc
    except E.RevisionNotFoundError as exc:
        raise DataError(f"--model {handle}: the repo has no revision {handle.revision!r}.") from exc
    except (E.RepositoryNotFoundError, E.GatedRepoError) as exc:
        raise DataError(f"--model {handle}: no such model repo on the Hub, or it is private or gated "
                        f"(log in with: hf auth login).") from exc
    except (E.HfHubHTTPError, OSError, ValueError) as exc:
        raise DataError(f"--model {handle}: cannot download it ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else '?'}); set HF_HUB_OFFLINE=1 to use "
                        f"the cache only.") from exc
    return Path(folder)


def push_folder(folder: str | Path, repo_id: str, private: bool | None = None, log=print) -> str:
    """Upload an export folder to the model repo ``repo_id`` (created when missing); token: the usual login."""
    handle, hub = parse(repo_id), _hub()
    if handle.revision:
        raise ConfigError(f"--push-to-hub {repo_id}: give OWNER/NAME without @REVISION.")
    api = hub.HfApi()
    try:
        url = api.create_repo(handle.repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.upload_folder(repo_id=handle.repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="covidcxr export")
    except Exception as exc:  # the Hub's errors (auth, network, quota) end here with their reason, one line
        raise DataError(f"--push-to-hub {handle.repo_id}: upload failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else '?'}); the export itself is kept at "
                        f"{folder}. Log in with: hf auth login.") from exc
    where = str(getattr(info, "commit_url", "") or url)
    log(f"pushed {folder} to hf://{handle.repo_id} ({where})")
    return where
