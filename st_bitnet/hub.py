"""Publishing to the Hugging Face Hub: exactly the folder ``save_pretrained`` writes, uploaded as is."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .sentence_transformer import save_pretrained


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Add BitNet embedder (st_bitnet)",
    revision: str | None = None,
    create_pr: bool = False,
    **card_kwargs,
) -> str:
    """Pack ``model``, write its folder (weights, config, modules.json, card, shipped code where needed) and upload it.

    The upload is the standard ``huggingface_hub`` one (``create_repo`` + ``upload_folder``). The repo then loads
    with ``SentenceTransformer(repo_id)`` (stock ``bitnet`` format) or ``SentenceTransformer(repo_id,
    trust_remote_code=True)`` (``bitembed`` models) for users without st_bitnet, and ``st_bitnet.load(repo_id)``.

    Returns:
        The URL of the upload commit.
    """
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / "model", repo_id=repo_id, **card_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, revision=revision, create_pr=create_pr
        )
    return str(getattr(info, "commit_url", info))
