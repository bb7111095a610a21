"""Masks on the Hugging Face Hub: ``Mask.from_pretrained`` / ``save_pretrained`` / ``push_to_hub``, and mask specs.

A *mask spec* is the string passed wherever a mask is expected (``SSAHCallback``, ``SSAHOptimizer``,
``deepspeed_enforce``)::

    "mask.safetensors"            a local mask file
    "./masks/llama"               a local folder written by save_pretrained (reads ssah_mask.safetensors in it)
    "org/name"                    a Hub repo (its default policy)
    "org/name:scu+cu6"            a Hub repo, policy scu+cu6 (everything after the first ':' is the policy)
    "org/name@v1:scu"             a Hub repo at revision v1 (branch, tag or commit hash)
    "mask.safetensors:scu"        a local file or folder with a policy

How a spec is read (:func:`parse_mask_spec`):

1. A ``pathlib.Path`` (any ``os.PathLike``) is a local path, never parsed.
2. A string that names an existing file or folder (after ``~`` expansion) is that local path, whole: local names
   holding ``:`` or ``@`` work.
3. Otherwise, when the part before some ``:`` names an existing file or folder, that is the path (the longest such
   part) and the rest is the policy. Else the policy is what follows the first ``:``. A Windows drive prefix
   (``C:\\`` or ``C:/``) belongs to the path, so ``C:\\masks\\m.safetensors:scu`` is the file
   ``C:\\masks\\m.safetensors`` and policy ``scu``.
4. What is left is local if it exists, or if its part before the first ``@`` looks like a path: starts with ``.``,
   ``/``, ``~`` or a drive letter, contains ``\\``, ends with ``.safetensors``, or has no ``/`` or more than one.
   Otherwise it is a Hub repo ``org/name`` with an optional ``@revision`` (which may hold ``/``: ``@refs/pr/1``);
   ``org`` and ``name`` follow the Hub's rules (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``; 96
   characters at most).

So an existing local folder called ``org/name`` shadows the Hub repo of that name (as in ``transformers``).

``huggingface_hub`` is imported only when a Hub repo is read or written (``pip install 'ssah-plugin[hub]'``); it
keeps its own cache (``HF_HUB_CACHE``) and honours ``HF_HUB_OFFLINE=1`` (cached files only).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple, TypeVar

from ssah_plugin._version import __version__
from ssah_plugin.core.card import model_card
from ssah_plugin.core.mask_format import serialize
from ssah_plugin.errors import MaskFormatError, SSAHError, require

__all__ = ["CARD_FILENAME", "MASK_FILENAME", "HubMixin", "MaskHubError", "MaskSpec", "MaskSpecError", "is_repo_id",
           "names_hub_repo", "parse_mask_spec"]

logger = logging.getLogger(__name__)

#: name of the mask file in a folder written by save_pretrained and in a Hub repo
MASK_FILENAME = "ssah_mask.safetensors"
CARD_FILENAME = "README.md"
_PURPOSE = "Reading or writing masks on the Hugging Face Hub"
_PART = r"\w(?:[\w.-]*\w)?"
_REPO_RE = re.compile(rf"^{_PART}/{_PART}$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:[\\/]")

M = TypeVar("M", bound="HubMixin")


class MaskSpecError(SSAHError, ValueError):
    """A mask spec (``org/name@revision:policy``) that cannot be read, or that contradicts another argument."""


class MaskHubError(MaskFormatError):
    """A mask could not be fetched from the Hugging Face Hub (or found in its cache)."""


class MaskSpec(NamedTuple):
    """A parsed mask spec. ``source`` is a :class:`~pathlib.Path` for a local file or folder, a ``str`` repo id."""

    source: Path | str
    revision: str | None
    policy: str | None

    @property
    def is_local(self) -> bool:
        return isinstance(self.source, Path)


def is_repo_id(text: str) -> bool:
    """True for a Hub model repo id ``org/name`` (the Hub's character rules; no ``--`` or ``..``)."""
    return bool(_REPO_RE.match(text)) and len(text) <= 96 and "--" not in text and ".." not in text


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not an existing path
        return False


def names_hub_repo(text: str) -> bool:
    """True when ``text`` is read as a Hub repo id: it has the ``org/name`` form and is not an existing local path
    (an existing path always wins, as in :func:`parse_mask_spec`)."""
    return is_repo_id(text) and not _exists(Path(text).expanduser())


def _looks_local(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or bool(_DRIVE_RE.match(text)) or "\\" in text
            or text.endswith(".safetensors") or text.count("/") != 1)


def parse_mask_spec(spec: str | os.PathLike) -> MaskSpec:
    """``spec -> MaskSpec(source, revision, policy)``; raises :class:`MaskSpecError` for a malformed spec.

    The rules are in this module's docstring (an existing local path always wins). Nothing is downloaded.
    """
    if isinstance(spec, os.PathLike):
        return MaskSpec(Path(spec).expanduser(), None, None)
    if not isinstance(spec, str):
        raise MaskSpecError(f"a mask spec is a string or a path, got {type(spec).__name__}")
    if not spec.strip():
        raise MaskSpecError("empty mask spec: pass a mask file, a folder, or a Hub repo 'org/name[@revision][:policy]'")
    whole = Path(spec).expanduser()
    if _exists(whole):
        return MaskSpec(whole, None, None)
    drive = spec[:3] if _DRIVE_RE.match(spec) else ""
    cuts = [i for i, c in enumerate(spec) if c == ":" and i >= len(drive)]
    existing = [i for i in cuts if i > 0 and _exists(Path(spec[:i]).expanduser())]
    cut = existing[-1] if existing else (cuts[0] if cuts else len(spec))  # the longest existing path, else first ':'
    head, sep, policy = spec[:cut], spec[cut:cut + 1], spec[cut + 1:]
    if not head.strip():
        raise MaskSpecError(f"mask spec {spec!r} names no mask before the ':'; write e.g. 'org/name:scu'")
    if sep and not policy.strip():
        raise MaskSpecError(f"mask spec {spec!r} ends with ':' but names no policy; write e.g. {head + ':scu+cu6'!r} "
                            "or drop the ':'")
    if policy != policy.strip():
        raise MaskSpecError(f"mask spec {spec!r}: the policy {policy!r} has surrounding spaces")
    local = Path(head).expanduser()
    repo, at, revision = head.partition("@")
    if _exists(local) or _looks_local(repo):
        return MaskSpec(local, None, policy or None)
    if at and not revision:
        raise MaskSpecError(f"mask spec {spec!r}: '@' must be followed by a revision (branch, tag or commit)")
    if "@" in revision:
        raise MaskSpecError(f"mask spec {spec!r} has more than one '@'; write org/name@revision[:policy]")
    if not is_repo_id(repo):
        raise MaskSpecError(
            f"mask spec {spec!r}: {repo!r} is neither an existing local file or folder nor a Hub repo id "
            "('org/name': letters, digits, '-', '_', '.'; no '--' or '..'). A local path: check its spelling, "
            "or start it with ./")
    return MaskSpec(repo, revision or None, policy or None)


def _hub_error(exc: Exception, repo_id: str, revision: str | None, filename: str, cache_dir) -> MaskHubError:
    """A :class:`MaskHubError` naming what was looked for, where, and the fix."""
    from huggingface_hub import constants, errors

    rev = revision or "main"
    where = f"{filename!r} of Hub repo {repo_id!r} at revision {rev!r}"
    cache = cache_dir or constants.HF_HUB_CACHE
    if isinstance(exc, errors.LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
               "local_files_only=True or the Hub could not be reached")
        msg = (f"{where} is not in the Hugging Face cache ({cache}) and {why}. Fix: download it once with network "
               f"access (hf download {repo_id} {filename} --revision {rev}), check the revision's spelling, or pass "
               "a local folder written by save_pretrained")
    elif isinstance(exc, errors.GatedRepoError):
        msg = f"{where}: the repo is gated; accept its conditions on the Hub and log in (hf auth login) or pass token="
    elif isinstance(exc, errors.RepositoryNotFoundError):
        msg = (f"{where}: no such repo on the Hub, or it is private (log in with hf auth login or pass token=); "
               "no local file or folder of that name exists either")
    elif isinstance(exc, errors.RevisionNotFoundError):
        msg = f"{where}: the repo has no revision {rev!r} (a branch, tag or commit hash)"
    elif isinstance(exc, errors.EntryNotFoundError):
        msg = (f"{where}: the repo has no such file; masks written by save_pretrained / push_to_hub are named "
               f"{MASK_FILENAME!r} (pass filename= for another name)")
    else:
        msg = f"{where} could not be fetched ({type(exc).__name__}: {str(exc)[:200]})"
    return MaskHubError(msg)


class HubMixin:
    """``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` for :class:`~ssah_plugin.core.mask.Mask`.

    The host class provides ``load(path)``, ``save(path)``, ``frozen(policy)`` and the fields of a mask.
    """

    @classmethod
    def from_pretrained(cls: type[M], repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                        filename: str = MASK_FILENAME, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None, local_files_only: bool | None = None) -> M:
        """Read a mask from a local folder (or file), or from a Hub repo through ``huggingface_hub``'s cache.

        A local folder is read as ``folder/filename``. A repo id ``org/name`` is fetched with
        ``huggingface_hub.hf_hub_download(repo_id, filename, revision=..., cache_dir=..., token=...)``: cached files
        are reused, ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) reads the cache only. Raises
        :class:`MaskHubError` (a :class:`~ssah_plugin.errors.MaskFormatError`) naming the repo, revision and fix.
        """
        text = os.fspath(repo_id_or_dir)
        local = Path(text).expanduser()
        if isinstance(repo_id_or_dir, os.PathLike) or not names_hub_repo(text):
            if revision is not None:
                raise MaskSpecError(f"revision={revision!r} applies to Hub repos only; {text!r} is a local path")
            if local.is_dir():
                path = local / filename
                if not path.is_file():
                    found = sorted(p.name for p in local.glob("*.safetensors"))
                    raise MaskFormatError(f"folder {text!r} holds no {filename!r} (its .safetensors files: "
                                          f"{found or 'none'}); pass filename= or the file itself")
                return cls.load(path)  # type: ignore[attr-defined]
            return cls.load(local)  # type: ignore[attr-defined]
        hub = require("huggingface_hub", "hub", _PURPOSE)
        from huggingface_hub import errors

        try:
            path = hub.hf_hub_download(text, filename, revision=revision, cache_dir=cache_dir, token=token,
                                       local_files_only=bool(local_files_only), library_name="ssah-plugin",
                                       library_version=__version__)
        except (errors.HfHubHTTPError, errors.EntryNotFoundError, errors.OfflineModeIsEnabled,
                errors.HFValidationError, OSError) as exc:
            raise _hub_error(exc, text, revision, filename, cache_dir) from exc
        logger.info("ssah-plugin: mask %s (revision %s) read from %s", text, revision or "main", path)
        return cls.load(path)  # type: ignore[attr-defined]

    @classmethod
    def from_spec(cls: type[M], spec: str | os.PathLike, policy: str | None = None) -> M:
        """Read a mask from a spec (:func:`parse_mask_spec`); a policy in the spec becomes the default policy.

        ``policy`` is the caller's explicit policy argument: naming another policy than the spec is an error.
        """
        parsed = parse_mask_spec(spec)
        if parsed.policy is not None and policy is not None and parsed.policy != policy:
            raise MaskSpecError(f"the mask spec {os.fspath(spec)!r} names policy {parsed.policy!r} but "
                                f"policy={policy!r} was also passed; give the policy in one place only")
        if parsed.is_local:
            mask = cls.from_pretrained(parsed.source) if Path(parsed.source).is_dir() else \
                cls.load(parsed.source)  # type: ignore[attr-defined]
        else:
            mask = cls.from_pretrained(parsed.source, revision=parsed.revision)
        if parsed.policy is not None:
            mask.frozen(parsed.policy)  # type: ignore[attr-defined]  # an unknown policy fails here, naming it
            mask.default_policy = parsed.policy  # type: ignore[attr-defined]
        return mask

    def save_pretrained(self, save_directory: str | os.PathLike, *, repo_id: str | None = None,
                        revision: str | None = None, base_model: str | None = None, license: str | None = None,
                        filename: str = MASK_FILENAME) -> Path:
        """Write ``save_directory/filename`` (the mask) and ``README.md`` (its model card); returns the folder.

        The card (:func:`ssah_plugin.core.card.model_card`) shows ``base_model`` and ``license`` when given (both
        also go into its YAML front matter), and the usage line with ``repo_id`` / ``revision`` when given.
        ``base_model`` defaults to the Hub id that ``locate`` recorded from the model's config (``method["base_model"]``;
        a model loaded from a local folder records none). An existing ``README.md`` in the folder is replaced.
        """
        if base_model is None:
            base_model = self.method.get("base_model")  # type: ignore[attr-defined]
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.save(folder / filename)  # type: ignore[attr-defined]
        meta = serialize(self)[1]  # type: ignore[arg-type]
        card = model_card(self, meta, repo_id=repo_id, revision=revision,  # type: ignore[arg-type]
                          base_model=base_model, license=license, filename=filename)
        (folder / CARD_FILENAME).write_text(card, encoding="utf-8")
        return folder

    def push_to_hub(self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, commit_message: str | None = None,
                    base_model: str | None = None, license: str | None = None, create_pr: bool = False):
        """Upload the mask and its card to the Hub repo ``org/name``; returns ``huggingface_hub.CommitInfo``.

        Writes both with :meth:`save_pretrained` into a temporary folder, then ``HfApi.create_repo(exist_ok=True)``,
        ``HfApi.create_branch`` when ``revision`` names a branch, and ``HfApi.upload_folder``. Under
        ``HF_HUB_OFFLINE=1`` the first request raises ``huggingface_hub``'s ``OfflineModeIsEnabled``.
        """
        if not isinstance(repo_id, str) or not is_repo_id(repo_id):
            raise MaskSpecError(f"push_to_hub needs a repo id 'org/name' (your user or organisation name, a slash, "
                                f"the repo name), got {repo_id!r}")
        hub = require("huggingface_hub", "hub", _PURPOSE)
        message = commit_message or (f"Upload ssah-plugin mask ({self.architecture}, "  # type: ignore[attr-defined]
                                     f"default policy {self.default_policy})")  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory(prefix="ssah-mask-") as tmp:
            folder = self.save_pretrained(tmp, repo_id=repo_id, revision=revision, base_model=base_model,
                                          license=license)
            logger.info("ssah-plugin: uploading %s to %s (revision %s)", sorted(p.name for p in folder.iterdir()),
                        repo_id, revision or "main")
            api = hub.HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=message, create_pr=create_pr)
