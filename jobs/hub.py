"""Hub trouble as one line that names the model or data set and says what to do.

huggingface_hub retries an unreachable hub, a timeout or a 5xx itself, with exponential backoff,
five times, and says so ("Retrying in 1s [Retry 1/5]"); what is left when it gives up, or what no
retry can help (no such repo, a gated or private one without a token, offline without a cache),
ends here: ``UserError`` (exit 2) for the id or the token, ``Failure`` (exit 1, worth a retry
later) for the network. The exceptions are recognised by their classes' names along the chain,
since transformers and datasets wrap the hub's own in OSError or their own classes.
"""

from __future__ import annotations

import os

from jobs.contract import Failure, UserError

NOT_FOUND = ("RepositoryNotFoundError", "DatasetNotFoundError")
UNREACHABLE = ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError", "ConnectionError",
               "LocalEntryNotFoundError", "OfflineModeIsEnabled")


def looks_like_path(name: str) -> bool:
    """A local path as the recipe writes one; anything else is taken for a hub id (org/name, or a legacy name)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def problem(error: BaseException, what: str, name: str, revision: str | None = None) -> Exception | None:
    """The one-line error for a hub failure of ``what`` ("model", "data set") ``name``; None if it is not one."""
    from huggingface_hub import constants

    if looks_like_path(name):
        return None
    chain = _chain(error)
    kinds = {type(e).__name__ for e in chain}
    token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    page = f"{constants.ENDPOINT}/{'datasets/' if what == 'data set' else ''}{name}"
    responses = [getattr(e, "response", None) for e in chain]
    status = next((r.status_code for r in responses if getattr(r, "status_code", None)), None)
    if "GatedRepoError" in kinds:
        fix = "HF_TOKEN's account has not been granted access" if token else "HF_TOKEN is not set"
        return UserError(
            f"{what} {name} is gated on the hub and {fix}: accept its conditions at {page} and set HF_TOKEN to a token of that account"
        )
    # Before not-found: datasets raises its DatasetNotFoundError from the hub's RevisionNotFoundError.
    if "RevisionNotFoundError" in kinds:
        return UserError(f"{what} {name}: the hub has no revision {revision!r} of it: check the recipe's revision")
    if kinds & set(NOT_FOUND) or (status == 401 and "Invalid credentials" not in str(error)):
        fix = "and that HF_TOKEN's account may read it" if token else "or, if it is private or gated, set HF_TOKEN"
        return UserError(f"{what} {name}: not found on the hub ({constants.ENDPOINT}): check the id (org/name) {fix}")
    if status == 401:
        return UserError(f"{what} {name}: the hub refused HF_TOKEN (401 invalid credentials): set HF_TOKEN to a valid token")
    if "HFValidationError" in kinds:
        return UserError(f"{what} {name}: neither a local path nor a hub id (org/name)")
    if constants.HF_HUB_OFFLINE and (kinds & set(UNREACHABLE) or _cannot_connect(chain)):
        return UserError(
            f"{what} {name}: not in the local cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: unset it, or download "
            f"it once where the hub is reachable (hf download {'--repo-type dataset ' if what == 'data set' else ''}{name})"
        )
    if kinds & set(UNREACHABLE) or _cannot_connect(chain) or (status is not None and (status >= 500 or status == 429)):
        reason = f"HTTP {status}" if status else "cannot connect"
        return Failure(
            f"{what} {name}: the hub ({constants.ENDPOINT}) is unreachable ({reason}, after huggingface_hub's retries) and the "
            "local cache lacks it: check the network, proxy or HF_ENDPOINT and run again, "
            "or run with HF_HUB_OFFLINE=1 where the cache holds it"
        )
    return None


def _chain(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def _cannot_connect(chain: list[BaseException]) -> bool:
    """transformers' own OSError when neither the hub nor the cache has the files."""
    return any(isinstance(e, OSError) and "couldn't connect to" in str(e) for e in chain)
