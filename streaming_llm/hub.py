"""The Hugging Face hub, reachable or not. On a machine that cannot reach it, a hub id or dataset name is looked
up in the local cache at once, as with HF_HUB_OFFLINE=1, instead of after huggingface_hub's retries (~30-50 s)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
# Behind a proxy a direct connection says nothing about the hub: the probe is skipped and the hub assumed reachable.
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_host() -> str:
    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT


def not_cached_offline(kind: str, by_setting: bool = False) -> str:
    """Why a `kind` ("model", "dataset") could not be loaded when offline_unless_reachable went offline, or
    (`by_setting`) when HF_HUB_OFFLINE was set already."""
    if by_setting:
        return (f"HF_HUB_OFFLINE is set and the {kind} is not in the local Hugging Face cache: it needs the network "
                f"(the hub, {hub_host()}) once; unset HF_HUB_OFFLINE to download it")
    return f"the hub ({hub_host()}) cannot be reached from this machine and the {kind} is not in the local Hugging Face cache"


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host (HF_ENDPOINT, default huggingface.co) accepts a connection within `timeout_s`."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


@contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Within it, huggingface_hub (and datasets, when imported) run in offline mode if the hub cannot be reached;
    yields whether it made them so (False where HF_HUB_OFFLINE was set already, or the hub answered)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or hub_reachable():
        yield False
        return
    settings = [constants] + ([sys.modules["datasets"].config] if "datasets" in sys.modules else [])
    saved = [setting.HF_HUB_OFFLINE for setting in settings]
    for setting in settings:
        setting.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        for setting, value in zip(settings, saved):
            setting.HF_HUB_OFFLINE = value
