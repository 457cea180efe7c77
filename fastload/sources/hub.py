"""Every rule about the Hugging Face hub in one place: when it is off limits, where its cache is, what is cached,
how a load asks it for files, and how long fastload waits for it.

Two promises live here: a model that is on this machine needs no network call at all (loads and saves run with
huggingface_hub offline), and a call that does go out is bounded (a probe with a timeout names the endpoint that
could not be reached instead of waiting, or retrying for half a minute, inside transformers).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from fastload.errors import ModelNotFound
from fastload.shared_setting import SharedSetting
from fastload.sources import plan as P
from fastload.sources.plan import LoadPlan

# how long a user waits at most for a hub that accepts a connection and never answers (connect, then read)
HUB_TIMEOUT_S = 8.0


def hub_offline(local_files_only: bool | None) -> bool:
    """Whether the hub is off limits: local_files_only, or HF_HUB_OFFLINE as the environment says now."""
    if local_files_only:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir(cache_dir: str | os.PathLike | None) -> str:
    """The hub cache as the environment says now (huggingface_hub reads it once, at its import)."""
    if cache_dir:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def cached_snapshot(repo_id: str, revision: str | None, cache_dir: str) -> Path | None:
    """The snapshot folder of a repo fully present in the HF cache (config and weights), else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    if not (path / "config.json").is_file() or not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return None
    return path


def hub_kwargs(plan: LoadPlan, *, cache_dir: str | None, token: str | bool | None,
               trust_remote_code: bool) -> dict:
    """The keyword arguments transformers' from_pretrained needs to read this plan's files: none about the hub
    for a folder on disk; for a hub repo its revision and cache, and local_files_only unless it downloads."""
    local = plan.source in (P.LOCAL, P.STORE) or Path(plan.location).is_dir()
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not local:
        kw.update(revision=plan.revision, cache_dir=hub_cache_dir(cache_dir), token=token,
                  local_files_only=plan.source != P.HUB_DOWNLOAD)
    return kw


def _hub_offline() -> tuple:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.filterwarnings("ignore", message="Unable to fetch remote file")
    warnings.filterwarnings("ignore", message="Could not find a config file")
    return before, quiet


def _hub_back(token: tuple) -> None:
    from huggingface_hub import constants

    before, quiet = token
    constants.HF_HUB_OFFLINE = before
    quiet.__exit__(None, None, None)


# the first in turns the hub off, the last out restores it (a load reads its tokenizer on a second thread; two
# save-and-restore pairs interleaved would otherwise leave the hub off, or turn it back on under the other)
_HUB_OFFLINE = SharedSetting(_hub_offline, _hub_back)


def hub_calls_off():
    """huggingface_hub offline while the block runs: it reads HF_HUB_OFFLINE once, at its import, and even a load
    with local_files_only=True, or peft's save (it looks up the base repo's config.json to see whether the
    vocabulary was resized), would otherwise reach the hub. peft's notes that it could not look are silenced: the
    base's vocabulary is the model's own, fastload never resizes it. Safe to enter from several threads at once."""
    return _HUB_OFFLINE.held()


@contextlib.contextmanager
def hub_stays_local(plan: LoadPlan) -> Iterator[None]:
    """Keep huggingface_hub off the network while a load reads local or cached files (a download plan may go out)."""
    if plan.will_download:
        yield
        return
    with hub_calls_off():
        yield


def hub_endpoint() -> str:
    """The hub this process talks to (HF_ENDPOINT, read by huggingface_hub at its import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def probe_hub(repo_id: str, revision: str | None, token: str | bool | None, timeout: float = HUB_TIMEOUT_S,
              endpoint: str | None = None) -> None:
    """Ask the hub for the repo's config.json once, within `timeout`, before transformers does (it waits for each
    file and retries failed connections for ~30 s). Any HTTP answer means the hub is there: what it says (no such
    repo, gated) is left to the load that follows. No answer raises ModelNotFound naming the endpoint.

    Raises:
        ModelNotFound: the hub could not be reached (no DNS, refused, reset, not HTTP) or did not answer in time.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    endpoint = endpoint or hub_endpoint()
    url = hf_hub_url(repo_id, "config.json", revision=revision, endpoint=endpoint)
    try:
        get_session().head(url, headers=build_hf_headers(token=token), timeout=timeout, follow_redirects=True)
    except Exception as e:  # noqa: BLE001 - every transport failure is the same answer for the user
        raise unreachable(endpoint, repo_id, e, timeout) from e


def unreachable(endpoint: str, repo_id: str, error: BaseException, timeout: float) -> ModelNotFound:
    """The error a user sees when the hub does not answer: which endpoint, what happened, what to do."""
    what = " ".join(str(error).split())[:300] or type(error).__name__
    if "timeout" in type(error).__name__.lower() or "timed out" in what.lower():
        found = f"the hub at {endpoint} did not answer within {timeout:.0f} s ({type(error).__name__}: {what})"
    else:
        found = f"the hub at {endpoint} could not be reached: {type(error).__name__}: {what}"
    return ModelNotFound(f"Downloading {repo_id!r} from the hub", found=found,
                         fix="check the network connection and HF_ENDPOINT, download the model where the hub is "
                             "reachable (huggingface-cli download), or set HF_HUB_OFFLINE=1 to use cached models only")


def check_reachable(plan: LoadPlan, *, local_files_only: bool | None, token: str | bool | None = None) -> None:
    """Before a load that downloads: refuse when offline was set after the plan was made (huggingface_hub reads
    HF_HUB_OFFLINE only at its import), and find out within HUB_TIMEOUT_S whether the hub answers at all.

    Raises:
        ModelNotFound: offline now, or the hub could not be reached.
    """
    if not plan.will_download:
        return
    if hub_offline(local_files_only):
        raise ModelNotFound(f"Downloading {plan.location!r} from the hub",
                            found="the load needs a download, but the hub is off limits now (offline: HF_HUB_OFFLINE "
                                  "is set or local_files_only=True)",
                            fix="download it while online (huggingface-cli download), or unset HF_HUB_OFFLINE / "
                                "local_files_only")
    probe_hub(plan.location, plan.revision, token)
