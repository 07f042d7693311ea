"""Hub models that are not in the local Hugging Face cache: one request says whether the hub answers.

huggingface_hub retries a file that it cannot fetch and has no copy of, five times with
back-off (over 20 s a file), and each loader asks for several files; on a machine without
network a model that was never downloaded would take minutes of retries and warnings before its
error. The loaders look in the cache first and, for a model that is not there, ask the hub
once: when nothing answers, the model fails at once, in one line that says how to get it.
(A diffusion model that is there is then read from its cache folder, without requests.)
"""

from __future__ import annotations

import functools
from pathlib import Path

from digin_cli.errors import DiginError


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """Where the local cache holds `filename` of the hub model `repo_id`, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # not a valid repo id: no hub model of that name is cached
        return None
    return Path(found) if isinstance(found, str) else None


def hub_unreachable() -> str | None:
    """Why the hub does not answer one request without retries (no connection, a timeout, a
    proxy's 5xx), or None when it answers. Offline mode (HF_HUB_OFFLINE=1) counts as an
    answer: the loaders then read the cache only and fail at once by themselves."""
    from huggingface_hub import constants

    return None if constants.HF_HUB_OFFLINE else _probe()


@functools.cache
def _probe() -> str | None:
    """One request per process: a run asks for its model's family, the model and each
    classifier, and the hub's reach does not change between them."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:  # noqa: BLE001 - whatever the transport raises, nothing answered
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # 5xx: the hub is down or a proxy cannot reach it; the loaders would retry these too.
    return f"HTTP {response.status_code}" if response.status_code >= 500 else None


def require_hub(repo_id: str, what: str, otherwise: str, revision: str | None = None) -> None:
    """For a model missing from the cache: one line naming it and how to get it when the hub
    does not answer; `otherwise` is the way round the hub (a local file or folder)."""
    reason = hub_unreachable()
    if reason is None:
        return
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    raise DiginError(f"{what}: not in the local Hugging Face cache, and the hub cannot be reached ({reason}); "
                     f"download it once with network access (`{download}`), {otherwise}")  # fmt: skip
