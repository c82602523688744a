"""Published weights by name: `hf-hub:ORG/NAME[@REVISION]`, fetched into huggingface_hub's cache (timm's spelling).

huggingface_hub does the fetching, so its cache, HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT apply as they do for
transformers and timm; it is imported only when a Hub id is given. Each of its errors becomes one WeightsError line.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .errors import WeightsError
from .rundir import CONFIG_NAME, WEIGHTS_NAME

PREFIX = "hf-hub:"
# What a repository may hold, in order of preference; the .bin only through the weights-only unpickler.
HUB_WEIGHTS = (WEIGHTS_NAME, "model.safetensors.index.json", "pytorch_model.bin")
# The Hub's own rule for repository names: letters, digits, -, _, .; no -- or .. inside, no - or . at the ends.
_NAME = r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^({_NAME})/({_NAME})(?:@([^@\s]+))?$")


def is_hub_id(path: str | os.PathLike) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(PREFIX)


def parse_hub_id(hub_id: str) -> tuple[str, str | None]:
    """A Hub id -> (repository, revision): "hf-hub:ORG/NAME@REV" -> ("ORG/NAME", "REV"); REV None if not given."""
    m = _HUB_ID.match(hub_id.removeprefix(PREFIX))
    if m is None:
        raise WeightsError(
            f"{hub_id} is not a Hub id; expected {PREFIX}ORG/NAME or {PREFIX}ORG/NAME@REVISION "
            f"(e.g. {PREFIX}facebook/vit-mae-base)"
        )
    return f"{m.group(1)}/{m.group(2)}", m.group(3)


def fetch(hub_id: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights file, its config.json or None) of a Hub model, in the local cache; downloaded there when missing.

    The repository's config.json where it has one, then its first weights file of HUB_WEIGHTS (a sharded
    safetensors index brings its shards). Raises a one-line WeightsError naming the id and what to do.
    """
    hub_id = os.fspath(hub_id)
    repo, revision = parse_hub_id(hub_id)
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError(f"{hub_id}: Hub ids need huggingface_hub (pip install huggingface_hub)") from None
    fetcher = _Fetcher(huggingface_hub, hub_id, repo, revision)
    config = fetcher.file(CONFIG_NAME)
    for name in HUB_WEIGHTS:
        weights = fetcher.file(name)
        if weights is not None:
            if name.endswith(".index.json"):
                for shard in _shards(weights, hub_id):
                    if fetcher.file(shard) is None:
                        raise WeightsError(f"{hub_id}: its safetensors index names {shard}, which it does not hold")
            return weights, config
    if fetcher.not_cached:
        raise WeightsError(fetcher.not_cached_message())
    raise WeightsError(
        f"{hub_id} holds no {', '.join(HUB_WEIGHTS[::2])}; is it a maecli export, a transformers ViTMAE or a timm ViT?"
    )


def _shards(index: Path, hub_id: str) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, OSError, KeyError, AttributeError, TypeError) as e:
        raise WeightsError(f"{hub_id}: its model.safetensors.index.json is not a readable index ({e})") from None


class _Fetcher:
    """hf_hub_download for one repository and revision, with huggingface_hub's errors turned into ours."""

    def __init__(self, huggingface_hub, hub_id: str, repo: str, revision: str | None):
        self.hub, self.hub_id, self.repo, self.revision = huggingface_hub, hub_id, repo, revision
        self.not_cached: Exception | None = None  # the cause, when a file was neither in the cache nor fetchable
        # Once the Hub could not be reached, the other files come from the cache or not at all: each unanswered
        # request costs huggingface_hub about 20 s of retries.
        self.local_only = False
        try:
            from huggingface_hub import errors
        except ImportError:  # huggingface_hub before 0.24 kept its errors in utils
            from huggingface_hub import utils as errors
        self.errors = errors

    def file(self, name: str) -> Path | None:
        """The cached path of `name`, or None where the repository lacks it, or it is not cached and cannot be."""
        e = self.errors
        try:
            return Path(
                self.hub.hf_hub_download(self.repo, name, revision=self.revision, local_files_only=self.local_only)
            )
        except e.LocalEntryNotFoundError as error:  # offline, or no connection, and not in the cache
            self.not_cached = self.not_cached or error
            self.local_only = True
            return None
        except e.GatedRepoError:
            raise WeightsError(
                f"{self.hub_id} is gated: accept its terms at https://huggingface.co/{self.repo}, then log in "
                f"(hf auth login, or set HF_TOKEN)"
            ) from None
        except e.RepositoryNotFoundError:
            raise WeightsError(
                f"{self.hub_id}: no such model on the Hub, or a private one: check the name, or log in "
                f"(hf auth login, or set HF_TOKEN) if it is yours"
            ) from None
        except e.RevisionNotFoundError:
            raise WeightsError(
                f"{self.hub_id}: {self.repo} has no revision {self.revision!r}; give a branch, tag or commit it has"
            ) from None
        except e.EntryNotFoundError:  # the repository does not hold this file
            return None
        except e.OfflineModeIsEnabled as error:
            self.not_cached = self.not_cached or error
            self.local_only = True
            return None
        except e.HfHubHTTPError as error:
            raise WeightsError(f"cannot fetch {self.hub_id}: the Hub answered {_gist(error)}") from None
        except e.HFValidationError as error:
            raise WeightsError(f"{self.hub_id} is not a Hub id ({_gist(error)})") from None
        except _connection_errors() as error:  # a download cut off, a full disk, a cache we may not write
            raise WeightsError(f"cannot fetch {self.hub_id}: {_gist(error)}") from None

    def not_cached_message(self) -> str:
        constants = self.hub.constants
        cache = getattr(constants, "HF_HUB_CACHE", None) or "~/.cache/huggingface/hub"
        if getattr(constants, "HF_HUB_OFFLINE", False):
            return (
                f"cannot fetch {self.hub_id}: HF_HUB_OFFLINE is set and it is not in the cache ({cache}); "
                f"download it once with HF_HUB_OFFLINE=0 and a network"
            )
        return (
            f"cannot fetch {self.hub_id}: no network and not in the cache ({cache}); download it once with a "
            f"network (HF_ENDPOINT names a mirror), or set HF_HUB_CACHE to a cache that holds it"
        )


def _connection_errors() -> tuple[type[BaseException], ...]:
    """OSError (requests' errors are OSErrors), and the transport errors of whichever HTTP client
    huggingface_hub has loaded: httpx's are not OSErrors."""
    found: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        module = sys.modules.get(name)
        if module is not None and isinstance(getattr(module, "TransportError", None), type):
            found.append(module.TransportError)
    return tuple(found)


def _gist(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
