"""Model-hub handling shared by the open_clip and transformers adapters: the hub switched off (and load
reports silenced) for a build, and a failed download explained in one line (not cached, gated, no such model)."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

# `transformers` is a lazy module (open_clip imports it anyway); only its logging is used here
import transformers
from huggingface_hub import constants as hub_constants  # transformers' own dependency: the hub cache and offline flag
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError


@contextlib.contextmanager
def _offline_quiet(offline: bool = True) -> Iterator[None]:
    """No hub calls from transformers/huggingface_hub (when `offline`), and no load reports on the console.

    huggingface_hub reads HF_HUB_OFFLINE once, when it is imported (long done: open_clip imports it), into
    `huggingface_hub.constants.HF_HUB_OFFLINE`, the flag its every request checks; so that flag is switched
    for the duration, and the environment too (for libraries that read it later)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved, saved_flag = {k: os.environ.get(k) for k in keys}, hub_constants.HF_HUB_OFFLINE
    if offline:
        os.environ.update({k: "1" for k in keys})
        hub_constants.HF_HUB_OFFLINE = True
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        with contextlib.suppress(Exception):
            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        yield
    finally:
        root.setLevel(level)
        hub_constants.HF_HUB_OFFLINE = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exception_chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions behind it (`raise ... from` and raised-while-handling), newest first."""
    out: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and all(x is not y for y in out):
        out.append(x)
        x = x.__cause__ or x.__context__
    return out


def _first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip()[:240] if lines else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _hub_unavailable(repo: str, e: BaseException) -> tuple[str, str]:
    """Why the hub repo `repo` could not be had (read from the exception chain), and the way out that fixes
    it on the hub's side: (reason, remedy). Callers add the way out that needs no hub."""
    chain = _exception_chain(e)
    if any(isinstance(x, GatedRepoError) for x in chain):
        return (f"{repo} is a gated model this machine has no access to",
                f"accept its terms at https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN)")
    if any(isinstance(x, RepositoryNotFoundError) for x in chain):
        return f"the hub has no model {repo} (or it is private)", "check the name, or log in (`hf auth login`) for a private one"
    return (f"{repo} is not cached here ({hub_constants.HF_HUB_CACHE}) and cannot be downloaded ({type(e).__name__})",
            f"download it where the hub can be reached (`hf download {repo}`; `hf auth login` first if it is gated) and copy that cache here")
