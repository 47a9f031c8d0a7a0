"""`boomerang upload`: push a size, a full family or a compact family to the Hugging Face hub (huggingface_hub).

What goes where (one repo per loadable model, so
`AutoModelForCausalLM.from_pretrained("ORG/NAME", trust_remote_code=False)` works on each, and every size has its own model card):

- an HF directory (config.json): one repo `ORG/NAME`, the directory's files at its root;
- a full family (family.json with sizes): one repo per size, `ORG/NAME-<layers>L`, each size's files at its
  root (family.json is not uploaded: each size carries its own record, boomerang_size.json);
- a compact family: one repo `ORG/NAME` holding the family as it is (family.json, README.md, student/,
  teacher/); download it and run `boomerang materialise` on the copy.

Hidden files and directories (leftovers of interrupted exports) are never uploaded. `--dry-run` prints the plan
and touches nothing; without it a token is required (HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from boomerang_jax.infra import storage
from boomerang_jax.surgery.family_export import FAMILY_FILE, read_family


class UploadError(ValueError):
    """An upload that cannot be done as asked (not a model or family, no token, bad repo id)."""


def _files(root: Path) -> list[str]:
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def upload_plan(path: str, repo: str) -> list[tuple[str, Path, list[str]]]:
    """(repo id, local folder, files relative to it) for each repo the upload creates; see the module docstring."""
    if storage.is_remote(path):
        raise UploadError(f"{path}: upload reads a local directory; copy it here first (gsutil -m cp -r)")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UploadError(f"--repo {repo!r}: use ORG/NAME (a hub namespace and a repository name)")
    root = Path(path)
    if (root / FAMILY_FILE).exists():
        family = read_family(root)
        if family.get("compact"):
            return [(repo, root, _files(root))]
        plan = []
        for size in family["sizes"]:
            d = root / size["dir"]
            if not (d / "config.json").exists():
                raise UploadError(f"{d}: missing (listed in {root / FAMILY_FILE}); the family is incomplete")
            plan.append((f"{repo}-{size['num_layers']}L", d, _files(d)))
        return plan
    if (root / "config.json").exists():
        return [(repo, root, _files(root))]
    raise UploadError(f"{path}: neither an HF directory (config.json) nor a family (family.json)")


def add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `boomerang upload`."""
    parser.add_argument("path", help="an HF directory (a size), a full family or a compact family (local)")
    parser.add_argument("--repo", required=True, help="ORG/NAME; a full family's sizes go to ORG/NAME-<layers>L")
    parser.add_argument("--private", action="store_true", help="create the repo(s) private")
    parser.add_argument("--dry-run", action="store_true", help="print what would go where; upload nothing")
    parser.add_argument("--message", default="Upload with boomerang upload", help="commit message")


def upload_command(args: argparse.Namespace) -> int:
    """`boomerang upload`: create the repo(s) (exist_ok) and upload each folder in one commit."""
    plan = upload_plan(str(args.path), args.repo)
    for repo, folder, files in plan:
        if not any(f == "README.md" for f in files):
            print(f"note: {folder} has no README.md (model card); `boomerang materialise` writes one")
        print(json.dumps({"repo": repo, "from": str(folder), "files": files, "private": bool(args.private)}))
    if args.dry_run:
        print(f"dry run: {len(plan)} repo(s), {sum(len(f) for _, _, f in plan)} file(s); nothing uploaded")
        return 0
    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UploadError("no Hugging Face token configured: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    api = HfApi(token=token)
    for repo, folder, files in plan:
        url = api.create_repo(repo, private=args.private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=folder, allow_patterns=files, commit_message=args.message,
                          repo_type="model")
        print(f"uploaded {len(files)} file(s) from {folder} to {url}")
    return 0
