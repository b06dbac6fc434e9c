"""Upload a validated build to the Hugging Face Hub with `huggingface_hub`.

The token comes from the usual places (HF_TOKEN or `hf auth login`) through
huggingface_hub itself; this module never reads, prints or stores it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

from vqa_constraints.builder import file_sha256
from vqa_constraints.errors import UserError
from vqa_constraints.validation import validate_folder

INFO_FILE = "build_info.json"


def files_to_upload(folder: str | Path) -> list[str]:
    """The exact files a publish uploads: those ``build_info.json`` lists (each checked against its
    sha256) and ``build_info.json`` itself, sorted. UserError on a symbolic link anywhere in the
    folder, a file the build did not write, or a listed file that is missing or changed."""
    folder = Path(folder)
    refuse = f"{folder} is not valid, not publishing:"
    listed = _listed_files(folder, refuse)
    for root, dirs, names in os.walk(folder):  # os.walk does not descend into linked folders
        for name in sorted(dirs + names):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                raise UserError(f"{refuse} {path} is a symbolic link (publish uploads only files the build wrote)")
            if name in names and relative not in listed and relative != INFO_FILE:
                raise UserError(f"{refuse} {path} was not written by the build (not in {INFO_FILE}); move it out")
    for relative, expected in listed.items():
        path = folder / relative
        if not path.is_file():
            raise UserError(f"{refuse} {folder / INFO_FILE} lists {relative}, which is missing")
        if file_sha256(path) != expected:
            raise UserError(f"{refuse} {path} has changed since the build (sha256 differs from {INFO_FILE})")
    return sorted([*listed, INFO_FILE])


def _listed_files(folder: Path, refuse: str) -> dict[str, str]:
    """``build_info.json``'s ``files``: relative path -> sha256, each a plain path inside the folder."""
    info_path = folder / INFO_FILE
    if info_path.is_symlink() or not info_path.is_file():
        raise UserError(f"{refuse} {info_path} is missing (or not a regular file); it lists the files to upload")
    try:
        files = json.loads(info_path.read_text("utf-8")).get("files")
    except (ValueError, AttributeError) as error:
        raise UserError(f"{refuse} {info_path} is not a JSON object ({str(error).splitlines()[0]})") from None
    if not isinstance(files, dict) or not files:
        raise UserError(f"{refuse} {info_path} has no 'files' list with hashes (an older build?); rebuild it")
    for relative, digest in files.items():
        parts = Path(relative).parts
        if (not isinstance(digest, str) or Path(relative).is_absolute() or ".." in parts or not parts
                or Path(relative).as_posix() != relative or relative == INFO_FILE):
            raise UserError(f"{refuse} {info_path} field 'files': entry {relative!r} is not a file inside the build")
    return files


def check_publishable(folder: str | Path) -> list[str]:
    """Validate the build; return its file list, or raise UserError naming the first problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    files = files_to_upload(folder)  # before validation reads anything through a link
    violations = validate_folder(folder)
    if violations:
        more = f" (and {len(violations) - 1} more; run `vqa-constraints validate {folder}`)" if len(violations) > 1 else ""
        raise UserError(f"{folder} is not valid, not publishing: {violations[0]}{more}")
    return files


def publish(folder: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
            commit_message: str | None = None):
    """Create the dataset repo if needed and upload the build; return the CommitInfo."""

    files = check_publishable(folder)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError("HF_HUB_OFFLINE=1 is set; unset it to publish (or use --dry-run)")
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=str(folder),
            revision=revision,
            allow_patterns=files,
            delete_patterns=["*/*.parquet"],  # shards of an older, larger build; this build's are re-added
            commit_message=commit_message or f"Upload VQA-Constraints build ({len(files)} files)",
        )
    except OfflineModeIsEnabled:
        raise UserError("huggingface_hub is in offline mode; unset HF_HUB_OFFLINE to publish") from None
    except LocalTokenNotFoundError:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`") from None
    except HfHubHTTPError as error:
        raise UserError(f"{repo_id}: upload failed: {str(error).splitlines()[0]}") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{repo_id}: upload failed: {str(error).splitlines()[0]}") from None
