"""Upload a validated build to the Hugging Face Hub with `huggingface_hub`.

The token comes from the usual places (HF_TOKEN or `hf auth login`) through
huggingface_hub itself; this module never reads, prints or stores it.
"""

from __future__ import annotations

import os
from pathlib import Path

from vqa_constraints.errors import UserError
from vqa_constraints.validation import validate_folder


def files_to_upload(folder: str | Path) -> list[str]:
    """The exact files a publish uploads: everything in the build except hidden paths, sorted."""
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files.append(relative.as_posix())
    return sorted(files)


def check_publishable(folder: str | Path) -> list[str]:
    """Validate the build; return its file list, or raise UserError naming the first problem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    violations = validate_folder(folder)
    if violations:
        more = f" (and {len(violations) - 1} more; run `vqa-constraints validate {folder}`)" if len(violations) > 1 else ""
        raise UserError(f"{folder} is not valid, not publishing: {violations[0]}{more}")
    return files_to_upload(folder)


def publish(folder: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
            commit_message: str | None = None):
    """Create the dataset repo if needed and upload the build; return the CommitInfo."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

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
